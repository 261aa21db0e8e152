"""Checks on a run directory: files left half-written by a killed process, incomplete epochs, stores and score
matrices that fail their checksum (lark.data.io), checkpoints that fail theirs, a folder that already holds
another run, and whether the disk has room for the attribution stores."""

import json
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from lark.data.io import check_manifest, check_safetensors
from lark.errors import CorruptFile, RunDirError

TMP = re.compile(r"\.tmp\d+$")  # lark.data.io.replacing and replacing_folder name temporaries so


def leftovers(run_dir):
    """Temporary files and folders left by interrupted writes (W&B's own folder aside)."""
    run_dir = Path(run_dir)
    return sorted(p for p in run_dir.rglob("*") if TMP.search(p.name) and "wandb" not in p.relative_to(run_dir).parts)


RUN_CONFIG = "lark_config.yaml"  # <run>/lark_config.yaml: the resolved config the run was started with


def computed(run_dir):
    """Whether a run folder holds results (checkpoints, resume state, attribution). Its data/ is not one: every
    start makes it again from the config, so a start that failed after writing it (in the model's load) leaves a
    run that a resume with a mended config starts as that config."""
    return any((Path(run_dir) / name).exists() for name in ("checkpoints", "resume", "attribution"))


def holds_run(run_dir):
    """Whether a folder holds a started run (its config, data or results)."""
    return (Path(run_dir) / RUN_CONFIG).exists() or (Path(run_dir) / "data").exists() or computed(run_dir)


def problems(run_dir):
    """What makes a run directory incomplete: leftovers, checkpoints without weights, attributed epochs without
    metrics.json (written last), attribution shards of a set still in progress."""
    run_dir = Path(run_dir)
    found = [f"{p.relative_to(run_dir)}: left by an interrupted write" for p in leftovers(run_dir)]
    for folder in sorted((run_dir / "checkpoints").glob("epoch_[0-9][0-9][0-9]")):
        if not (folder / "model.safetensors").is_file() and not TMP.search(folder.name):
            found.append(f"{folder.relative_to(run_dir)}: no model.safetensors")
    for folder in sorted((run_dir / "attribution").glob("epoch_[0-9][0-9][0-9]")):
        if not (folder / "metrics.json").is_file():
            found.append(f"{folder.relative_to(run_dir)}: no metrics.json (attribution did not finish)")
    for epoch in expected_epochs(run_dir):
        folder = run_dir / "attribution" / f"epoch_{epoch:03d}"
        if not folder.exists():
            found.append(f"{folder.relative_to(run_dir)}: missing (the run stopped before this epoch)")
    return found


