"""Section IV of the paper from saved metrics: Tables I-IV and Figures 1-3.

A run directory holds attribution/epoch_NNN/metrics.json, one per attributed checkpoint (epoch 0 = the base
model). A Hydra multirun folder holds numbered job folders, each a run directory; its tables get a leading
`job` column (the job's overrides) and its figures one line per job.

    analyze("outputs/train/2025-01-01_12-00-00")   # -> tables/table{1..4}.{md,csv}, figures/fig{1,2,3}_*.png
    analyze("multirun/2025-01-01_12-00-00", table1_epoch=2)   # + report/index.html (lark.analysis.report)

Numbers stay numbers in the table rows (and in the CSVs, at full precision); only the markdown is rounded.
Fractions in metrics.json (accuracy, wins) become percentages here, in columns ending in `_pct`.
"""

import json
import math
import re
from pathlib import Path

import yaml

from lark.analysis.report import write_run_report, write_sweep_report
from lark.analysis.schema import check as check_metrics
from lark.data.io import replacing, write_csv
from lark.rundir import require_complete

TITLES = {
    "table1": "TABLE I: Influence score comparison across data sources",
    "table2": "TABLE II: Influence score evolution during fine-tuning",
    "table3": "TABLE III: Storage requirements for attribution methods",
    "table4": "TABLE IV: Attribution accuracy: LARK (gradient) vs BM25",
    "tracin_cp": "TracIn-CP: run-level influence (learning-rate-weighted sum over checkpoints)",
}
DPI = 120
MARKERS = "osD^vP*X"

# ---------------------------------------------------------------------------------------------- loading


def find_runs(path):
    """label -> run dir. A run dir itself gives {"run": path}; a multirun folder gives one entry per job,
    labelled by the job's Hydra overrides joined with "," (or its folder name when there are none)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    if is_run_dir(root):
        return {"run": root}
    run_dirs = sorted(search_run_dirs(root, depth=3), key=lambda d: natural_key(d.relative_to(root).as_posix()))
    if not run_dirs:
        raise FileNotFoundError(f"no run directory (a folder with attribution/) in {root} or up to 3 levels below")
    runs = {}
    for run_dir in run_dirs:
        label = job_label(run_dir, root)
        if label in runs:  # two jobs with the same overrides: tell them apart by folder
            label = f"{label} ({run_dir.relative_to(root).as_posix()})"
        runs[label] = run_dir
    return runs


def is_run_dir(path):
    return (path / "attribution").is_dir()


def search_run_dirs(folder, depth):
    """Run dirs below `folder`, at most `depth` levels down; hidden folders and run dirs' insides are skipped."""
    found = []
    for child in sorted(folder.iterdir()) if depth > 0 else []:
        if child.is_dir() and not child.name.startswith("."):
            found += [child] if is_run_dir(child) else search_run_dirs(child, depth - 1)
    return found


def natural_key(text):
    """ "job10" sorts after "job9": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def job_label(run_dir, root):
    """The overrides in .hydra/overrides.yaml of the run dir or a folder between it and the root, joined
    with ","; the run dir's path under the root when there are none."""
    relative = run_dir.relative_to(root)
    for folder in [relative, *relative.parents][:-1]:  # [:-1] drops "." (the multirun root itself)
        overrides = root / folder / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            items = yaml.safe_load(overrides.read_text()) or []
            if items:
                return ",".join(str(item) for item in items)
            break
    return relative.as_posix()


def load_metrics(run_dir):
    """All epochs' metrics.json of a run, sorted by epoch. NaN and infinities become None."""
    attribution = Path(run_dir) / "attribution"
    epoch_dirs = [d for d in attribution.glob("epoch_[0-9]*") if d.is_dir()]
    if not epoch_dirs:
        raise FileNotFoundError(f"no epoch_NNN/metrics.json in {attribution}")
    return sorted((read_metrics(d / "metrics.json") for d in epoch_dirs), key=lambda m: m["epoch"])


