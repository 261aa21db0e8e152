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

from omegaconf import OmegaConf

from lark.analysis.figures import plot_figures
from lark.analysis.markdown import write_tables
from lark.analysis.report import job_out_dir, write_run_report, write_sweep_report
from lark.analysis.report_data import run_data
from lark.analysis.runs import choose_epoch, epoch_caption, find_runs, load_metrics
from lark.analysis.tables import build_tables, loss_target_caption, tracin_rows
from lark.errors import ConfigError, RunDirError
from lark.legacy import CONF
from lark.legacy import load as saved_config
from lark.rundir import require_complete

SETTINGS = {"table1_epoch": "table1_epoch", "report": "report", "snippet_chars": "report_snippet_chars"}


def run_analysis(run_dir):
    """A run's analysis.* config: its saved one, or (a folder without .hydra/config.yaml) the shipped defaults."""
    try:
        return saved_config(run_dir).analysis
    except RunDirError:
        return OmegaConf.load(CONF / "analysis" / "default.yaml")


def own_settings(path, **given):
    """analyze()'s table1_epoch, report and snippet_chars: each given one that is not None, else the run's own
    analysis.* (analysis.table1_epoch, .report, .report_snippet_chars of its saved config), so analyze.py and
    attribute.py show a run as train.py did. A sweep's jobs must agree on a key not given (else a ConfigError
    naming it)."""
    settings = {name: given[name] for name in SETTINGS if given.get(name) is not None}
    if len(settings) == len(SETTINGS):
        return settings
    configs = {label: run_analysis(run_dir) for label, run_dir in find_runs(path).items()}
    for name, key in [(n, k) for n, k in SETTINGS.items() if n not in settings]:
        values = {label: cfg[key] for label, cfg in configs.items()}
        if len(set(map(str, values.values()))) > 1:
            raise ConfigError(f"{name}: the sweep's jobs differ in analysis.{key} ({values}); pass {name}=<value>")
        settings[name] = next(iter(values.values()))
    return settings


def analyze(path, out_dir=None, table1_epoch="best", report=True, snippet_chars=280, title=None):
    """Tables (out_dir/tables), figures (out_dir/figures) and, with `report`, the browsable page
    out_dir/report/index.html (lark.analysis.report; `title`: its title) of a run or multirun folder; out_dir
    defaults to `path`. A sweep's jobs get theirs (with `report`) under out_dir at the job's path in the sweep.
    Every file a run's outputs come from is read before the first of them is written: a corrupt one fails naming
    itself and leaves that run's outputs as they were (a sweep's jobs go one by one, its comparison last).
    Returns {"tables", "table_files", "figure_files", "report" (a path or None), "runs"}."""
    run_dirs = find_runs(path)
    for run_dir in run_dirs.values():
        require_complete(run_dir)
    runs = {label: load_metrics(run_dir) for label, run_dir in run_dirs.items()}
    out_dir = Path(path if out_dir is None else out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # before anything is written: tables/ could not be made in it
        raise ConfigError(f"out_dir={out_dir}: is a file, not a folder; name a folder (made if missing)")
    chosen = {label: choose_epoch(metrics, table1_epoch, label) for label, metrics in runs.items()}
    tables = build_tables(runs, table1_epoch)
    tracin = tracin_rows(run_dirs)
    if tracin:
        tables["tracin_cp"] = tracin
    captions = {"table1": epoch_caption(runs, table1_epoch), "table2": loss_target_caption(runs)}
    sweep = list(runs) != ["run"]
    pages, data = {}, None
    if report and sweep:  # each job's page embeds its own tables and figures: made now, at this rule
        for label, run_dir in run_dirs.items():
            job_out = job_out_dir(path, run_dir, out_dir)
            pages[label] = analyze(run_dir, job_out, table1_epoch, True, snippet_chars, f"LARK sweep job {label}")
    elif report:
        data = run_data(run_dirs["run"], runs["run"], chosen["run"][0]["epoch"], snippet_chars)
    result = {
        "tables": tables,
        "table_files": write_tables(tables, out_dir / "tables", captions),
        "figure_files": plot_figures(runs, out_dir / "figures", table1_epoch),
        "report": None,
        "runs": run_dirs,
    }
    if report and sweep:
        epochs = {label: c[0] for label, c in chosen.items()}
        result["report"] = write_sweep_report(
            path, run_dirs, {k: p["report"] for k, p in pages.items()}, epochs, out_dir
        )
    elif report:
        epoch, rule = chosen["run"][0]["epoch"], chosen["run"][1]
        result["report"] = write_run_report(
            run_dirs["run"], runs["run"], out_dir, epoch, title=title, rule=rule, data=data
        )
    return result
