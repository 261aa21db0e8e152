"""Tables as files: tableN.md (GitHub markdown, rounded, titled like the paper, with footnotes) and tableN.csv
(full precision), from the rows of lark.analysis.tables.

    write_tables({"table2": rows}, "run/tables", {"table2": "Loss target: ..."})   # -> [table2.md, table2.csv]
    fmt(0.4821, ".3f") == "0.482"; fmt(None, ".3f") == "-"
"""

from pathlib import Path

from lark.analysis.tables import EVAL_COLUMNS, TITLES
from lark.data.io import replacing, write_csv


def write_tables(tables, out_dir, captions=None):
    """out_dir/tableN.md (rounded, GitHub markdown, titled like the paper, with captions[name] under the title)
    and tableN.csv (full precision)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in tables.items():
        md, csv_file = out_dir / f"{name}.md", out_dir / f"{name}.csv"
        with replacing(md) as tmp:
            tmp.write_text(to_markdown(name, rows, (captions or {}).get(name)))
        write_csv(csv_file, rows)
        files += [md, csv_file]
    return files


def to_markdown(name, rows, caption=None):
    columns = md_columns(name, rows)
    lines = [f"### {TITLES[name]}{epoch_suffix(name, rows)}", ""] + ([caption, ""] if caption else [])
    lines.append("| " + " | ".join(header for header, _ in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row).replace("|", "\\|") for _, cell in columns) + " |")
    notes = footnotes(name, rows)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def epoch_suffix(name, rows):
    """Tables I and IV are at one epoch per run: " (Epoch 2)" when all runs agree."""
    epochs = {row["epoch"] for row in rows} if name in ("table1", "table4") else set()
    if not epochs:
        return ""
    return f" (Epoch {epochs.pop()})" if len(epochs) == 1 else " (per-run epoch, see the Epoch column)"


def fmt(value, spec, unit=""):
    return "-" if value is None else f"{value:{spec}}{unit}"


def epoch_cell(row):
    """ "0 (base)" for the base model, "4*" for an epoch trained at a reduced learning rate."""
    return f"{row['epoch']}{'*' if row['reduced_lr'] else ''}{' (base)' if row['epoch'] == 0 else ''}"


def table4_cell(row):
    if row["method"] == "Difference":
        return fmt(row["difference_pp"], "+.1f", " pp")
    return fmt(row["ft_wins_pct"], ".1f", "%")


# (header, row -> cell text) of the tables whose columns do not depend on the rows; Table II's: table2_columns
COLUMNS = {
    "table1": [
        ("Data Source", lambda r: r["source"]),
        ("Mean Max", lambda r: fmt(r["mean_max"], ".3f")),
        ("FT Wins", lambda r: fmt(r["ft_wins_pct"], ".1f", "%")),
    ],
    "table3": [
        ("Method", lambda r: r["method"]),
        ("Examples", lambda r: fmt(r["n_examples"], ",.0f")),
        ("Per Example", lambda r: format_bytes(r["bytes_per_example"])),
        ("All Examples", lambda r: format_bytes(r["bytes_total"])),
        ("Compression", lambda r: fmt(r["compression"], ",.0f" if (r["compression"] or 0) >= 10 else ".2g", "×")),
    ],
    "table4": [
        ("Method", lambda r: r["method"]),
        ("FT Wins", table4_cell),
        ("Interpretation", lambda r: r["interpretation"]),
    ],
    "tracin_cp": [
        ("Data Source", lambda r: r["source"]),
        ("Mean Max", lambda r: fmt(r["mean_max"], ".4g")),
        ("FT Wins", lambda r: fmt(r["ft_wins_pct"], ".1f", "%")),
        ("Epochs", lambda r: r["epochs"]),
    ],
}


def md_columns(name, rows):
    """(header, row -> cell text) for each markdown column."""
    columns = table2_columns(rows) if name == "table2" else COLUMNS[name]
    if name in ("table1", "table4") and len({row["epoch"] for row in rows}) > 1:
        columns = [("Epoch", lambda r: str(r["epoch"]))] + columns
    if rows and "job" in rows[0]:
        columns = [("Job", lambda r: str(r["job"]))] + columns
    return columns


def table2_columns(rows):
    """Table II's columns: the paper's, the evaluation's (eval_headers), lr, and one per format-effect kind."""
    evaluation = [
        (header, lambda r, c=column, p=percent: fmt(r.get(c), ".1f" if p else ".3f", "%" if p else ""))
        for column, header, percent in eval_headers(rows)
    ]
    effects = [
        (f"Format Effect ({key.removeprefix('format_effect_')})", lambda r, key=key: fmt(r.get(key), ".2f", "×"))
        for key in dict.fromkeys(key for row in rows for key in row)
        if key.startswith("format_effect_")
    ]
    return [
        ("Epoch", epoch_cell),
        ("FT", lambda r: fmt(r["ft"], ".3f")),
        ("PT", lambda r: fmt(r["pt"], ".3f")),
        ("Ratio", lambda r: fmt(r["ratio"], ".2f")),
        ("PT Wins", lambda r: fmt(r["pt_wins_pct"], ".1f", "%")),
        *evaluation,
        ("lr", lambda r: fmt(r["lr"], "g")),
        *effects,
        *([("Kernel/projector", lambda r: str(r["method"]))] if any("method" in row for row in rows) else []),
    ]