def read_metrics(file):
    if not file.is_file():
        raise FileNotFoundError(f"missing {file}")
    try:
        metrics = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in {file}: {error}") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(metrics).__name__}")
    metrics = finite(metrics)
    if metrics.get("epoch") is None:
        metrics["epoch"] = int(file.parent.name.removeprefix("epoch_"))
    return check_metrics(metrics, file)


def finite(value):
    """Replace NaN and infinities by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


# ----------------------------------------------------------------------------------------------- tables


def build_tables(runs, table1_epoch="best"):
    """runs: label -> that run's metrics (load_metrics). Returns {"table1": rows, ..., "table4": rows}, each row
    a dict column -> number/str/None. Tables I, III and IV use epoch `table1_epoch` of each run (pick_epoch)."""
    multirun = list(runs) != ["run"]
    tables = {name: [] for name in TITLES if name != "tracin_cp"}  # tracin_cp: analyze() adds it if a run has it
    for job, metrics in runs.items():
        if not metrics:
            raise ValueError(f"run {job!r} has no metrics")
        chosen = pick_epoch(metrics, table1_epoch)
        lead = {"job": job} if multirun else {}
        tables["table1"] += [lead | row for row in source_rows(chosen)]
        tables["table2"] += [lead | row for row in epoch_rows(metrics)]
        tables["table3"] += [lead | row for row in storage_rows(chosen)]
        tables["table4"] += [lead | row for row in method_rows(chosen)]
    return tables


def pick_epoch(metrics, which="best"):
    """The metrics of one epoch: "best" = highest accuracy (ties: the earliest; no accuracy at all: the
    last epoch), "last", or an epoch number."""
    if which == "best":
        scored = [m for m in metrics if m.get("accuracy") is not None]
        return max(scored, key=lambda m: m["accuracy"]) if scored else metrics[-1]
    if which == "last":
        return metrics[-1]
    try:
        epoch = int(which)
    except (TypeError, ValueError):
        raise ValueError(f'table1_epoch must be "best", "last" or an epoch number, got {which!r}') from None
    for m in metrics:
        if m["epoch"] == epoch:
            return m
    raise ValueError(f"epoch {epoch} has no metrics; available epochs: {[m['epoch'] for m in metrics]}")


def pct(fraction):
    return None if fraction is None else 100 * fraction


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def product(a, b):
    return None if a is None or b is None else a * b


def reduced_lr_epochs(metrics):
    """Epochs trained with a learning rate below the run's maximum (the paper's epochs 4-5)."""
    lrs = [m["lr"] for m in metrics if m.get("lr") is not None]
    return [m["epoch"] for m in metrics if m.get("lr") is not None and m["lr"] < max(lrs)]


def source_rows(m):
    """Table I: one row per source at one epoch. FT wins is "-" (None) for the fine-tuning source itself."""
    rows = []
    for name, source in (m.get("sources") or {}).items():
        is_ft = name == m.get("ft_source")
        rows.append(
            {
                "epoch": m["epoch"],
                "source": name,
                "kind": source.get("kind"),
                "formatted": source.get("formatted"),
                "n_docs": source.get("n_docs"),
                "mean_max": source.get("mean_max"),
                "ft_wins_pct": None if is_ft else pct(source.get("ft_wins")),
            }
        )
    return rows


def epoch_rows(metrics):
    """Table II: one row per epoch, with a format_effect_<kind> column per content kind."""
    reduced = reduced_lr_epochs(metrics)
    kinds = dict.fromkeys(kind for m in metrics for kind in (m.get("format_effect") or {}))
    rows = []
    for m in metrics:
        effect = m.get("format_effect") or {}
        rows.append(
            {
                "epoch": m["epoch"],
                "lr": m.get("lr"),
                "reduced_lr": m["epoch"] in reduced,
                "ft": m.get("ft"),
                "pt": m.get("pt"),
                "ratio": m.get("ft_pt_ratio"),
                "pt_wins_pct": pct(m.get("pt_wins")),
                **eval_column(m),
                **{f"format_effect_{kind}": effect.get(kind) for kind in kinds},
            }
        )
    return rows


# Table II's evaluation column per metrics.json `eval.metric` (conf/eval): (column, markdown header, percent?)
EVAL_COLUMNS = {
    "accuracy": ("accuracy_pct", "Acc.", True),
    "exact_match": ("exact_match_pct", "Exact match", True),
    "answer_loss": ("answer_loss", "Answer loss", False),
}


def eval_column(m):
    """{column: value} of the epoch's evaluation (`eval` in metrics.json; runs before it: accuracy)."""
    score = m.get("eval") or {"metric": "accuracy", "value": m.get("accuracy")}
    column, _, percent = EVAL_COLUMNS.get(score["metric"], (score["metric"], score["metric"], False))
    return {column: pct(score["value"]) if percent else score["value"]}