def expected_epochs(run_dir):
    """The epochs a run's config asks to attribute (trainer.max_epochs, attribution.checkpoints/enabled), from the
    config it was started with; [] when it cannot be read (runs from before lark_config.yaml: .hydra's)."""
    for path in (Path(run_dir) / RUN_CONFIG, Path(run_dir) / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                cfg = OmegaConf.load(path)
                attr, last = cfg.attribution, int(cfg.trainer.max_epochs)
                if not attr.get("enabled", True):
                    return []
                asked = range(last + 1) if attr.checkpoints == "all" else [int(e) for e in attr.checkpoints]
                return [e for e in asked if 0 <= e <= last]
            except Exception:  # noqa: BLE001 -- an unreadable or interpolated config: nothing expected
                return []
    return []


def corrupt(run_dir):
    """CorruptFile errors of the stores and score matrices under attribution/ that fail their checksum."""
    found = []
    for path in sorted((Path(run_dir) / "attribution").rglob("*.safetensors")):
        try:
            check_safetensors(path)
        except CorruptFile as e:
            found.append(e)
    return found


def require_complete(run_dir):
    """Refuse to trust (analyse) a run directory with problems(): a corrupted store or score matrix first, on one
    line naming it."""
    bad = corrupt(run_dir)
    if bad:
        raise CorruptFile(
            f"{bad[0]}; not trusted ({len(bad)} corrupted file(s) in {run_dir}): recompute with "
            f"`python attribute.py run_dir={run_dir}`"
        )
    found = problems(run_dir)
    if found:
        raise RunDirError(
            f"{run_dir} is incomplete, not trusted:\n  " + "\n  ".join(found[:20]) + f"\n{finish(run_dir)}"
        )
    check_data(run_dir)  # the report shows data/'s text: a corrupted file is not shown as the run's


def finish(run_dir):
    """How to finish an incomplete run: attribute.py when every epoch it attributes has its checkpoint, else the
    training must go on first (attribute.py alone would stop at the first missing checkpoint)."""
    expected = expected_epochs(run_dir)
    have = {e for e, folder in saved_checkpoints(run_dir).items() if (folder / "model.safetensors").is_file()}
    if not expected or not have:  # a config that cannot be read, no epoch asked, or no checkpoint kept (or written)
        return (
            "finish it with `python train.py <its overrides> hydra.run.dir=<it> resume=true` or "
            "`python attribute.py run_dir=<it>`"
        )
    untrained = [e for e in expected if e not in have]
    if untrained:
        return (
            f"training stopped before epoch {untrained[0]}: finish it with `python train.py <its overrides> "
            f"hydra.run.dir={run_dir} resume=true` (it attributes each epoch as it goes)"
        )
    return f"every checkpoint is there: finish it with `python attribute.py run_dir={run_dir}`"


def clean(run_dir, log=print):
    """Report the problems of a run directory about to be resumed and delete its leftovers."""
    for line in problems(run_dir):
        log(f"[lark] {run_dir}: {line}")
    for path in leftovers(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def require_new(run_dir):
    """A run without resume=true must not write into a folder that holds another run's results."""
    for name in ("checkpoints", "attribution"):
        if (Path(run_dir) / name).exists():
            raise RunDirError(
                f"{run_dir} already holds a run ({name}/): add resume=true to continue it, or choose "
                "another hydra.run.dir"
            )


def require_space(folder, needed, detail):
    """Refuse to start when `folder` (or its nearest existing parent) has less than `needed` bytes free."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise RunDirError(
            f"attribution needs about {needed / 1e9:.2f} GB in {folder} ({detail}) but only "
            f"{free / 1e9:.2f} GB is free: free space, lower attribution.projector.k, choose a smaller "
            "attribution.store_dtype (int8, bit), set attribution.save_scores=false or attribute "
            "fewer attribution.checkpoints"
        )


PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def require_safetensors(folder):
    """A checkpoint folder is loaded only from safetensors: refuse one that holds pickled weights (unpickling runs
    arbitrary code) or no safetensors at all, and one whose files fail their checksums.json (CorruptFile naming
    the epoch to retrain to; a folder written before LARK checksummed has none and loads unverified)."""
    folder = Path(folder)
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled or not any(folder.glob("*.safetensors")):
        raise RunDirError(
            f"{folder}: refusing to load a checkpoint without safetensors weights or with pickled "
            f"files ({', '.join(pickled) or 'no *.safetensors'}); LARK loads safetensors only"
        )
    try:
        check_manifest(folder)
    except CorruptFile as e:
        raise CorruptFile(
            f"{e}; a checkpoint is recomputed only by training: retrain from epoch 0 to {folder.name} (training is "
            "deterministic: `python train.py <its overrides> hydra.run.dir=<a new folder>`), or leave this epoch out "
            "(+attribution.checkpoints=[...])"
        ) from None
    return folder


DATA_FILES = ("train.jsonl", "test.jsonl", "sources/*", "world/*")  # data/checksums.json: what is read back


def check_data(run_dir):
    """The run's data/ files that attribution and validation read back (DATA_FILES) against data/checksums.json
    (written by lark.experiment.train once they are final): CorruptFile naming the first that does not match, so
    no corrupted text is scored; a run written before LARK checksummed its data has none and is read unverified."""
    try:
        return check_manifest(Path(run_dir) / "data")
    except CorruptFile as e:
        raise CorruptFile(
            f"{e}; the data files are written once, by training: rerun `python train.py <its overrides> "
            "hydra.run.dir=<a new folder>` (deterministic), or restore the file"
        ) from None


def epoch_lr(checkpoint, metrics):
    """The learning rate of a checkpoint's epoch as training recorded it (runs before lark_epoch.json: metrics)."""
    for path in (checkpoint / "lark_epoch.json", metrics):
        try:
            return json.loads(path.read_text()).get("lr")
        except (OSError, ValueError):
            continue
    return None


def saved_checkpoints(run_dir):
    """{epoch: folder} of a run's complete checkpoints/epoch_NNN folders."""
    return {
        int(f.name.split("_")[1]): f
        for f in sorted((Path(run_dir) / "checkpoints").glob("epoch_[0-9][0-9][0-9]"))
        if not TMP.search(f.name)
    }