def eval_headers(rows):
    """(column, header, percent?) of the evaluation columns present in Table II's rows."""
    present = dict.fromkeys(key for row in rows for key in row)
    known = [spec for spec in EVAL_COLUMNS.values() if spec[0] in present]
    columns = {spec[0] for spec in EVAL_COLUMNS.values()} | {
        "epoch",
        "lr",
        "reduced_lr",
        "ft",
        "pt",
        "ratio",
        "pt_wins_pct",
        "job",
        "method",
    }
    return known + [(key, key, False) for key in present if key not in columns and not key.startswith("format_")]


def format_bytes(n):
    """14596022272 -> "14.60 GB = 13.59 GiB (14,596,022,272 B)": decimal units (10^3) and binary units (2^10)."""
    if n is None:
        return "-"
    return f"{scale_bytes(n, 1000, 'KB MB GB TB PB')} = {scale_bytes(n, 1024, 'KiB MiB GiB TiB PiB')} ({n:,} B)"


def scale_bytes(n, base, units):
    units = ["B"] + units.split()
    power = 0
    while power + 1 < len(units) and n >= base ** (power + 1):
        power += 1
    return f"{n} B" if power == 0 else f"{n / base**power:.2f} {units[power]}"


def widths_note(rows):
    """When the full gradient's numbers and the projected ones differ in width (a float32 model, float16 stores),
    the ratio is of bytes, not the P/k of the paper (which counts both at 2 B): say both."""
    full, projected = (
        next((r for r in rows if r.get("numbers") and r["method"].startswith(m)), None) for m in ("Full", "LARK")
    )
    if not full or not projected or full.get("number_bytes") == projected.get("number_bytes"):
        return []
    p, b, k, kb = full["numbers"], full["number_bytes"], projected["numbers"], projected["number_bytes"]
    shown = lambda r: f"{r:,.0f}" if r >= 100 else f"{r:.3g}"  # noqa: E731
    return [
        f"Full gradient: {p:,} numbers x {b} B (the model's dtype); projected: {k:,} x {kb:g} B: the ratio of numbers "
        f"P/k is {shown(p / k)}x, of bytes {shown(p * b / (k * kb))}x (the paper counts both at 2 B)."
    ]


def footnotes(name, rows):
    if name == "table2":
        mixed = [
            "Epochs were attributed with different kernels or projectors (Kernel/projector): their scores are "
            "not one series; attribute.py run_dir=<run> attribution/kernel=<kernel> attribution/projector=<projector> "
            "'+attribution.checkpoints=[...]' re-attributes the others with one."
        ]
        return lr_footnotes(rows) + (mixed if any("method" in row for row in rows) else [])
    if name == "table3":
        return [
            "KB, MB, GB, TB = 10^3, 10^6, 10^9, 10^12 bytes; KiB, MiB, GiB, TiB = 2^10, 2^20, 2^30, 2^40 bytes.",
            "Projected: the k numbers in the store's tier, as the paper counts them; a store also keeps each "
            "example's float32 gradient norm (4 B).",
        ] + widths_note(rows)
    if name == "table4":
        versus = ", ".join(sorted({str(row["pt_source"]) for row in rows}))
        return [f"FT Wins: % of test queries whose top fine-tuning influence beats the top influence of {versus}."]
    return []


def lr_footnotes(rows):
    """One line per run with epochs marked *: which epochs, and their learning rate vs the run's maximum."""
    notes = []
    for job in dict.fromkeys(row.get("job") for row in rows):
        job_rows = [row for row in rows if row.get("job") == job]
        reduced = [row for row in job_rows if row["reduced_lr"]]
        if reduced:
            max_lr = max(row["lr"] for row in job_rows if row["lr"] is not None)
            epochs = ", ".join(str(row["epoch"]) for row in reduced)
            lrs = ", ".join(f"{lr:g}" for lr in dict.fromkeys(row["lr"] for row in reduced))
            prefix = "" if job is None else f"{job}: "
            which = f"Epochs {epochs} use" if len(reduced) > 1 else f"Epoch {epochs} uses"
            notes.append(f"\\*{prefix}{which} a lower learning rate ({lrs}) than the run's maximum ({max_lr:g}).")
    return notes
