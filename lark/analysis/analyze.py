"""Section IV of the paper from saved metrics: Tables I-IV and Figures 1-3 (and the report page), the one entry point
of the analysis wing (analyze.py, and the end of train.py through lark.experiment).

A run directory holds attribution/epoch_NNN/metrics.json, one per attributed checkpoint (epoch 0 = the base
model). A Hydra multirun folder holds numbered job folders, each a run directory; its tables get a leading
`job` column (the job's overrides) and its figures one line per job.

    analyze("outputs/train/2025-01-01_12-00-00")   # -> tables/table{1..4}.{md,csv}, figures/fig{1,2,3}_*.png
    analyze("multirun/2025-01-01_12-00-00", table1_epoch=2)   # + report/index.html (lark.analysis.report)

Numbers stay numbers in the table rows (and in the CSVs, at full precision); only the markdown is rounded.
Fractions in metrics.json (accuracy, wins) become percentages here, in columns ending in `_pct`.

The wing, in the order a run's analysis walks it: runs.py (finding runs, reading metrics.json), tables.py (the rows),
markdown.py (the table files), figures.py, report_data.py + report.py (the page); metrics.py (the paper's metrics,
computed at attribution time) and schema.py (metrics.json's schema).
"""

from pathlib import Path

from lark.analysis.figures import plot_figures
from lark.analysis.markdown import write_tables
from lark.analysis.report import job_out_dir, write_run_report, write_sweep_report
from lark.analysis.runs import choose_epoch, epoch_caption, find_runs, load_metrics
from lark.analysis.tables import build_tables, loss_target_caption, tracin_rows
from lark.rundir import require_complete


def analyze(path, out_dir=None, table1_epoch="best", report=True, snippet_chars=280):
    """Tables (out_dir/tables), figures (out_dir/figures) and, with `report`, the browsable page
    out_dir/report/index.html (lark.analysis.report) of a run or multirun folder; out_dir defaults to `path`.
    A sweep's jobs get theirs (with `report`) under out_dir at the job's path in the sweep, out_dir/<job>/...
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
    captions = {"table1": epoch_caption(runs, table1_epoch), "table2": loss_target_caption(runs)}
    result = {
        "tables": tables,
        "table_files": write_tables(tables, out_dir / "tables", captions),
        "figure_files": plot_figures(runs, out_dir / "figures", table1_epoch),
        "report": None,
        "runs": run_dirs,
    }
    if report:
        result["report"] = write_report(path, run_dirs, runs, out_dir, table1_epoch, snippet_chars)
    return result


def write_report(path, run_dirs, runs, out_dir, table1_epoch, snippet_chars):
    """The run's page, or a sweep's comparison page and each job's own page; returns the page's path."""
    chosen = {label: choose_epoch(metrics, table1_epoch, label) for label, metrics in runs.items()}
    epochs, rules = {label: c[0] for label, c in chosen.items()}, {label: c[1] for label, c in chosen.items()}
    if list(runs) == ["run"]:
        return write_run_report(
            run_dirs["run"], runs["run"], out_dir, epochs["run"]["epoch"], snippet_chars, rule=rules["run"]
        )
    for run_dir in run_dirs.values():  # each job's page embeds its own tables and figures: made now, at this rule
        analyze(run_dir, job_out_dir(path, run_dir, out_dir), table1_epoch=table1_epoch, report=False)
    return write_sweep_report(path, run_dirs, runs, epochs, out_dir, snippet_chars, rules)
