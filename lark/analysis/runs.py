"""Finding the runs to analyse and reading their metrics.

A run directory holds attribution/epoch_NNN/metrics.json, one per attributed checkpoint (epoch 0 = the base
model). A Hydra multirun folder holds numbered job folders, each a run directory, labelled by the job's overrides.

    find_runs("multirun/2025-01-01_12-00-00")   # -> {"format=chatml": Path(.../0), "format=noformat": ...}
    load_metrics(run_dir)                        # -> [metrics.json dict of epoch 0, of epoch 1, ...]
"""

import json
import re
from pathlib import Path

from lark.analysis import metrics as M
from lark.analysis.schema import check as check_metrics
from lark.data.io import read_yaml
from lark.errors import ConfigError, CorruptFile, RunDirError


def find_runs(path):
    """label -> run dir. A run dir itself gives {"run": path}; a multirun folder gives one entry per job,
    labelled by the job's Hydra overrides joined with ",", less those every job shares (`-m format=chatml,noformat
    seed=0` gives "format=chatml" and "format=noformat"); by its folder name when none are left."""
    root = Path(path)
    if not root.is_dir():
        raise RunDirError(f"{root} is not a directory")
    if is_run_dir(root):
        return {"run": root}
    run_dirs = sorted(search_run_dirs(root, depth=3), key=lambda d: natural_key(d.relative_to(root).as_posix()))
    if not run_dirs:
        raise RunDirError(f"no run directory (a folder with attribution/) in {root} or up to 3 levels below")
    unfinished = [d for d in search_run_dirs(root, depth=3, job=True) if not is_run_dir(d)]
    if unfinished:  # a sweep's job that failed or is still running: never left out of the comparison silently
        names = ", ".join(d.relative_to(root).as_posix() for d in unfinished)
        raise RunDirError(
            f"{root}: job(s) {names} have no attribution/ (failed, or still running): finish them (train.py "
            "... hydra.sweep.dir=<sweep> resume=true), or move them out of the sweep to compare the others"
        )
    overrides = {run_dir: job_overrides(run_dir, root) for run_dir in run_dirs}
    shared = set.intersection(*map(set, overrides.values())) if len(run_dirs) > 1 else set()
    runs = {}
    for run_dir in run_dirs:
        label = ",".join(item for item in overrides[run_dir] if item not in shared)
        label = label or run_dir.relative_to(root).as_posix()
        if label in runs:  # two jobs with the same overrides: tell them apart by folder
            label = f"{label} ({run_dir.relative_to(root).as_posix()})"
        runs[label] = run_dir
    return runs


def is_run_dir(path):
    return (path / "attribution").is_dir()


def search_run_dirs(folder, depth, job=False):
    """Run dirs below `folder`, at most `depth` levels down; hidden folders and run dirs' insides are skipped.
    job: also the folders Hydra ran a job in (a .hydra/ folder) that hold no run."""
    found = []
    for child in sorted(folder.iterdir()) if depth > 0 else []:
        if child.is_dir() and not child.name.startswith("."):
            hit = is_run_dir(child) or (job and (child / ".hydra").is_dir())
            found += [child] if hit else search_run_dirs(child, depth - 1, job)
    return found


def natural_key(text):
    """ "job10" sorts after "job9": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def job_overrides(run_dir, root):
    """The overrides in .hydra/overrides.yaml of the run dir or the nearest folder between it and the root, as
    strings; [] when there are none."""
    relative = run_dir.relative_to(root)
    for folder in [relative, *relative.parents][:-1]:  # [:-1] drops "." (the multirun root itself)
        if (root / folder / ".hydra" / "overrides.yaml").is_file():
            return read_overrides(root / folder)
    return []


def read_overrides(run_dir):
    """The overrides in a run's .hydra/overrides.yaml as strings ([] without the file)."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in shaped(read_yaml(path) or [], list, path)] if path.is_file() else []


def shaped(value, kind, path):
    """`value` when it is a `kind` (a config: a mapping; overrides: a list), else a RunDirError naming the file."""
    if not isinstance(value, kind):
        what = "mapping" if kind is dict else "list"
        raise RunDirError(f"{path}: must hold a {what}, got {type(value).__name__}; restore the file")
    return value