def storage_rows(m):
    """Table III: bytes per example and for all examples, full gradient vs projected, and their ratio."""
    storage = m.get("storage") or {}
    n, k = storage.get("n_examples"), storage.get("k")
    full = storage.get("full_bytes_per_example") or product(storage.get("n_params"), storage.get("grad_dtype_bytes"))
    projected = storage.get("store_bytes_per_example") or product(k, storage.get("store_dtype_bytes"))
    kind = (m.get("projector") or {}).get("kind") or "projected"
    return [
        storage_row("Full gradient (TracIn)", n_examples=n, bytes_per_example=full, bytes_total=product(full, n)),
        storage_row(
            f"LARK ({kind}, k={k})", k=k, n_examples=n, bytes_per_example=projected, bytes_total=product(projected, n)
        ),
        storage_row("Compression ratio (full / projected)", compression=ratio(full, projected)),
    ]


def storage_row(method, k=None, n_examples=None, bytes_per_example=None, bytes_total=None, compression=None):
    return {
        "method": method,
        "k": k,
        "n_examples": n_examples,
        "bytes_per_example": bytes_per_example,
        "bytes_total": bytes_total,
        "compression": compression,
    }


def method_rows(m):
    """Table IV: FT wins (%) of the gradient kernel and of BM25 at one epoch, and their difference."""
    gradient, bm25 = pct(m.get("ft_wins")), pct((m.get("bm25") or {}).get("ft_wins"))
    difference = None if gradient is None or bm25 is None else gradient - bm25
    base = {"epoch": m["epoch"], "pt_source": m.get("pt_source"), "difference_pp": None}
    return [
        base | {"method": "LARK (gradient)", "ft_wins_pct": gradient, "interpretation": "Gradient-based"},
        base | {"method": "BM25", "ft_wins_pct": bm25, "interpretation": "Lexical similarity"},
        base
        | {
            "method": "Difference",
            "ft_wins_pct": None,
            "difference_pp": difference,
            "interpretation": "LARK minus BM25",
        },
    ]


# ------------------------------------------------------------------------------------- writing tables


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


