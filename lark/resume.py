"""Resuming a killed training run with Lightning's own machinery: a Lightning checkpoint (weights, optimizer,
scheduler, loop and shuffle state) written atomically at every epoch end (`resume/last.ckpt`), loaded with
`weights_only=True` by `trainer.fit(ckpt_path=...)` when the run is started again with `resume=true`."""

import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from lark import faults
from lark.data.io import replacing
from lark.errors import RunDirError
from lark.legacy import upgrade

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name in the same folder and renamed (Lightning's own writer
    stages through the system temp dir, not atomic across file systems), and read without unpickling code."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with replacing(path) as tmp:
            torch.save(checkpoint, tmp)
            faults.point("checkpoint")

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=True):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise RunDirError(
                f"{path}: refusing to load a checkpoint that holds more than tensors and plain "
                f"values (torch.load(weights_only=True) failed: {str(e).splitlines()[0]})"
            ) from None


class ShuffleState(L.Callback):
    """Saves and restores the fine-tuning loader's shuffle generator (and torch's global RNG) in the Lightning
    checkpoint, so that a resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, generator):
        self.generator = generator

    def state_dict(self):
        return {"shuffle": self.generator.get_state(), "torch": torch.get_rng_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["shuffle"])
        torch.set_rng_state(state["torch"])


def resume_callbacks(run_dir, generator):
    """The callbacks that make a run resumable: last.ckpt at every epoch end (after the attribution callback,
    which Lightning runs first) and the shuffle state."""
    last = ModelCheckpoint(
        dirpath=Path(run_dir) / "resume",
        filename="last",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    return [last, ShuffleState(generator)]


# Keys a resumed run may change: they do not change results (a run folder may also have been moved).
IGNORED = (
    "resume",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "paths.output_dir",
    "paths.root_dir",
    "paths.cache_dir",
    "logger",
)


def check_same_run(cfg, run_dir):
    """Refuse to resume a run with other settings than it was started with (its epoch_000 config). Keys the run's
    config does not have (added to LARK since it started) take today's value."""
    saved = Path(run_dir) / "checkpoints" / "epoch_000" / "lark_config.yaml"
    if not saved.is_file():
        return
    old = flat(OmegaConf.to_container(upgrade(OmegaConf.load(saved)), resolve=True))  # an earlier LARK: today's form
    new = flat(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and (k in old) and not k.startswith(IGNORED)
    )
    if changed:
        k = changed[0]
        raise RunDirError(
            f"resume=true with other settings than {run_dir} was started with: {k} was "
            f"{old.get(k)!r}, now {new.get(k)!r} ({len(changed)} keys differ); use the same overrides"
        )


def flat(d, prefix=""):
    """{"a.b": value} of a nested dict."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def last_checkpoint(run_dir, log=print):
    """resume/last.ckpt of a run, or None (then training starts from the base model)."""
    path = Path(run_dir) / "resume" / LAST
    if path.is_file():
        log(f"[lark] resuming from {path}")
        return str(path)
    log(
        f"[lark] resume: no {LAST} in {run_dir} yet, training starts from the base model "
        "(complete attribution results are reused)"
    )
    return None
