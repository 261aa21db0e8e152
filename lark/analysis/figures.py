"""Figures 1-3 of the paper from the runs' metrics (lark.analysis.runs.load_metrics), and the figure helpers Table V's
figure shares (lark.validation.write). One line (or pair of bars) per run of a multirun.

    plot_figures({"run": metrics}, "run/figures")   # -> fig1_influence.png, fig2_pt_wins.png, fig3_method.png
"""

from pathlib import Path

from lark.analysis.markdown import scale_bytes
from lark.analysis.runs import pick_epoch, reduced_lr_epochs
from lark.analysis.tables import method_rows, pct, storage_rows
from lark.data.io import replacing

DPI = 120
MARKERS = "osD^vP*X"


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
    if legend_loc and ax.get_legend_handles_labels()[0]:  # legend_loc=None: the caller draws one for the figure
        ax.legend(fontsize="small", loc=legend_loc)


def save_figure(figure, path):
    """A PNG written to a temporary name and renamed (lark.data.io.replacing)."""
    with replacing(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")


def series(metrics, get):
    """(epochs, values) of get(metrics) over epochs, skipping None values."""
    points = [(m["epoch"], get(m)) for m in metrics]
    points = [(epoch, value) for epoch, value in points if value is not None]
    return [p[0] for p in points], [p[1] for p in points]


def source_mean_max(name):
    """metrics -> the mean max influence of source `name` (None when the epoch lacks it)."""
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
            epochs, values = series(metrics, source_mean_max(name))
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
    values = [v for m in runs.values() for v in series(m, lambda m: pct(m.get("pt_wins")))[1]]
    ax.set_ylim(0, max([5.0, *values]) * 1.1)  # all PT wins 0: an axis to 5.5%, not matplotlib's 0-0.055%
    finish(ax, "Pretraining influence during fine-tuning", "PT wins (% of test queries)")
    save_figure(figure, path)


def plot_method(runs, path, table1_epoch="best"):
    """Fig. 3: (A) storage per example, full gradient vs projected (log scale, ratio annotated); (B) FT wins (%)
    of the gradient kernel vs BM25 at the Table I epoch. One pair of bars per run."""
    figure, (ax_storage, ax_wins) = new_figure(2)
    chosen = {job: pick_epoch(metrics, table1_epoch, job) for job, metrics in runs.items()}
    storage = [storage_rows(m) for m in chosen.values()]
    plot_storage(ax_storage, storage)
    plot_wins(ax_wins, list(chosen.values()))
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


BAR_WIDTH = 0.38


def plot_storage(ax, storage):
    """Fig. 3 (A): per run (storage_rows), full vs projected bytes per example on a log scale, ratio above."""
    sizes = [row["bytes_per_example"] for rows in storage for row in rows[:2] if row["bytes_per_example"]]
    for i, (full, projected, compression) in enumerate(storage):
        values = [full["bytes_per_example"], projected["bytes_per_example"]]
        labels = ["Full gradient (TracIn)", "LARK (projected)"]
        bar_pair(ax, i, values, labels, i == 0, format_bytes_short, colors=(OTHER, LARK))
        ratio = compression["compression"]
        if ratio is not None:  # Table III's format; a projection bigger than the gradient is "larger"
            shown = f"{ratio:,.0f}× smaller" if ratio >= 10 else f"{ratio:.2g}× smaller" if ratio >= 1 else None
            shown = shown or f"{1 / ratio:.2g}× larger"
            ax.annotate(shown, (i, max(sizes) * 4), ha="center")
    ax.set_yscale("log")
    if sizes:
        ax.set_ylim(min(sizes) / 10, max(sizes) * 10_000)


def plot_wins(ax, chosen):
    """Fig. 3 (B): per run (its Table I epoch's metrics), FT wins (%) of the gradient kernel vs BM25."""
    for i, m in enumerate(chosen):
        gradient, bm25, difference = method_rows(m)
        values = [gradient["ft_wins_pct"], bm25["ft_wins_pct"]]
        bar_pair(ax, i, values, ["LARK (gradient)", "BM25"], i == 0, lambda v: f"{v:.1f}%", colors=(LARK, OTHER))
        if difference["difference_pp"] is not None:
            ax.annotate(f"{difference['difference_pp']:+.1f} pp", (i, 106), ha="center")
    ax.set_ylim(0, 130)


LARK, OTHER = "C0", "C7"  # LARK's bars keep one colour in both panels of Fig. 3; the method it is compared with grey


def bar_pair(ax, x, values, labels, first, text, colors):
    """Two bars side by side at x (None values skipped) in `colors`, each labelled with text(value); legend labels
    only on the first pair."""
    for offset, value, label, color in zip((-BAR_WIDTH / 2, BAR_WIDTH / 2), values, labels, colors):
        if value is not None:
            bars = ax.bar(x + offset, value, BAR_WIDTH, color=color, label=label if first else None)
            ax.bar_label(bars, [text(value)], fontsize="small")


def format_bytes_short(n):
    return scale_bytes(n, 1024, "KiB MiB GiB TiB PiB")