def md_columns(name, rows):
    """(header, row -> cell text) for each markdown column."""
    columns = {
        "table1": [
            ("Data Source", lambda r: r["source"]),
            ("Mean Max", lambda r: fmt(r["mean_max"], ".3f")),
            ("FT Wins", lambda r: fmt(r["ft_wins_pct"], ".1f", "%")),
        ],
        "table2": [
            ("Epoch", epoch_cell),
            ("FT", lambda r: fmt(r["ft"], ".3f")),
            ("PT", lambda r: fmt(r["pt"], ".3f")),
            ("Ratio", lambda r: fmt(r["ratio"], ".2f")),
            ("PT Wins", lambda r: fmt(r["pt_wins_pct"], ".1f", "%")),
            *[
                (header, lambda r, c=column, p=percent: fmt(r.get(c), ".1f" if p else ".3f", "%" if p else ""))
                for column, header, percent in eval_headers(rows)
            ],
            ("lr", lambda r: fmt(r["lr"], "g")),
        ]
        + [
            (f"Format Effect ({key.removeprefix('format_effect_')})", lambda r, key=key: fmt(r.get(key), ".2f", "×"))
            for key in dict.fromkeys(key for row in rows for key in row)
            if key.startswith("format_effect_")
        ],
        "table3": [
            ("Method", lambda r: r["method"]),
            ("Examples", lambda r: fmt(r["n_examples"], ",.0f")),
            ("Per Example", lambda r: format_bytes(r["bytes_per_example"])),
            ("All Examples", lambda r: format_bytes(r["bytes_total"])),
            ("Compression", lambda r: fmt(r["compression"], ",.0f", "×")),
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
    }[name]
    if name in ("table1", "table4") and len({row["epoch"] for row in rows}) > 1:
        columns = [("Epoch", lambda r: str(r["epoch"]))] + columns
    if rows and "job" in rows[0]:
        columns = [("Job", lambda r: str(r["job"]))] + columns
    return columns


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
    }
    return known + [(key, key, False) for key in present if key not in columns and not key.startswith("format_")]


def fmt(value, spec, unit=""):
    return "-" if value is None else f"{value:{spec}}{unit}"


def epoch_cell(row):
    """ "0 (base)" for the base model, "4*" for an epoch trained at a reduced learning rate."""
    return f"{row['epoch']}{'*' if row['reduced_lr'] else ''}{' (base)' if row['epoch'] == 0 else ''}"


def table4_cell(row):
    if row["method"] == "Difference":
        return fmt(row["difference_pp"], "+.1f", " pp")
    return fmt(row["ft_wins_pct"], ".1f", "%")


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


def footnotes(name, rows):
    if name == "table2":
        return lr_footnotes(rows)
    if name == "table3":
        return ["KB, MB, GB, TB = 10^3, 10^6, 10^9, 10^12 bytes; KiB, MiB, GiB, TiB = 2^10, 2^20, 2^30, 2^40 bytes."]
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


# ---------------------------------------------------------------------------------------------- figures