def load_metrics(run_dir):
    """All epochs' metrics.json of a run, sorted by epoch. NaN and infinities become None."""
    attribution = Path(run_dir) / "attribution"
    epoch_dirs = [d for d in attribution.glob("epoch_[0-9]*") if d.is_dir()]
    if not epoch_dirs:
        raise RunDirError(f"no epoch_NNN/metrics.json in {attribution}")
    return sorted((read_metrics(d / "metrics.json") for d in epoch_dirs), key=lambda m: m["epoch"])


def read_metrics(file):
    """One metrics.json, NaN and infinities as None, checked against lark.analysis.schema."""
    if not file.is_file():
        raise RunDirError(f"missing {file}")
    metrics = M.clean(read_json_object(file))
    if metrics.get("epoch") is None:
        metrics["epoch"] = int(file.parent.name.removeprefix("epoch_"))
    return check_metrics(metrics, file)


def read_json_object(file):
    """The JSON object in `file`; CorruptFile naming the file when it is not one (torn, truncated, not UTF-8)."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFile(f"invalid JSON in {file}: {error}") from error
    if not isinstance(value, dict):
        raise CorruptFile(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def evaluation(m):
    """(metric, value, higher_is_better) of one epoch's test evaluation (metrics.json `eval`; runs before it had
    only `accuracy`). value is None where the epoch was not evaluated."""
    score = m.get("eval") or {"metric": "accuracy", "value": m.get("accuracy"), "higher_is_better": True}
    return score.get("metric", "accuracy"), score.get("value"), score.get("higher_is_better", True)


def shown(metric, value):
    """A test metric's value as the tables show it: accuracy and exact match in percent, others as numbers."""
    return f"{100 * value:.1f}%" if metric in ("accuracy", "exact_match") else f"{value:.4g}"


def choose_epoch(metrics, which="best", job=None):
    """(the metrics of one epoch, the rule that chose it, in words). "best" follows the evaluation: the highest
    accuracy / exact match, the lowest answer loss; epochs that tie for best: the earliest of them; every epoch
    tied (e.g. exact match 0 at all of them): the last epoch, the model as fine-tuned, and the rule says so; no
    evaluation at all: the last epoch. "last", or an epoch number, choose that epoch. job: the sweep job's label
    (find_runs), named in the error of an epoch that job lacks ("run", None: a single run)."""
    if which == "best":
        scored = [(m, *evaluation(m)) for m in metrics if evaluation(m)[1] is not None]
        if not scored:
            return metrics[-1], "the last epoch (no test evaluation)"
        metric, higher = scored[0][1], scored[0][3]
        best = (max if higher else min)(value for _, _, value, _ in scored)
        tied = [m for m, _, value, _ in scored if value == best]
        if len(tied) == len(scored) > 1:
            return scored[-1][0], f"every epoch ties at {metric} {shown(metric, best)}: the last epoch"
        word = "highest" if higher else "lowest"
        return tied[0], f"the {word} test {metric} ({shown(metric, best)}; ties: the earliest epoch)"
    if which == "last":
        return metrics[-1], "the last epoch (table1_epoch=last)"
    try:
        epoch = int(which)
    except (TypeError, ValueError):
        raise ConfigError(
            f'table1_epoch (train.py: analysis.table1_epoch) must be "best", "last" or an epoch number, got {which!r}'
        ) from None
    for m in metrics:
        if m["epoch"] == epoch:
            return m, f"epoch {epoch} (table1_epoch={epoch})"
    whose = "" if job in (None, "run") else f"sweep job {job!r}: "
    raise ConfigError(
        f"{whose}table1_epoch={epoch}: that epoch has no metrics; available epochs: {[m['epoch'] for m in metrics]}"
    )


def pick_epoch(metrics, which="best", job=None):
    """The metrics of the epoch choose_epoch chooses."""
    return choose_epoch(metrics, which, job)[0]


def epoch_caption(runs, which="best"):
    """Table I's caption: which epoch each run's Tables I, III and IV show and the rule that chose it."""
    parts = []
    for job, metrics in runs.items():
        chosen, rule = choose_epoch(metrics, which, job)
        parts.append(("" if job == "run" else f"{job}: ") + f"epoch {chosen['epoch']}, {rule}")
    return f"Checkpoint: {'; '.join(parts)}."


def reduced_lr_epochs(metrics):
    """Epochs trained with a learning rate below the run's maximum (the paper's epochs 4-5)."""
    lrs = [m["lr"] for m in metrics if m.get("lr") is not None]
    return [m["epoch"] for m in metrics if m.get("lr") is not None and m["lr"] < max(lrs)]
