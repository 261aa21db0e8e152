"""Checksums and a full disk (issue 21, items 2 and 5): one flipped byte in a store, a shard, a score matrix, AdamW
moments, a checkpoint or the resume state of a finished run is caught by the next attribute.py / analyze.py /
resume=true, what can be recomputed is, with results byte-equal to the original run; a write that finds the disk
full keeps nothing partial, says how many bytes it needed, and the run completes once there is space."""

import errno
import shutil

import pytest
import torch
from test_trust import RUN, assert_same_results, run

pytestmark = pytest.mark.trust


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (two epochs, shards of 4), the original every test compares with."""
    tmp = tmp_path_factory.mktemp("finished")
    run("train.py", RUN + [f"hydra.run.dir={tmp / 'run'}"], tmp)
    return tmp / "run"


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def flip(path, offset):
    """Flip one bit of the byte at `offset` (negative: from the end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(data)


def test_attribute_scores_bm25_with_the_runs_settings(finished, tmp_path, monkeypatch):
    """attribute.py's Table IV BM25 baseline used the default k1 and b (only train.py and validate.py set the run's):
    re-attributing a run with source.bm25.k1=0.9 rewrote metrics.json's bm25 block with other numbers."""
    from omegaconf import OmegaConf

    import lark.experiment as E
    from lark.data import bm25

    run_dir = copy_of(finished, tmp_path)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved.source.bm25.k1, saved.source.bm25.b = 0.9, 0.4
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    monkeypatch.setattr(bm25, "SETTINGS", dict(bm25.DEFAULTS))  # a fresh attribute.py process
    seen = []
    monkeypatch.setattr(E, "evaluate_checkpoint", lambda ck, items, sets: seen.append(dict(bm25.SETTINGS)))
    E.attribute(run_dir, {"checkpoints": [1]}, log=lambda line: None)
    assert [(s["k1"], s["b"]) for s in seen] == [(0.9, 0.4)]


def test_attribute_py_and_analyze_py_analyse_with_the_runs_own_analysis_settings(finished, tmp_path):
    """attribute.py's and analyze.py's analysis used the defaults (Table I at "best", a report) whatever the run had
    asked, so the tables' epoch depended on which entry point ran last."""
    from omegaconf import OmegaConf

    run_dir = copy_of(finished, tmp_path)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    saved.analysis.table1_epoch, saved.analysis.report = "last", False
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    run("attribute.py", [f"run_dir={run_dir}"], tmp_path)
    assert "the last epoch (table1_epoch=last)" in (run_dir / "tables" / "table1.md").read_text()
    assert not (run_dir / "report").exists()
    (run_dir / "tables" / "table1.md").unlink()
    run("analyze.py", [f"run_dir={run_dir}"], tmp_path)  # analyze.py too: its own keys are null by default
    assert "the last epoch (table1_epoch=last)" in (run_dir / "tables" / "table1.md").read_text()
    assert not (run_dir / "report").exists()
    run("analyze.py", [f"run_dir={run_dir}", "table1_epoch=0", "report=true"], tmp_path)  # given: they win
    assert "epoch 0 (table1_epoch=0)" in (run_dir / "tables" / "table1.md").read_text()
    assert (run_dir / "report" / "index.html").is_file()


def test_kernel_eps_must_be_the_optimizers():
    from conftest import compose

    from lark.config_checks import check_config
    from lark.errors import ConfigError

    check_config(compose(["attribution/kernel=adam"]))
    with pytest.raises(ConfigError, match=r"attribution.kernel.eps=1e-08 differs from optimizer.eps=1e-06"):
        check_config(compose(["attribution/kernel=trackstar", "optimizer.eps=1e-6"]))


# ------------------------------------------------------------------------------------------------ the format
def test_every_single_byte_flip_of_a_store_is_caught_and_an_unchecksummed_one_still_loads(tmp_path):
    from safetensors.torch import save_file

    from lark.data.io import check_safetensors
    from lark.errors import CorruptFile
    from lark.kernel.stores import load_store, save_store

    path = tmp_path / "s.safetensors"
    save_store(path, torch.randn(3, 16), ["a", "b", "c"], {"set": "x"})
    assert check_safetensors(path) is True
    data = path.read_bytes()
    for offset in range(len(data)):  # header length, header (keys, ids, checksum, padding) and tensor bytes
        flip(path, offset)
        with pytest.raises(CorruptFile, match="s.safetensors"):
            load_store(path)
        path.write_bytes(data)
    path.write_bytes(data[:-7])
    with pytest.raises(CorruptFile, match="truncated"):
        load_store(path)
    legacy = tmp_path / "legacy.safetensors"  # written before LARK checksummed: read as it always was
    save_file(
        {"vectors": torch.ones(2, 4, dtype=torch.float16), "norms": torch.ones(2)},
        legacy,
        {"ids": '["a", "b"]', "tier": '"float16"', "k": "4", "set": '"x"'},
    )
    assert check_safetensors(legacy) is False and load_store(legacy)[2] == ["a", "b"]


def test_the_resume_state_carries_a_content_checksum_and_one_written_before_loads_unverified(tmp_path):
    from lark.errors import CorruptFile
    from lark.resume import CHECKSUM, AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    state = {"epoch": 1, "state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "loops": [{"step": 3}, (1, "a")]}
    io.save_checkpoint(state, path)
    assert torch.load(path, weights_only=True)[CHECKSUM].startswith("sha256:")
    loaded = io.load_checkpoint(path)
    assert loaded.keys() == state.keys() and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    torch.save({**state, CHECKSUM: "sha256:0"}, path)  # content that differs from its checksum
    with pytest.raises(CorruptFile, match=r"last.ckpt: checksum mismatch.*restarts from epoch 0.*resume=true"):
        io.load_checkpoint(path)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(CorruptFile, match="last.ckpt: unreadable"):
        io.load_checkpoint(path)
    torch.save(state, path)  # written before LARK checksummed it
    assert io.load_checkpoint(path)["epoch"] == 1


# ------------------------------------------------------------------------------------------- a finished run
@pytest.mark.parametrize("file", ["stores/medical_format.safetensors", "scores/finetune.safetensors"])
def test_a_corrupted_store_or_score_matrix_is_refused_by_analysis_and_recomputed_by_attribute(
    finished, tmp_path, one_thread, file
):
    from lark.analysis.analyze import analyze
    from lark.errors import CorruptFile
    from lark.experiment import attribute

    run_dir = copy_of(finished, tmp_path)
    path = run_dir / "attribution/epoch_001" / file
    flip(path, -10)
    with pytest.raises(CorruptFile, match=rf"{file}: checksum mismatch .*python attribute.py run_dir="):
        analyze(run_dir)
    logs = []
    attribute(run_dir, {"checkpoints": [1]}, log=logs.append)
    assert [line for line in logs if "checksum" in line] == [
        f"[lark] {path}: checksum mismatch (corrupted or truncated after it was written): recomputed"
    ]
    assert sum("store complete, reused" in line for line in logs) == (5 if file.startswith("stores") else 6)
    assert_same_results(finished, run_dir)


def test_analyze_py_prints_one_error_line_naming_a_corrupted_score_file(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    flip(run_dir / "attribution/epoch_002/scores/medical_noformat.safetensors", -1)
    out = run("analyze.py", [f"run_dir={run_dir}"], tmp_path, check=False)
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(f"[lark] error: {run_dir}/attribution/epoch_002/scores/medical_noformat.safetensors")


class Killed(Exception):
    """Stands for a kill: the attribution stops where it is."""


def test_a_corrupted_shard_is_recomputed_and_the_scores_equal_the_original(finished, tmp_path, one_thread, monkeypatch):
    from lark import faults
    from lark.experiment import attribute

    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "attribution/epoch_000")
    seen = []

    def stop_at_second_shard(name):
        seen.append(name)
        if seen.count("shard") == 2:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(faults, "point", stop_at_second_shard)
        with pytest.raises(Killed):
            attribute(run_dir, {"checkpoints": [0]}, log=lambda line: None)
    shards = sorted((run_dir / "attribution/epoch_000/shards").glob("test_queries.*"))
    assert len(shards) == 2
    flip(shards[1], -10)
    logs = []
    attribute(run_dir, {"checkpoints": [0]}, log=logs.append)
    assert f"[lark] {shards[1]}: checksum mismatch (corrupted or truncated after it was written): recomputed" in logs
    assert sum("shard complete, reused" in line for line in logs) == 1
    assert not (run_dir / "attribution/epoch_000/shards").exists()
    assert_same_results(finished, run_dir)


@pytest.mark.parametrize(
    "file,advice",
    [
        ("adam_moments.safetensors", "come from its training: retrain to that epoch .* or delete the file"),
        ("model.safetensors", "retrain from epoch 0 to epoch_001 .* or leave this epoch out"),
    ],
)
def test_corrupted_moments_or_checkpoint_weights_stop_attribute_py_naming_the_epoch(finished, tmp_path, file, advice):
    from lark.errors import CorruptFile
    from lark.experiment import attribute

    run_dir = copy_of(finished, tmp_path)
    flip(run_dir / "checkpoints/epoch_001" / file, -1000)
    with pytest.raises(CorruptFile, match=rf"epoch_001/{file}: checksum mismatch .*; .*{advice}"):
        attribute(run_dir, {"checkpoints": [1]}, log=lambda line: None)


def tensor_byte(path):
    """The offset of a byte in the middle of the largest tensor record of a torch.save zip file."""
    import zipfile

    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    local = path.read_bytes()[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return start + info.file_size // 2


def test_a_corrupted_resume_state_stops_train_py_and_the_documented_restart_gives_the_same_run(finished, tmp_path):
    """last.ckpt corrupted: train.py resume=true stops with one error line saying to delete it and resume; done,
    training restarts from epoch 0, and the corrupted epoch-2 checkpoint on the way is saved again."""
    run_dir = copy_of(finished, tmp_path)
    last = run_dir / "resume/last.ckpt"
    flip(last, tensor_byte(last))
    flip(run_dir / "checkpoints/epoch_002/model.safetensors", -1000)
    args = RUN + [f"hydra.run.dir={run_dir}", "resume=true"]
    out = run("train.py", args, tmp_path, check=False)
    errors = [line for line in out.stderr.splitlines() if line.startswith("[lark] error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"[lark] error: {last}: checksum mismatch") and "delete it" in errors[0]
    last.unlink()
    log = run("train.py", args, tmp_path).stdout
    assert "epoch_002/model.safetensors: checksum mismatch" in log and "saved again from the model in memory" in log
    assert_same_results(finished, run_dir)


# ------------------------------------------------------------------------------------------------ a full disk
class FullDisk:
    """A file on a disk that fills up: it takes half of the first write, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_writing_a_store_keeps_nothing_partial_and_the_run_completes_once_there_is_space(
    finished, tmp_path, one_thread, monkeypatch
):
    import builtins

    from lark.errors import DiskFull
    from lark.experiment import attribute
    from lark.kernel import stores

    run_dir = copy_of(finished, tmp_path)
    folder = run_dir / "attribution/epoch_001"
    shutil.rmtree(folder)

    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(f) if "finetune.safetensors" in str(path) else f

    size = (finished / "attribution/epoch_001/stores/finetune.safetensors").stat().st_size
    with monkeypatch.context() as m:
        m.setattr(stores, "open", full_open, raising=False)
        with pytest.raises(
            DiskFull, match=rf"stores/finetune.safetensors: no space left on the device \({size:,} bytes"
        ):
            attribute(run_dir, {"checkpoints": [1]}, log=lambda line: None)
    assert not list(run_dir.rglob("*.tmp*")) and not (folder / "stores/finetune.safetensors").exists()
    assert (folder / "stores/test_queries.safetensors").is_file()  # complete before the disk filled: kept
    logs = []
    attribute(run_dir, {"checkpoints": [1]}, log=logs.append)
    assert any("test_queries.safetensors: store complete, reused" in line for line in logs)
    assert_same_results(finished, run_dir)


def test_a_full_disk_while_writing_a_checkpoint_or_the_resume_state_keeps_nothing_partial(
    finished, tmp_path, monkeypatch
):
    """Both name the path and the bytes being written; the half-written checkpoint folder and file go."""
    from omegaconf import OmegaConf

    from lark import checkpoint as lark_checkpoint
    from lark import models
    from lark.errors import DiskFull
    from lark.resume import AtomicCheckpointIO, state_bytes

    model, tokenizer = models.load_pretrained(finished / "checkpoints/epoch_001", OmegaConf.create({}))
    cfg = OmegaConf.load(finished / "checkpoints/epoch_001/lark_config.yaml")
    ck = lark_checkpoint.Checkpoint(cfg, model, tokenizer, tmp_path, 1, lr=2e-4)

    def no_space(folder):  # called once the weights and tokenizer are in the temporary folder
        assert (folder / "model.safetensors").is_file()
        raise OSError(errno.ENOSPC, "No space left on device")

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with monkeypatch.context() as m:
        m.setattr(models, "write_manifest", no_space)
        with pytest.raises(DiskFull, match=rf"checkpoints/epoch_001: no space left on the device \({weights:,} bytes"):
            lark_checkpoint.save(ck)
    assert not (tmp_path / "checkpoints/epoch_001").exists() and not list(tmp_path.rglob("*.tmp*"))
    lark_checkpoint.save(ck)  # space again
    assert lark_checkpoint.intact(tmp_path / "checkpoints/epoch_001")

    def half_written(obj, path):
        with FullDisk(open(path, "wb")) as f:
            f.write(b"x" * 100)

    state = {"state_dict": {"w": torch.ones(1000)}}
    with monkeypatch.context() as m:
        m.setattr(torch, "save", half_written)
        with pytest.raises(DiskFull, match=rf"last.ckpt: no space left on the device \({state_bytes(state):,} bytes"):
            AtomicCheckpointIO().save_checkpoint(state, tmp_path / "resume/last.ckpt")
    assert not list((tmp_path / "resume").iterdir())


def test_a_full_disk_while_train_py_writes_its_resume_state_stops_with_one_line_and_resume_completes_the_run(
    finished, tmp_path, monkeypatch
):
    """LARK_DISK_FULL_AT=checkpoint:2: epoch 2's resume state finds the disk full. One error line names the file
    and the bytes; epoch 1's resume state stays; resume=true (space again) ends equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    args = RUN + [f"hydra.run.dir={run_dir}"]
    monkeypatch.setenv("LARK_DISK_FULL_AT", "checkpoint:2")
    out = run("train.py", args, tmp_path, check=False)
    monkeypatch.delenv("LARK_DISK_FULL_AT")
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"[lark] error: {run_dir}/resume/last.ckpt: no space left on the device (")
    assert "bytes needed" in errors[0]
    assert not list(run_dir.rglob("*.tmp[0-9]*"))
    assert torch.load(run_dir / "resume/last.ckpt", weights_only=True)["epoch"] == 0  # epoch 1's, intact
    log = run("train.py", args + ["resume=true"], tmp_path).stdout
    assert "resuming from" in log
    assert_same_results(finished, run_dir)


def test_validation_refuses_a_checkpoint_whose_weights_fail_their_checksum(finished, tmp_path):
    """validate.py scores checkpoints too: a flipped byte in one stops it naming that epoch, before any scoring."""
    from lark.errors import CorruptFile
    from lark.validation.load import load_config
    from lark.validation.table5 import validate_run

    run_dir = copy_of(finished, tmp_path)
    flip(run_dir / "checkpoints/epoch_001/model.safetensors", -1000)
    vcfg = load_config({"kernels": ["cosine"], "lds": {"enabled": False}, "checkpoints": [1]})
    with pytest.raises(CorruptFile, match=r"epoch_001/model.safetensors: checksum mismatch"):
        validate_run(run_dir, vcfg, log=lambda line: None)


def test_attribute_checks_every_epochs_moments_before_touching_any(finished, tmp_path):
    """attribute.py attribution/kernel=adam on epochs [0, 1] with epoch 1's moments gone re-attributed epoch 0 with
    adam and only then stopped at epoch 1, leaving a run of mixed kernels; now it stops before any epoch."""
    from lark import experiment as E
    from lark.errors import RunDirError

    run_dir = copy_of(finished, tmp_path)
    (run_dir / "checkpoints" / "epoch_001" / "adam_moments.safetensors").unlink()
    before = (run_dir / "attribution" / "epoch_000" / "metrics.json").read_bytes()
    adam = {"_target_": "lark.kernel.kernels.Adam", "eps": 1e-8, "factored": True, "normalize": "none"}
    with pytest.raises(RunDirError, match=r"epoch_001/adam_moments\.safetensors: not found"):
        E.attribute(run_dir, {"checkpoints": [0, 1], "kernel": adam}, log=lambda line: None)
    assert (run_dir / "attribution" / "epoch_000" / "metrics.json").read_bytes() == before


def test_a_folder_is_replaced_whole_with_its_checksums_or_not_at_all(tmp_path):
    """lark.data.io.replacing_folder (checkpoints, BM25 indexes): an error while filling it leaves the old folder
    and no temporary; a completed one replaces the old folder whole, its checksums.json with it."""
    from lark.data.io import check_manifest, replacing_folder, write_manifest

    target = tmp_path / "epoch_001"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing_folder(target) as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_001"] and (target / "old.txt").read_text() == "old"
    with replacing_folder(target) as tmp:
        (tmp / "model.safetensors").write_text("new")
        write_manifest(tmp)
    assert sorted(p.name for p in target.iterdir()) == ["checksums.json", "model.safetensors"]
    assert check_manifest(target) and [p.name for p in tmp_path.iterdir()] == ["epoch_001"]