def plot_figures(runs, out_dir, table1_epoch="best"):
    """fig1_influence.png, fig2_pt_wins.png, fig3_method.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "fig1_influence.png", out_dir / "fig2_pt_wins.png", out_dir / "fig3_method.png"]
    plot_influence(runs, paths[0])
    plot_pt_wins(runs, paths[1])
    plot_method(runs, paths[2], table1_epoch)
    return paths


def new_figure(n_panels):
    from matplotlib.figure import Figure  # renders with Agg, no pyplot state, no display needed

    figure = Figure(figsize=(6.5 * n_panels, 4.5), layout="constrained")
    axes = figure.subplots(1, n_panels)
    return figure, list(axes) if n_panels > 1 else [axes]


def finish(ax, title, ylabel, xlabel="Epoch", legend_loc="best"):
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if xlabel == "Epoch":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc=legend_loc)


def series(metrics, get):
    """(epochs, values) of get(metrics) over epochs, skipping None values."""
    points = [(m["epoch"], get(m)) for m in metrics]
    points = [(epoch, value) for epoch, value in points if value is not None]
    return [p[0] for p in points], [p[1] for p in points]


def mean_max(name):
    return lambda m: ((m.get("sources") or {}).get(name) or {}).get("mean_max")


def plot_influence(runs, path):
    """Fig. 1: mean max influence vs epoch. (A) formatted sources incl. the fine-tuning source, (B) raw sources
    with the fine-tuning source dashed for reference. Colour = source, marker = run."""
    figure, (ax_format, ax_raw) = new_figure(2)
    names = list(dict.fromkeys(name for metrics in runs.values() for m in metrics for name in m.get("sources") or {}))
    for j, (job, metrics) in enumerate(runs.items()):
        ft_source = next((m["ft_source"] for m in metrics if m.get("ft_source")), None)
        formatted = {name: s.get("formatted") for m in metrics for name, s in (m.get("sources") or {}).items()}
        for name in formatted:
            epochs, values = series(metrics, mean_max(name))
            label = name if len(runs) == 1 else f"{job}: {name}"
            style = {"color": f"C{names.index(name) % 10}", "marker": MARKERS[j % len(MARKERS)]}
            if name == ft_source or formatted[name] is True:
                ax_format.plot(epochs, values, label=label, **style)
            if name == ft_source:
                ax_raw.plot(epochs, values, linestyle="--", alpha=0.6, label=f"{label} (reference)", **style)
            elif formatted[name] is not True:
                ax_raw.plot(epochs, values, label=label, **style)
    finish(ax_format, "(A) Formatted sources", "Mean max influence")
    finish(ax_raw, "(B) Raw (noformat) sources", "Mean max influence")
    figure.suptitle("Influence scores across training epochs")
    save_figure(figure, path)


def plot_pt_wins(runs, path):
    """Fig. 2: PT wins (%) vs epoch, one line per run; epochs trained at a reduced learning rate are shaded."""
    figure, (ax,) = new_figure(1)
    for j, (job, metrics) in enumerate(runs.items()):
        color = f"C{j % 10}"
        epochs, values = series(metrics, lambda m: pct(m.get("pt_wins")))
        ax.plot(epochs, values, marker="o", color=color, label="PT wins" if len(runs) == 1 else job)
        shade_label = "lower learning rate" if len(runs) == 1 else f"{job}: lower learning rate"
        for i, epoch in enumerate(reduced_lr_epochs(metrics)):
            ax.axvspan(
                epoch - 0.5, epoch + 0.5, color=color, alpha=0.12, linewidth=0, label=shade_label if i == 0 else None
            )
    ax.set_ylim(bottom=0)
    finish(ax, "Pretraining influence during fine-tuning", "PT wins (% of test queries)")
    save_figure(figure, path)


def plot_method(runs, path, table1_epoch="best"):
    """Fig. 3: (A) storage per example, full gradient vs projected (log scale, ratio annotated); (B) FT wins (%)
    of the gradient kernel vs BM25 at the Table I epoch. One pair of bars per run."""
    figure, (ax_storage, ax_wins) = new_figure(2)
    chosen = {job: pick_epoch(metrics, table1_epoch) for job, metrics in runs.items()}
    storage = [storage_rows(m) for m in chosen.values()]
    sizes = [row["bytes_per_example"] for rows in storage for row in rows[:2] if row["bytes_per_example"]]
    width = 0.38
    for i, (full, projected, compression) in enumerate(storage):
        bar_pair(
            ax_storage,
            i,
            width,
            [full["bytes_per_example"], projected["bytes_per_example"]],
            ["Full gradient (TracIn)", "LARK (projected)"],
            first=i == 0,
            text=format_bytes_short,
        )
        if compression["compression"] is not None:
            ax_storage.annotate(f"{compression['compression']:,.0f}× smaller", (i, max(sizes) * 4), ha="center")
    for i, m in enumerate(chosen.values()):
        gradient, bm25, difference = method_rows(m)
        bar_pair(
            ax_wins,
            i,
            width,
            [gradient["ft_wins_pct"], bm25["ft_wins_pct"]],
            ["LARK (gradient)", "BM25"],
            first=i == 0,
            text=lambda v: f"{v:.1f}%",
        )
        if difference["difference_pp"] is not None:
            ax_wins.annotate(f"{difference['difference_pp']:+.1f} pp", (i, 106), ha="center")
    ax_storage.set_yscale("log")
    if sizes:
        ax_storage.set_ylim(min(sizes) / 10, max(sizes) * 10_000)
    ax_wins.set_ylim(0, 130)
    single = len(runs) == 1
    ax_storage.set_xticks(
        range(len(runs)), [f"k = {rows[1]['k']}" if single else job for job, rows in zip(runs, storage)]
    )
    ax_wins.set_xticks(
        range(len(runs)),
        [f"epoch {m['epoch']}" if single else f"{job}\n(epoch {m['epoch']})" for job, m in chosen.items()],
    )
    finish(ax_storage, "(A) Storage per example", "Bytes per example (log scale)", xlabel="", legend_loc="upper center")
    finish(ax_wins, "(B) Attribution accuracy", "FT wins (% of test queries)", xlabel="", legend_loc="upper center")
    figure.suptitle("LARK vs full-gradient storage (TracIn) and lexical attribution (BM25)")
    save_figure(figure, path)


def save_figure(figure, path):
    """A PNG written to a temporary name and renamed (lark.data.io.replacing)."""
    with replacing(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")


def bar_pair(ax, x, width, values, labels, first, text):
    """Two bars side by side at x (None values skipped), each labelled with text(value)."""
    for offset, value, label, color in zip((-width / 2, width / 2), values, labels, ("C3", "C0")):
        if value is not None:
            bars = ax.bar(x + offset, value, width, color=color, label=label if first else None)
            ax.bar_label(bars, [text(value)], fontsize="small")


def format_bytes_short(n):
    return scale_bytes(n, 1024, "KiB MiB GiB TiB PiB")


def loss_target_caption(runs):
    """What carried the loss of fine-tuning items and of queries (metrics.json loss_target), per run."""
    parts = []
    for job, metrics in runs.items():
        targets = {json.dumps(m["loss_target"], sort_keys=True) for m in metrics if m.get("loss_target")}
        for target in map(json.loads, sorted(targets)):
            prefix = "" if job == "run" else f"{job}: "
            parts.append(f"{prefix}answer `{target.get('answer_template')}`, queries `{target.get('query_target')}`")
    return f"Loss target: {'; '.join(parts)}." if parts else None


def tracin_rows(run_dirs):
    """TracIn-CP rows (attribution/tracin_cp/metrics.json, attribution/kernel=tracin_cp): one per run and source."""
    rows = []
    for job, run_dir in run_dirs.items():
        file = Path(run_dir) / "attribution" / "tracin_cp" / "metrics.json"
        if file.is_file():  # the run-level score's own metrics (epoch "all": not an epoch's metrics.json schema)
            m = json.loads(file.read_text())
            lead = {} if list(run_dirs) == ["run"] else {"job": job}
            rows += [lead | row | {"epochs": ", ".join(map(str, m["epochs"]))} for row in source_rows(m)]
    return rows


# ---------------------------------------------------------------------------------------------- analyze


def analyze(path, out_dir=None, table1_epoch="best", report=True, snippet_chars=280):
    """Tables (out_dir/tables), figures (out_dir/figures) and, with `report`, the browsable page
    out_dir/report/index.html (lark.analysis.report) of a run or multirun folder; out_dir defaults to `path`.
    Returns {"tables", "table_files", "figure_files", "report" (a path or None), "runs"}."""
    run_dirs = find_runs(path)
    for run_dir in run_dirs.values():
        require_complete(run_dir)
    runs = {label: load_metrics(run_dir) for label, run_dir in run_dirs.items()}
    out_dir = Path(path if out_dir is None else out_dir)
    tables = build_tables(runs, table1_epoch)
    tracin = tracin_rows(run_dirs)
    if tracin:
        tables["tracin_cp"] = tracin
    captions = {"table2": loss_target_caption(runs)}
    result = {
        "tables": tables,
        "table_files": write_tables(tables, out_dir / "tables", captions),
        "figure_files": plot_figures(runs, out_dir / "figures", table1_epoch),
        "report": None,
        "runs": run_dirs,
    }
    if report:
        chosen = {label: pick_epoch(metrics, table1_epoch) for label, metrics in runs.items()}
        result["report"] = (
            write_run_report(run_dirs["run"], runs["run"], out_dir, chosen["run"]["epoch"], snippet_chars)
            if list(runs) == ["run"]
            else write_sweep_report(path, run_dirs, runs, chosen, out_dir, snippet_chars)
        )
    return result
