"""Loggers: built from the `logger` config group (a dict, one entry per logger), never allowed to fail a run."""
import os
import warnings

from hydra.utils import instantiate


def wandb_logger(project, name, save_dir, offline=True, init_timeout=30, **kwargs):
    """A Lightning WandbLogger, offline by default (syncable later with `wandb sync`). Returns None, with a
    warning, when W&B cannot start (no network in online mode, a bad key, a full disk)."""
    from lightning.pytorch.loggers import WandbLogger

    try:
        import wandb

        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        os.makedirs(save_dir, exist_ok=True)
        logger = WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline,
                             settings=wandb.Settings(init_timeout=init_timeout, silent=True), **kwargs)
        logger.experiment  # start the run now, so that a failure happens here and not mid-training
        return logger
    except Exception as e:  # W&B must never stop the experiment
        warnings.warn(f"W&B logging disabled: {type(e).__name__}: {e}")
        return None


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
    for lg in loggers:
        if hasattr(lg, "log_image"):
            try:
                lg.log_image(key=key, images=[str(p) for p in paths])
            except Exception as e:
                warnings.warn(f"{type(lg).__name__}: could not log images {key}: {e}")


def finish(loggers):
    """Close W&B runs so that the next multirun job starts clean."""
    for lg in loggers:
        try:
            lg.finalize("success")
            if hasattr(lg, "experiment") and hasattr(lg.experiment, "finish"):
                lg.experiment.finish()
        except Exception as e:
            warnings.warn(f"{type(lg).__name__}: could not close: {e}")
