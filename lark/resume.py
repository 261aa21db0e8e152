"""Resuming a killed training run with Lightning's own machinery: a Lightning checkpoint (weights, optimizer,
scheduler, loop and shuffle state) written atomically at every epoch end (`resume/last.ckpt`), loaded with
`weights_only=True` by `trainer.fit(ckpt_path=...)` when the run is started again with `resume=true`. It carries
the sha256 of its own content (`lark_checksum`: every tensor and value, in order), verified when it is loaded: a
corrupted resume state stops the run (CorruptFile) saying how to restart."""

import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from lark import faults
from lark.data.io import replacing, sha256
from lark.errors import CorruptFile, RunDirError
from lark.fingerprints import without_locations
from lark.legacy import read_saved, upgrade
from lark.rundir import RUN_CONFIG, computed, holds_run

LAST = "last.ckpt"
CHECKSUM = "lark_checksum"  # the resume state's key holding the sha256 of the rest of it (state_checksum)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary name in the same folder and renamed (Lightning's own writer
    stages through the system temp dir, not atomic across file systems), and read without unpickling code."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        checkpoint = {**checkpoint, CHECKSUM: state_checksum(checkpoint)}
        with replacing(path, state_bytes(checkpoint)) as tmp:
            torch.save(checkpoint, tmp)
            faults.point("checkpoint")

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=True):
        restart = (
            "the resume state cannot be recomputed, training restarts from epoch 0: delete it and run the same "
            "command again with resume=true (complete epochs' attribution is reused)"
        )
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise RunDirError(
                f"{path}: refusing to load a checkpoint that holds more than tensors and plain values, or a "
                f"corrupted one (torch.load(weights_only=True) failed: {str(e).splitlines()[0]}); {restart}"
            ) from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise CorruptFile(
                f"{path}: unreadable ({str(e).splitlines()[0]}): corrupted or truncated; {restart}"
            ) from None
        want = state.pop(CHECKSUM, None)  # None: written before LARK checksummed it (unverified)
        if want is not None and want != state_checksum(state):
            raise CorruptFile(f"{path}: checksum mismatch (corrupted after it was written); {restart}")
        return state


def state_parts(obj):
    """The byte strings a state_checksum covers: every tensor's dtype, shape and bytes and every other value's
    repr, dicts and sequences walked in order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        yield f"tensor {t.dtype} {tuple(obj.shape)}".encode()
        yield memoryview(t.view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        yield f"dict {len(obj)}".encode()
        for key, value in obj.items():
            yield repr(key).encode()
            yield from state_parts(value)
    elif isinstance(obj, (list, tuple)):
        yield f"list {len(obj)}".encode()
        for value in obj:
            yield from state_parts(value)
    else:
        yield repr(obj).encode()


def state_checksum(state):
    """ "sha256:<hex>" of a resume state's content (state_parts)."""
    return sha256(state_parts(state))


def state_bytes(obj):
    """The bytes of a state's tensors (about the size of its file)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(state_bytes(v) for v in values)


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
    "attribution.projector.fold",  # the fold's schedule: same sums (a GPU run may switch triton -> index)
    "attribution.projector.cache_bytes",  # how many hash signs are kept between batches: speed only
    "attribution.tokens_pass",  # forward or reverse derivatives of the token contributions: speed only
    "attribution.tokens_budget",  # how many tangents a derivative pass holds: speed and memory only
    "attribution.tokens_kept",  # how many position pieces the store pass keeps for the token pass: speed only
    "trainer.strategy.timeout",  # how long a DDP rank waits at a collective
    "preflight_timeout_s",  # how long the start-up check waits for the hub
    "preflight",  # whether the start-up check runs (its own error says preflight=false skips it)
    "num_workers",  # data-loading processes: the batches and their order are the main process's
)


def save_run_config(cfg, run_dir, resume):
    """Keep the config a run was started with, what check_same_run compares a resume against whether or not
    checkpoints are saved: written at a new start, and at a resume of a run that has computed nothing yet (a
    start that failed on its input before any result; a resume keeps the config of a run that has results).
    Hydra's .hydra files of that start are kept beside it (.hydra/first_start, put back by keep_hydra_files)."""
    path = Path(run_dir) / RUN_CONFIG
    if not (resume and computed(run_dir) and path.is_file()):
        text = OmegaConf.to_yaml(cfg, resolve=True)
        with replacing(path, len(text)) as tmp:
            tmp.write_text(text)
        copy_hydra_files(Path(run_dir) / ".hydra", Path(run_dir) / FIRST_START)


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes in <run>/.hydra at every start
FIRST_START = Path(".hydra") / "first_start"  # their copy from the start whose config the run keeps


def copy_hydra_files(source, target):
    for name in HYDRA_FILES:
        if (source / name).is_file():
            with replacing(target / name) as tmp:
                shutil.copy2(source / name, tmp)  # its time too: the report's start time is config.yaml's


def keep_hydra_files(run_dir):
    """Hydra rewrites .hydra/{config,hydra,overrides}.yaml at every start, before LARK sees the command: a start
    into a run that has results (a resume, or a start refused for its other settings) puts back those of the start
    the run keeps, so attribute.py and validate.py read the run's own config and the report and a sweep's labels
    its own overrides (not `resume=true`, nor a refused `format=...`)."""
    if computed(run_dir) and (Path(run_dir) / FIRST_START).is_dir():
        copy_hydra_files(Path(run_dir) / FIRST_START, Path(run_dir) / ".hydra")


def check_resumable(run_dir, chosen):
    """resume=true in a folder without a run, which Hydra made for this start (hydra.run.dir not `chosen`): the
    default folder is new at every start, so the run would silently start over. A chosen empty folder starts
    (a script restarting itself, the LDS retrains)."""
    if not chosen and not holds_run(run_dir):
        raise RunDirError(
            f"resume=true: {run_dir} holds no run to resume (a new folder: Hydra's default is new at every start); "
            "give the killed run's folder with hydra.run.dir=<run>, or leave out resume=true to start a new run"
        )


def check_same_run(cfg, run_dir):
    """Refuse to resume a run with other settings than it was started with (<run>/lark_config.yaml; runs from
    before it: their epoch_000 config). Keys the run's config does not have (added to LARK since it started) take
    today's value."""
    saved = Path(run_dir) / RUN_CONFIG
    if not saved.is_file():
        saved = Path(run_dir) / "checkpoints" / "epoch_000" / "lark_config.yaml"
    if not saved.is_file() or not computed(run_dir):  # nothing computed yet: nothing to keep consistent
        return
    old = flat(without_locations(upgrade(read_saved(saved))))  # an earlier LARK: today's form
    new = flat(without_locations(cfg))  # (where a BM25 index is cached, e.g. under LARK_CACHE, changes no result)
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
