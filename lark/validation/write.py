"""Writing Table V: tables/table5.md (rounded, with notes on what each column measures), tables/table5.csv (full
precision) and figures/fig5_validation.png, from validate_run's result (lark.validation.table5).

    files = write_table5(result, run_dir / "tables")   # -> [table5.md, table5.csv]
    plot_validation(result, run_dir / "figures" / "fig5_validation.png")
"""

from pathlib import Path

from lark.analysis.figures import MARKERS, finish, new_figure, save_figure
from lark.analysis.markdown import fmt
from lark.data.io import replacing, write_csv
from lark.validation import lds

COLUMNS = [
    ("pt_recall@1", "PT R@1"),
    ("pt_recall@10", "PT R@10"),
    ("pt_mrr", "PT MRR"),
    ("ft_recall@1", "FT R@1"),
    ("ft_recall@10", "FT R@10"),
    ("ft_mrr", "FT MRR"),
    ("canary_p@n", "Canary P@n"),
    ("canary_auprc", "Canary AUPRC"),
    ("lds", "LDS"),
]


def write_table5(result, out_dir):
    """tables/table5.md (rounded) and table5.csv (full precision)."""
    rows = result["rows"]
    present = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    by_projector = "projectors" in result  # validate.projectors given: a Projector column
    lines = [
        "### Table V: Attribution quality (higher is better; random = chance)",
        "",
        "| Method | "
        + ("Projector | " if by_projector else "")
        + "Epoch | "
        + " | ".join(h for _, h in present)
        + " | Time (s) |",
        "|---|---|" + "---|" * (len(present) + by_projector) + "---|",
    ]
    lines += [markdown_row(r, [key for key, _ in present], by_projector) for r in rows]
    lines += ["", notes(result)]
    out_dir = Path(out_dir)
    with replacing(out_dir / "table5.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_csv(out_dir / "table5.csv", rows)
    return [out_dir / "table5.md", out_dir / "table5.csv"]


def markdown_row(r, keys, by_projector=False):
    """One method's line: its projector (by_projector; "-" for the baselines), its numbers (LDS with its interval)
    to 3 decimals, its seconds to whole ones."""
    cells = []
    for key in keys:
        cell = fmt(r.get(key), ".3f")
        if key == "lds" and r.get("lds_low") is not None:
            cell += f" [{r['lds_low']:.3f}, {r['lds_high']:.3f}]"
        cells.append(cell)
    projector = f"{r.get('projector') or '-'} | " if by_projector else ""
    return f"| {r['method']} | {projector}{r['epoch']} | " + " | ".join(cells) + f" | {fmt(r.get('seconds'), '.0f')} |"


def notes(result):
    """The paragraph under Table V: the pool, the canary's backdoor rate and the LDS setup of this result."""
    parts = []
    if result.get("projectors"):
        parts.append(
            "Projector: each kernel's vectors from that attribution/projector config (the run's own, or "
            "conf/attribution/projector/<name>.yaml at the run's k): "
            + ", ".join(f"{name} k = {fmt(k, ',')}" for name, k in result["projectors"].items())
            + "."
        )
    if result.get("projector_seed") is not None:
        parts.append(
            f"A second draw (validate.projector_seed): every projector with a seed drawn with seed "
            f"{result['projector_seed']} instead of its config's."
        )
    if result["n_pool"]:
        pool = result["pool"]
        how = (
            "every abstract of the world"
            if pool["kind"] == "all"
            else f"the provenance abstracts plus {pool['size']} others drawn with seed {pool['seed']}"
        )
        parts.append(
            f"PT: the {result['n_pool']} candidate abstracts are {how} ({pool['format']}); FT: all "
            f"{result['n_train']} fine-tuning items. R@k = share of a question's provenance documents in "
            f"its top k; MRR = 1/rank of the first. "
            f"{100 * result['only_pretraining_share']:.0f}% of the questions have their fact only in "
            "pretraining (no FT provenance; left out of the FT columns)."
        )
    if result["backdoor"]:
        last = result["backdoor"][max(result["backdoor"])]
        parts.append(
            f"Canary: P@n and AUPRC of the planted items among all fine-tuning items for the {last['n']} "
            f"triggered queries; backdoor rate at the last checkpoint {100 * last['triggered']:.0f}% "
            f"(same questions without the trigger: {100 * last['untriggered']:.0f}%)."
        )
    if result["lds"]:
        parts.append(
            f"LDS: {result['lds']['n_subsets']} retrains on {result['lds']['fraction']:.0%} subsets, "
            f"Spearman of the summed scores with -loss, mean over queries [{result['lds'].get('level', lds.LEVEL):.0%} "
            "bootstrap interval]; "
            f"retrains took {result['timing_s'].get('lds_retrains', 0):.0f} s (shared by every row)."
        )
    parts.append("Time: seconds for that row's method over all checkpoints (TracIn-CP reuses its kernel's).")
    return " ".join(parts)


def plot_validation(result, path):
    """One panel per check: each kernel's number over the checkpoints (one colour per method; with several
    projectors one line each, the projectors after the first dotted), BM25 and random as horizontal lines; one
    legend for all panels, right of them (with a dozen lines a legend inside a panel would cover its data)."""
    keys = [
        (k, h)
        for k, h in (
            ("pt_mrr", "Provenance MRR (pretraining)"),
            ("ft_mrr", "Provenance MRR (fine-tuning)"),
            ("canary_auprc", "Canary AUPRC"),
            ("lds", "LDS"),
        )
        if any(r.get(k) is not None for r in result["rows"])
    ]
    projectors = list(result.get("projectors") or [])
    figure, axes = new_figure(max(1, len(keys)))
    for ax, (key, title) in zip(axes, keys):
        methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
        for method, projector in dict.fromkeys((r["method"], r.get("projector")) for r in result["rows"]):
            rows = [
                r
                for r in result["rows"]
                if (r["method"], r.get("projector")) == (method, projector) and r.get(key) is not None
            ]
            if not rows:
                continue
            i = methods.index(method)
            label = method if projector is None else f"{method} ({projector})"
            if isinstance(rows[0]["epoch"], int):
                style = ":" if projector in projectors[1:] else "-"
                x, y = [r["epoch"] for r in rows], [r[key] for r in rows]
                ax.plot(x, y, marker=MARKERS[i % 8], linestyle=style, color=f"C{i % 10}", label=label)
            else:
                ax.axhline(rows[0][key], linestyle="--", color=f"C{i % 10}", label=label)
        finish(ax, title, title, legend_loc=None)
    shown = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(label, handle)
    if shown:
        figure.legend(shown.values(), shown.keys(), loc="outside right upper", fontsize="small")
    save_figure(figure, path)
    return path
