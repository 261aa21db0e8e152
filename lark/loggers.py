"""Loggers: built from the `logger` config group (a dict, one entry per logger), never allowed to fail a run."""

import os
import secrets
import warnings
from pathlib import Path

from hydra.utils import instantiate

from lark.data.io import replacing


def wandb_logger(project, name, save_dir, offline=True, init_timeout=30, continue_run=False, **kwargs):
    """A Lightning WandbLogger, offline by default (syncable later with `wandb sync`). Returns None, with a
    warning, when W&B cannot start (no network in online mode, a bad key, a full disk). continue_run: log into the
    W&B run this folder started (its id in <save_dir>/wandb/run_id), so that a resumed run's curves go on in one
    W&B run; else a new one."""
    from lightning.pytorch.loggers import WandbLogger

    try:
        import wandb

        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        os.makedirs(save_dir, exist_ok=True)
        logger = WandbLogger(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=offline,
            id=kwargs.pop("id", None) or wandb_run_id(save_dir, continue_run),  # Lightning passes resume="allow"
            settings=wandb.Settings(init_timeout=init_timeout, silent=True),
            **kwargs,
        )
        # Lightning passes anonymous=None to wandb.init, which W&B answers with "The anonymous setting has no
        # effect": a setting nobody set, so it is not passed at all
        logger._wandb_init.pop("anonymous", None)
        logger.experiment  # start the run now, so that a failure happens here and not mid-training
        return logger
    except Exception as e:  # W&B must never stop the experiment
        warnings.warn(f"W&B logging disabled: {type(e).__name__}: {e}")
        return None


def wandb_run_id(save_dir, continue_run):
    """The id saved in <save_dir>/wandb/run_id when continue_run and it exists; else a new id, saved there. Only
    global rank 0 logs (and writes the file): another DDP rank, started as its own process, gets None."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return None
    file = Path(save_dir) / "wandb" / "run_id"
    if continue_run and file.is_file() and file.read_text().strip():
        return file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own ids: 8 lower-case letters and digits
    with replacing(file) as tmp:  # written whole or not at all, like every file LARK writes
        tmp.write_text(run_id + "\n")
    return run_id


def build_loggers(cfg):
    """Instantiate every entry of the `logger` config dict; entries that come back None are dropped."""
    loggers = [instantiate(entry) for entry in (cfg or {}).values()]
    return [lg for lg in loggers if lg is not None]


def log_metrics(trainer, metrics, step):
    for lg in trainer.loggers:
        try:
            lg.log_metrics(metrics, step=step)
        except Exception as e:  # e.g. a full disk under wandb/: the run goes on without this logger's entry
            warnings.warn(f"{type(lg).__name__}: could not log metrics: {e}")


def log_table(trainer, key, columns, rows):
    """A table to every logger that can show one (W&B); others ignore it."""
    for lg in trainer.loggers:
        if hasattr(lg, "log_table"):
            try:
                lg.log_table(key=key, columns=columns, data=[list(r) for r in rows])
            except Exception as e:
                warnings.warn(f"{type(lg).__name__}: could not log table {key}: {e}")


def log_images(loggers, key, paths):
    """Each image under its own key (key/<file stem>): figures differ in size, and W&B shows a list of images
    of different sizes incorrectly (and says so)."""
    for lg in loggers:
        if hasattr(lg, "log_image"):
            for path in paths:
                try:
                    lg.log_image(key=f"{key}/{Path(path).stem}", images=[str(path)])
                except Exception as e:
                    warnings.warn(f"{type(lg).__name__}: could not log image {key}/{Path(path).stem}: {e}")


def log_report(loggers, path):
    """The report page (lark.analysis.report) as a W&B artifact of type "report"; loggers without artifacts
    ignore it."""
    for lg in loggers:
        experiment = getattr(lg, "experiment", None) if hasattr(lg, "log_image") else None
        if experiment is None or not hasattr(experiment, "log_artifact"):
            continue
        try:
            import wandb

            artifact = wandb.Artifact("report", type="report", description="LARK report/index.html (offline page)")
            artifact.add_file(str(path), name="index.html")
            experiment.log_artifact(artifact)
        except Exception as e:
            warnings.warn(f"{type(lg).__name__}: could not log the report: {e}")


def finish(loggers, failed=False):
    """Close the loggers (W&B runs, so that the next multirun job starts clean), marked failed when the run
    stopped on an error (W&B then shows it crashed, not finished)."""
    for lg in loggers:
        try:
            lg.finalize("failed" if failed else "success")
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "finish"):
                lg.experiment.finish(**({"exit_code": 1} if failed else {}))
        except Exception as e:
            warnings.warn(f"{type(lg).__name__}: could not close: {e}")
