"""Trust: a run survives kills, bad input and hostile files with nothing lost and bit-identical results.

The kill tests run train.py / attribute.py as subprocesses that SIGKILL themselves at named points
(LARK_KILL_AT=<point>:<n>, lark.faults), resume them with the documented commands, and compare every artifact
with an uninterrupted run: tensors and JSON bit for bit."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, compose
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

pytestmark = pytest.mark.trust

# Two epochs with an lr step after the first (the scheduler state must survive), sets split into shards of 4.
RUN = SMALL + ["logger=none", "scheduler.scheduler.milestones=[1]", "attribution.shard_size=4"]
GUARD = """import socket
_connect = socket.socket.connect
def _guarded(sock, address):
    local = str(address[0]).startswith(("127.", "localhost", "::1"))
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not local:
        raise OSError(f"network access blocked in tests: {address}")
    return _connect(sock, address)
socket.socket.connect = _guarded
"""


def run(script, args, tmp, kill=None, cache=None, check=True):
    """Run a LARK script offline (sockets blocked by a sitecustomize) with one torch thread."""
    guard = tmp / "netguard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(guard),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "LARK_CACHE": str(cache or os.environ["LARK_CACHE"]),
    }
    env.pop("LARK_KILL_AT", None)
    if kill:
        env["LARK_KILL_AT"] = kill
    out = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if kill:
        assert out.returncode == -9, f"not killed at {kill}:\n{out.stderr[-3000:]}"
    elif check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def assert_same_results(a, b):
    """Every artifact of run b equals run a's byte for byte (JSON, CSV, markdown, PNG, safetensors stores, scores and
    weights), and the Lightning resume state tensor for tensor. Configs, logs and the report hold paths and times."""

    def results(run):
        return sorted(
            p.relative_to(run)
            for p in run.rglob("*")
            if p.is_file()
            and ".hydra" not in p.parts
            and p.suffix != ".log"
            and p.name not in ("lark_config.yaml", "last.ckpt")
            and "report" not in p.parts
        )  # the report page carries timings and paths, like the logs

    files = results(a)
    assert files == results(b)
    assert any(f.suffix == ".safetensors" for f in files) and any(f.name == "metrics.json" for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f"{f} differs"
    last_a, last_b = (torch.load(d / "resume" / "last.ckpt", weights_only=True) for d in (a, b))
    for key in ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert same(last_a[key], last_b[key]), key
    assert same(last_a["callbacks"]["ShuffleState"], last_b["callbacks"]["ShuffleState"])


def same(a, b):
    """Exact equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (with its own, fresh pretraining cache)."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run("train.py", RUN + [f"hydra.run.dir={tmp / 'run'}"], tmp, cache=tmp / "cache")
    return {"dir": tmp / "run", "cache": tmp / "cache", "log": out.stdout + out.stderr}


# ------------------------------------------------------------------------------------------ 1. kill and resume
def test_training_killed_anywhere_resumes_to_identical_results(reference, tmp_path):
    """Killed during pretraining, in the epoch-0 attribution, mid-epoch, while writing the resume checkpoint and
    while renaming a metrics file; each time restarted with the documented command; the end equals the
    uninterrupted run."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = RUN + [f"hydra.run.dir={run_dir}"]
    resume = args + ["resume=true"]
    run("train.py", args, tmp_path, kill="pretrain_step:10", cache=cache)
    assert not [p for p in cache.glob("tiny-olmo3-*") if (p / "config.json").is_file() and ".tmp" not in p.name]
    run("train.py", resume, tmp_path, kill="shard:4", cache=cache)  # test_queries: 3 shards + store
    assert (run_dir / "attribution/epoch_000/stores/test_queries.safetensors").is_file()
    assert not (run_dir / "attribution/epoch_000/metrics.json").exists()
    log = run("train.py", resume, tmp_path, kill="train_step:9", cache=cache).stdout  # epoch 2, 3rd step
    assert "test_queries.safetensors: store complete, reused" in log
    log = run("train.py", resume, tmp_path, kill="checkpoint:1", cache=cache).stdout  # writing last.ckpt (epoch 2)
    assert "resuming from" in log and "epoch_001: complete" not in log
    assert list((run_dir / "resume").glob("last.ckpt.tmp*"))  # the half-written checkpoint ...
    assert torch.load(run_dir / "resume/last.ckpt", weights_only=True)["epoch"] == 0  # ... never replaced it
    log = run("train.py", resume, tmp_path, cache=cache).stdout
    assert "resuming from" in log and "epoch_002: complete" in log  # the killed save came after epoch 2's
    assert not list(run_dir.rglob("*.tmp[0-9]*"))  # attribution: not redone
    ref_model = next(reference["cache"].glob("tiny-olmo3-*/model.safetensors"))
    assert next(cache.glob("tiny-olmo3-*/model.safetensors")).read_bytes() == ref_model.read_bytes()
    assert_same_results(reference["dir"], run_dir)


def test_resume_refuses_other_settings_and_a_fresh_run_refuses_a_used_folder(reference):
    from omegaconf import open_dict

    from lark.errors import RunDirError
    from lark.experiment import train

    cfg = compose(RUN + ["resume=true", "optimizer.lr=0.5"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(reference["dir"])
    with pytest.raises(RunDirError, match=r"optimizer\.lr was"):
        train(cfg)
    cfg = compose(RUN)
    with open_dict(cfg):
        cfg.paths.output_dir = str(reference["dir"])
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg)


def test_a_refused_or_resumed_start_keeps_the_runs_hydra_files(reference, tmp_path):
    """Hydra rewrote <run>/.hydra at every start, before LARK refused it: a resume refused for format=noformat left
    .hydra/config.yaml saying noformat, and attribute.py then re-attributed the chatml-trained checkpoints as
    noformat; a resume put `resume=true` into the overrides the report and a sweep's labels show."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    names = ("config.yaml", "hydra.yaml", "overrides.yaml")
    before = {n: (run_dir / ".hydra" / n).read_bytes() for n in names}
    assert all((run_dir / ".hydra" / "first_start" / n).read_bytes() == before[n] for n in names)
    out = run("train.py", RUN + [f"hydra.run.dir={run_dir}", "resume=true", "format=noformat"], tmp_path, check=False)
    assert out.returncode == 2 and "with other settings than" in out.stderr, out.stderr[-2000:]
    out = run("train.py", RUN + [f"hydra.run.dir={run_dir}"], tmp_path, check=False)
    assert out.returncode == 2 and "already holds a run" in out.stderr, out.stderr[-2000:]
    assert {n: (run_dir / ".hydra" / n).read_bytes() for n in names} == before


def compose_value(path, key):
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(path), key)


def test_resume_compares_with_the_started_config_without_checkpoints_and_needs_a_run(tmp_path):
    """attribution.save_checkpoints=false: no epoch_000 config is written, and a resume with another k was not
    refused; the run keeps its started config at <run>/lark_config.yaml. resume=true in a folder Hydra made for
    this start (no hydra.run.dir) would silently start over: refused; a chosen empty folder starts."""
    from omegaconf import open_dict

    from lark.errors import RunDirError
    from lark.experiment import open_run
    from lark.resume import check_resumable

    def config(*extra):
        cfg = compose(RUN + ["attribution.save_checkpoints=false", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    open_run(config("attribution.projector.k=640"), log=lambda m: None)  # a start that failed on its input
    open_run(config(), log=lambda m: None)  # nothing computed: started again with other settings
    assert compose_value(tmp_path / "run" / "lark_config.yaml", "attribution.projector.k") != 640
    # data/ alone is no result (made again at every start): a start that failed in the model's load after writing
    # it pinned its config, so the resume with the mended value was refused
    (tmp_path / "run" / "data").mkdir()
    open_run(config("resume=true", "attribution.projector.k=2048"), log=lambda m: None)
    assert compose_value(tmp_path / "run" / "lark_config.yaml", "attribution.projector.k") == 2048
    (tmp_path / "run" / "checkpoints").mkdir()  # a result
    with pytest.raises(RunDirError, match=r"attribution\.projector\.k was"):
        open_run(config("resume=true"), log=lambda m: None)
    # keys that change no result resume: the start-up check (its own error says preflight=false skips it), the
    # loader's worker processes, where the caches live (LARK_CACHE: the BM25 index_dir keys derived from it)
    same = ["resume=true", "attribution.projector.k=2048"]
    open_run(config(*same), log=lambda m: None)  # the same settings resume
    elsewhere = f"paths.cache_dir={tmp_path / 'other_cache'}"
    open_run(config(*same, "preflight=false", "num_workers=1", elsewhere), log=lambda m: None)
    with pytest.raises(RunDirError, match="holds no run to resume.*hydra.run.dir"):
        check_resumable(tmp_path / "new", chosen=False)
    check_resumable(tmp_path / "new", chosen=True)


# ---------------------------------------------------------------------------------------- 2. attribution shards
def test_attribute_py_killed_resumes_from_complete_shards(reference, tmp_path):
    """attribute.py attributing epoch 0 afresh (shards of 4) killed after 2 shards; run again, it reuses the 2
    shards, recomputes only the one in flight, and writes the same scores as the uninterrupted run."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    shutil.rmtree(run_dir / "attribution/epoch_000")
    args = [f"run_dir={run_dir}", "+attribution.checkpoints=[0]", "analyze=false"]
    run("attribute.py", args, tmp_path, kill="shard:2")
    assert len(list((run_dir / "attribution/epoch_000/shards").glob("test_queries.*"))) == 2
    log = run("attribute.py", args, tmp_path).stdout
    assert log.count("shard complete, reused") == 2
    assert not (run_dir / "attribution/epoch_000/shards").exists()
    assert_same_results(reference["dir"], run_dir)


# ------------------------------------------------------------------------------------------- 3. atomic artifacts
def test_a_write_killed_before_its_rename_leaves_the_old_file_and_a_reported_leftover(tmp_path):
    from lark.errors import RunDirError
    from lark.rundir import clean, problems, require_complete

    target = tmp_path / "attribution" / "epoch_001" / "metrics.json"
    target.parent.mkdir(parents=True)
    target.write_text('{"epoch": 1}')
    code = f"from lark.data.io import write_jsonl; write_jsonl([{{'a': 1}}] * 1000, {str(target)!r})"
    run("-c", [code], tmp_path, kill="write:1")
    assert target.read_text() == '{"epoch": 1}'  # the reader still sees the complete old file
    (tmp_path / "attribution" / "epoch_002").mkdir()  # an epoch that never finished
    found = problems(tmp_path)
    assert any("metrics.json.tmp" in p and "interrupted write" in p for p in found)
    assert any("epoch_002: no metrics.json" in p for p in found)
    with pytest.raises(RunDirError, match="incomplete, not trusted"):
        require_complete(tmp_path)
    clean(tmp_path, log=lambda m: None)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_an_incomplete_run_is_told_the_command_that_finishes_it(tmp_path):
    """A run killed mid-training was told to finish with `attribute.py`, which stops at the first missing
    checkpoint; the advice now follows what the run lacks."""
    from omegaconf import OmegaConf

    from lark.errors import RunDirError
    from lark.rundir import require_complete

    OmegaConf.save({"trainer": {"max_epochs": 2}, "attribution": {"checkpoints": "all"}}, tmp_path / "lark_config.yaml")
    for epoch in (0, 1):
        (tmp_path / f"checkpoints/epoch_{epoch:03d}").mkdir(parents=True)
        (tmp_path / f"checkpoints/epoch_{epoch:03d}/model.safetensors").write_bytes(b"weights")
    (tmp_path / "attribution/epoch_000").mkdir(parents=True)
    (tmp_path / "attribution/epoch_000/metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"training stopped before epoch 2: .*train\.py .*resume=true") as e:
        require_complete(tmp_path)
    assert "attribute.py" not in str(e.value)
    (tmp_path / "checkpoints/epoch_002").mkdir()
    (tmp_path / "checkpoints/epoch_002/model.safetensors").write_bytes(b"weights")
    with pytest.raises(
        RunDirError, match=rf"every checkpoint is there: .*attribute\.py run_dir={re.escape(str(tmp_path))}"
    ):
        require_complete(tmp_path)


def test_a_truncated_store_is_recomputed_not_trusted(reference, tmp_path, one_thread):
    from lark.experiment import attribute

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    store = run_dir / "attribution/epoch_001/stores/finetune.safetensors"
    store.write_bytes(store.read_bytes()[:1000])  # as if cut off by a crash or a full disk
    (run_dir / "attribution/epoch_001/metrics.json").unlink()
    logs = []
    attribute(run_dir, {"checkpoints": [1]}, log=logs.append)
    assert not any("finetune.safetensors: store complete" in line for line in logs)
    assert any("test_queries.safetensors: store complete, reused" in line for line in logs)
    assert_same_results(reference["dir"], run_dir)


def test_a_corrupted_data_file_is_refused_not_scored(reference, tmp_path):
    """data/checksums.json lists what attribution and validation read back (train, test, sources, the world); one
    flipped byte in a source's text stops attribute() and load_run naming the file, and nothing is recomputed."""
    from lark.errors import CorruptFile
    from lark.experiment import attribute
    from lark.validation.load import load_config, load_run

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    listed = json.loads((run_dir / "data" / "checksums.json").read_text())
    assert {"train.jsonl", "test.jsonl", "world/provenance.json"} <= set(listed)
    assert any(name.startswith("sources/") for name in listed) and "warnings.json" not in listed
    source = next(run_dir.glob("data/sources/*noformat.jsonl"))
    text = source.read_bytes()
    at = text.index(b'"text": "') + 12
    source.write_bytes(text[:at] + bytes([text[at] ^ 1]) + text[at + 1 :])
    stores = {p: p.stat().st_mtime_ns for p in run_dir.glob("attribution/*/stores/*.safetensors")}
    with pytest.raises(CorruptFile, match=f"{source.name}: checksum mismatch"):
        attribute(run_dir, {"checkpoints": [1]}, resume=False)
    with pytest.raises(CorruptFile, match=f"{source.name}: checksum mismatch"):
        load_run(run_dir, load_config())
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("attribution/*/stores/*.safetensors")} == stores


def test_analysis_refuses_a_partial_run(reference, tmp_path):
    from lark.analysis.analyze import analyze
    from lark.errors import RunDirError

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    (run_dir / "attribution/epoch_001/metrics.json").unlink()
    with pytest.raises(RunDirError, match="epoch_001: no metrics.json"):
        analyze(run_dir)


def _code_only(source):
    """`source` with the text of its longer string literals blanked (a message that names save_pretrained()
    writes nothing; a mode such as "wb" stays); lines stay where they were."""
    import io
    import tokenize

    lines = source.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and tok.start[0] == tok.end[0] and len(tok.string) > 5:
            row, (c0, c1) = tok.start[0] - 1, (tok.start[1], tok.end[1])
            lines[row] = lines[row][:c0] + '""' + " " * (c1 - c0 - 2) + lines[row][c1:]
    return "".join(lines)


def test_every_writer_goes_through_a_temporary_name(reference, tmp_path, monkeypatch):
    """Statically: no write call in lark/ outside a temporary path. Dynamically: analysis, the world, JSON Lines,
    stores and Lightning checkpoints open nothing for writing under its final name."""
    import builtins
    import re

    write = re.compile(
        r"open\([^)]*[\"'][wa]b?[\"']|\.write_text\(|\.write_bytes\(|savefig\(|torch\.save\(|"
        r"save_file\(|save_pretrained\("
    )
    # a log appended to (a retrain's console output) is a record for people, never read back as a result
    appended_log = re.compile(r"open\([^)]*log[^)]*[\"']ab?[\"']", re.IGNORECASE)
    offenders = [
        f"{p.name}:{n}: {line.strip()}"
        for p in (ROOT / "lark").rglob("*.py")
        for n, line in enumerate(_code_only(p.read_text()).splitlines(), 1)
        if write.search(line) and "tmp" not in line and not appended_log.search(line)
    ]
    assert not offenders, offenders
    opened, real_open = [], builtins.open

    def spy(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            opened.append(Path(file))
        return real_open(file, mode, *args, **kwargs)

    from lark.analysis.analyze import analyze
    from lark.data.world import generate_world, save_world
    from lark.kernel.stores import save_store
    from lark.resume import AtomicCheckpointIO

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"] / "attribution", run_dir / "attribution")
    monkeypatch.setattr(builtins, "open", spy)
    analyze(run_dir)
    save_world(
        generate_world(seed=1, n_train=10, n_test=5, n_facts=10, n_medical_docs=30, n_entertainment_docs=5),
        tmp_path / "world",
    )
    save_store(tmp_path / "s.safetensors", torch.randn(3, 8), ["a", "b", "c"], {"set": "x"})
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "last.ckpt")
    assert len(opened) > 10 and all(".tmp" in p.name for p in opened), [p for p in opened if ".tmp" not in p.name]


# ---------------------------------------------------------------------------------- 4. stores that cannot be mixed
@pytest.mark.parametrize(
    "field,change",
    [
        ("projector.seed", {"projector": {"kind": "sketch", "k": 8, "seed": 1, "version": 1}}),
        ("projector.version", {"projector": {"kind": "sketch", "k": 8, "seed": 0, "version": 2}}),
        ("checkpoint", {"checkpoint": "other"}),
        ("tokenizer", {"tokenizer": "other"}),
        ("format", {"format": "noformat:123"}),
    ],
)
def test_scoring_stores_that_disagree_refuses_naming_the_field(tmp_path, field, change):
    from lark.errors import StoreMismatch
    from lark.kernel.stores import faiss_index, score_stores

    meta = {
        "projector": {"kind": "sketch", "k": 8, "seed": 0, "version": 1},
        "checkpoint": "abc",
        "tokenizer": "def",
        "format": "chatml:456",
        "set": "q",
    }
    from lark.kernel.stores import save_store

    save_store(tmp_path / "q.safetensors", torch.randn(2, 8), ["q1", "q2"], meta)
    save_store(tmp_path / "same.safetensors", torch.randn(3, 8), ["d1", "d2", "d3"], {**meta, "set": "d"})
    save_store(tmp_path / "d.safetensors", torch.randn(3, 8), ["d1", "d2", "d3"], {**meta, **change, "set": "d"})
    assert score_stores(tmp_path / "q.safetensors", tmp_path / "same.safetensors").shape == (2, 3)
    with pytest.raises(StoreMismatch, match=rf"{field.replace('.', '[.]')} differs"):
        score_stores(tmp_path / "q.safetensors", tmp_path / "d.safetensors")
    with pytest.raises(StoreMismatch, match=field.split(".")[0]):
        faiss_index([tmp_path / "q.safetensors", tmp_path / "d.safetensors"])
    with pytest.raises(StoreMismatch, match=r"k differs"):
        save_store(tmp_path / "k.safetensors", torch.randn(3, 4), ["d1", "d2", "d3"], meta)
        score_stores(tmp_path / "q.safetensors", tmp_path / "k.safetensors")


def test_run_stores_record_projector_fingerprints_and_ids(reference):
    folder = reference["dir"] / "attribution/epoch_001"
    metrics = json.loads((folder / "metrics.json").read_text())
    for path in (folder / "stores").iterdir():
        meta = {k: json.loads(v) for k, v in tensors(path)[0].items()}
        assert {"kind", "k", "seed", "version"} <= set(meta["projector"])
        assert meta["checkpoint"] == metrics["fingerprints"]["checkpoint"] and len(meta["checkpoint"]) == 16
        assert meta["tokenizer"] and meta["format"].startswith("chatml:") and meta["examples"]
        assert len(meta["ids"]) == len(set(meta["ids"])) > 0
    assert (
        metrics["fingerprints"]["checkpoint"]
        != json.loads((reference["dir"] / "attribution/epoch_000/metrics.json").read_text())["fingerprints"][
            "checkpoint"
        ]
    )


# ------------------------------------------------------------------------------------------------ 5. bad input
def qa(i, **change):
    record = {
        "pubid": str(1000 + i),
        "question": f"Does drug {i} work?",
        "contexts": ["Some context."],
        "labels": ["BACKGROUND"],
        "long_answer": "It does.",
        "final_decision": "yes",
        "split": "test" if i % 2 else "train",
    }
    return {**record, **change}


def doc(i, **change):
    return {"id": f"d{i}", "text": f"Document number {i} about things.", **change}


def drop(record, key):
    return {k: v for k, v in record.items() if k != key}


# (name, bad line or None for a file-level fault, QA field / document field named in the message)
FAULTS = {
    "invalid_json": (lambda make: b'{"pubid": "1", "question": ', "invalid JSON"),
    "missing_field": (
        lambda make: json.dumps(drop(make(7), "question" if make is qa else "text")).encode(),
        "missing field",
    ),
    "wrong_type": (
        lambda make: json.dumps(make(7, **({"contexts": 5} if make is qa else {"text": 5}))).encode(),
        "must be",
    ),
    "empty_text": (
        lambda make: json.dumps(make(7, **({"question": ""} if make is qa else {"text": ""}))).encode(),
        "is empty",
    ),
    "whitespace_text": (
        lambda make: json.dumps(make(7, **({"question": " \t "} if make is qa else {"text": "\n "}))).encode(),
        "is empty",
    ),
    "non_utf8": (lambda make: json.dumps(make(7)).encode().replace(b'"', b'"\xff', 1), "not valid UTF-8"),
    "duplicate_id": (lambda make: json.dumps(make(1)).encode(), "duplicate id"),
    "huge_line": (
        lambda make: json.dumps(
            make(7, **({"question": "x" * 50_000_000} if make is qa else {"text": "x" * 50_000_000}))
        ).encode(),
        "longer than",
    ),
}


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize(
    "kind,fault", [(k, f) for k in ("pubmedqa", "corpus") for f in FAULTS] + [("pubmedqa", "unknown_label")]
)  # documents have no label
def test_every_bad_row_stops_the_loader_naming_file_line_and_field_or_is_skipped_and_counted(tmp_path, kind, fault):
    from conftest import load_pubmedqa_local
    from omegaconf import OmegaConf

    from lark.data.io import BadRows
    from lark.data.readers import DataError, load_corpus

    make = qa if kind == "pubmedqa" else doc
    bad_line = (
        (lambda m: json.dumps(m(7, final_decision="perhaps")).encode(), "final_decision")
        if fault == "unknown_label"
        else FAULTS[fault]
    )
    path = tmp_path / "data.jsonl"
    write_lines(
        path,
        [json.dumps(make(i)).encode() for i in range(1, 5)]
        + [bad_line[0](make)]
        + [json.dumps(make(i)).encode() for i in range(5, 7)],
    )
    cfg = OmegaConf.create({"path": str(path), "text_field": "text", "id_field": "id"})
    load = (
        (lambda bad: load_pubmedqa_local(path, bad=bad))
        if kind == "pubmedqa"
        else (lambda bad: [load_corpus(cfg, bad=bad)])
    )
    with pytest.raises(DataError) as error:
        load(BadRows("error"))
    assert f"{path}:5: " in str(error.value) and bad_line[1] in str(error.value)
    bad = BadRows("skip")
    kept = sum(map(len, load(bad)))
    assert kept == 6 and bad.report()["skipped"] == 1 and f"{path}:5" in bad.messages[0]


@pytest.mark.parametrize("fault", ["empty_file", "blank_file", "missing_file"])
def test_empty_and_missing_files_stop_every_file_loader(tmp_path, fault):
    from conftest import load_pubmedqa_local
    from omegaconf import OmegaConf

    from lark.data.io import BadRows
    from lark.data.readers import DataError, load_corpus, read_examples
    from lark.data.world import load_world

    path = tmp_path / "data.jsonl"
    if fault != "missing_file":
        path.write_text("" if fault == "empty_file" else "\n  \n")
    cfg = OmegaConf.create({"path": str(path), "text_field": "text", "id_field": "id"})
    for load in (
        lambda: load_pubmedqa_local(path, bad=BadRows("skip")),
        lambda: load_corpus(cfg),
        lambda: read_examples(path),
    ):
        with pytest.raises(DataError, match=str(path)):
            load()
    with pytest.raises(DataError, match="file not found|no records"):
        load_world(tmp_path)


@pytest.mark.parametrize(
    "row,field",
    [
        (
            {"pubid": 1, "question": "Q?", "context": {"contexts": ["c"], "labels": []}, "final_decision": "perhaps"},
            "final_decision",
        ),
        ({"pubid": 1, "question": "Q?", "context": "not an object", "final_decision": "yes"}, "context"),
        (
            {"pubid": 1, "question": "  ", "context": {"contexts": ["c"], "labels": []}, "final_decision": "yes"},
            "question",
        ),
        (
            {"pubid": [1], "question": "Q?", "context": {"contexts": ["c"], "labels": []}, "final_decision": "yes"},
            "pubid",
        ),
    ],
)
def test_hub_rows_are_checked_like_lines(monkeypatch, row, field):
    import datasets
    from conftest import load_pubmedqa_hub

    from lark.data.io import BadRows
    from lark.data.readers import DataError

    good = {"pubid": 2, "question": "Q?", "context": {"contexts": ["c"], "labels": []}, "final_decision": "no"}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [good, row])
    with pytest.raises(DataError, match=rf"row 1: .*'?{field}"):
        load_pubmedqa_hub("x/pubmedqa", "pqa", test_ids={"2"})
    bad = BadRows("skip")
    assert load_pubmedqa_hub("x/pubmedqa", "pqa", test_ids={"2"}, bad=bad)[1][0]["id"] == "2"
    assert len(bad.messages) == 1


def test_a_corrupted_run_file_stops_attribution_naming_file_line_and_field(reference, tmp_path):
    from lark.data.readers import DataError
    from lark.experiment import attribute

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    path = run_dir / "data/sources/finetune.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "answer": 3})
    path.write_text("\n".join(lines) + "\n")
    from lark.errors import CorruptFile

    with pytest.raises(CorruptFile, match=f"{path}: checksum mismatch"):  # changed after training: data/checksums
        attribute(run_dir, log=lambda m: None)
    (run_dir / "data" / "checksums.json").unlink()  # a run from before the data checksums: read, row by row
    with pytest.raises(DataError, match=f"{path}:3: field 'answer' must be str"):
        attribute(run_dir, log=lambda m: None)


def test_train_py_stops_before_compute_on_bad_data_and_skip_mode_counts(tmp_path):
    """A bad row in a local PubMedQA file: train.py prints one line naming file, line and field, exits 2, and has
    written no checkpoint; with data.on_bad_rows=skip the loaders count and report it instead."""
    data = tmp_path / "pqa.jsonl"
    write_lines(
        data, [json.dumps(qa(i)).encode() for i in range(1, 9)] + [json.dumps(qa(9, final_decision="?")).encode()]
    )
    corpus = tmp_path / "docs.jsonl"
    write_lines(corpus, [json.dumps(doc(i)).encode() for i in range(20)])
    args = [
        "data=pubmedqa_local",
        f"data.reader.path={data}",
        f"data.corpora.medical.path={corpus}",
        f"data.corpora.entertainment.path={corpus}",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    out = run("train.py", args, tmp_path, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"[lark] error: {data}:9: field 'final_decision' is '?'" in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    from omegaconf import open_dict

    from lark.experiment import prepare_data

    cfg = compose(
        [
            "data=pubmedqa_local",
            f"data.reader.path={data}",
            f"data.corpora.medical.path={corpus}",
            f"data.corpora.entertainment.path={corpus}",
            "data.on_bad_rows=skip",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "skip")
    train, test, _ = prepare_data(cfg, tmp_path / "skip", log=lambda m: None)
    assert len(train) + len(test) == 8
    report = json.loads((tmp_path / "skip/data/bad_rows.json").read_text())
    assert report["skipped"] == 1 and f"{data}:9" in report["messages"][0]


@pytest.mark.parametrize(
    "override,key",
    [
        ("source.sources.finetune.kind=bogus", "source.sources.finetune.kind"),
        ("attribution.projector.k=0", "attribution.projector.k"),
        ("attribution.projector.k=-4", "attribution.projector.k"),
        ("attribution.projector._target_=lark.nope.Projector", "attribution.projector._target_"),
        ("attribution.kernel._target_=lark.kernel.kernels.Nope", "attribution.kernel._target_"),
        ("trainer.max_epochs=-1", "trainer.max_epochs"),
        ("attribution.store_dtype=float8", "attribution.store_dtype"),
        ("attribution.shard_size=0", "attribution.shard_size"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows"),
        ("data.reader.path=/no/such/file.jsonl", "data.reader.path"),
        ("data.corpora.medical.path=/no/such/abstracts.jsonl", "data.corpora.medical.path"),
        ("source.sources.medical_format.corpus=nope", "source.sources.medical_format.corpus"),
        ("+data.corpora.third.limit=3", "data.corpora.third"),
        ("data.test_ids=/no/such/ids.txt", "data.test_ids"),
    ],
)
def test_bad_config_values_fail_at_start_naming_the_key(override, key, tmp_path):
    from lark.config_checks import check_config
    from lark.errors import ConfigError

    (tmp_path / "f").write_text("x")
    keys = ("data.reader.path", "data.corpora.medical.path", "data.corpora.entertainment.path")
    local = [f"{k}={tmp_path / 'f'}" for k in keys]
    overrides = ["data=pubmedqa_local", *[o for o in local if o.split("=")[0] != key], override]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(compose(overrides))


def test_k_larger_than_the_model_allows_fails_naming_the_key(tmp_path):
    from lark.errors import ConfigError
    from lark.experiment import check_attribution

    cfg = compose(["attribution.projector.k=4096"])
    with pytest.raises(ConfigError, match=r"attribution\.projector\.k=4,096 is larger than the 6 trainable"):
        check_attribution(cfg, tmp_path, torch.nn.Linear(2, 2), {"a": [1]}, 1, range(2))


# ----------------------------------------------------------------------------------------- 6. numerical faults
def test_nonfinite_gradients_are_reported_by_id_and_left_out(reference, tmp_path, monkeypatch):
    """An example whose gradient is inf (a query) or NaN (a document), in the bit tier that would turn NaN into
    a valid-looking sign vector: the ids are in metrics.json with a count, the metrics use the other rows, and
    every other score equals the clean run's."""
    from omegaconf import OmegaConf

    import lark.checkpoint as C
    from lark.data.formats import encode
    from lark.data.readers import qa_record, read_examples
    from lark.data.sources import query_examples
    from lark.models import load_pretrained

    cfg = OmegaConf.load(reference["dir"] / ".hydra/config.yaml")
    cfg.attribution.store_dtype = "bit"
    model, tok = load_pretrained(reference["dir"] / "checkpoints/epoch_001", cfg.model)
    items = read_examples(reference["dir"] / "data/test.jsonl", qa_record)
    sets = {n: read_examples(reference["dir"] / f"data/sources/{n}.jsonl") for n in cfg.source.sources}
    queries = query_examples(items, cfg.format)
    bad = {
        tuple(encode(tok, e, cfg.format, cfg.max_length)["input_ids"]): value
        for e, value in ((queries[3], float("inf")), (sets["medical_format"][2], float("nan")))
    }
    real = C.make_projector

    def poisoned(*args, **kwargs):
        projector = real(*args, **kwargs)
        project = projector.project_batch

        def project_batch(m, batch):
            out = project(m, batch).clone()
            for row, (ids, mask) in enumerate(zip(batch["input_ids"].tolist(), batch["attention_mask"].sum(1))):
                out[row] += bad.get(tuple(ids[:mask]), 0.0)
            return out

        projector.project_batch = project_batch
        return projector

    def attribute(folder):
        ck = C.Checkpoint(cfg, model, tok, folder, epoch=1, log=lambda m: None)
        return C.attribute_checkpoint(ck, sets, queries, {"epoch": 1})[0]

    clean = attribute(tmp_path / "clean")
    monkeypatch.setattr(C, "make_projector", poisoned)
    metrics = attribute(tmp_path / "bad")
    assert metrics["nonfinite"]["count"] == 2
    assert metrics["nonfinite"]["ids"]["test_queries"] == [queries[3]["id"]]
    assert metrics["nonfinite"]["ids"]["medical_format"] == [sets["medical_format"][2]["id"]]
    assert all(s["n_nonfinite"] == 1 for s in metrics["sources"].values())
    assert metrics["ft"] is not None and metrics["pt"] is not None
    for name in cfg.source.sources:
        a = tensors(tmp_path / f"clean/attribution/epoch_001/scores/{name}.safetensors")[1]["scores"]
        b = tensors(tmp_path / f"bad/attribution/epoch_001/scores/{name}.safetensors")[1]["scores"]
        keep = [i for i in range(len(queries)) if i != 3]
        cols = [j for j in range(b.shape[1]) if not (name == "medical_format" and j == 2)]
        assert torch.isnan(b[3]).all() and torch.equal(a[keep][:, cols], b[keep][:, cols])
    assert clean["nonfinite"]["count"] == 0


# ------------------------------------------------------------------------------------------- 7. hostile files
class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_stores_checkpoints_and_resume_state_never_unpickle(reference, tmp_path):
    import pickle

    from omegaconf import open_dict

    from lark.errors import RunDirError
    from lark.experiment import attribute, train
    from lark.kernel.stores import load_store
    from lark.resume import AtomicCheckpointIO

    pickle.loads(pickle.dumps(Payload(tmp_path / "live")))
    assert (tmp_path / "live").exists()  # the payload is live when unpickled
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(Exception, match="header|deserializ|invalid|Error"):
        load_store(hostile)  # safetensors: never a pickle reader
    torch.save({"state_dict": Payload(marker)}, tmp_path / "hostile.ckpt")
    for path in (hostile, tmp_path / "hostile.ckpt"):
        with pytest.raises(RunDirError, match="refusing to load a checkpoint that holds more than tensors"):
            AtomicCheckpointIO().load_checkpoint(path)  # torch.load(weights_only=True)
    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    shutil.copy(hostile, run_dir / "checkpoints/epoch_001/pytorch_model.bin")
    with pytest.raises(RunDirError, match="pytorch_model.bin"):
        attribute(run_dir, {"checkpoints": [1]}, log=lambda m: None)
    shutil.copy(tmp_path / "hostile.ckpt", run_dir / "resume/last.ckpt")  # resume state: train.py's path
    cfg = compose(RUN + ["resume=true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(reference["cache"])
    with pytest.raises(RunDirError, match="last.ckpt: refusing to load"):
        train(cfg, log=lambda m: None)
    assert not marker.exists()


def test_model_folders_with_only_pickled_weights_are_refused(reference, tmp_path):
    """Base models and checkpoints load with use_safetensors=True: a folder (or hub repo) whose weights are only a
    pickle is refused before anything is unpickled."""
    from lark.models import load_pretrained

    folder = tmp_path / "model"
    shutil.copytree(reference["dir"] / "checkpoints" / "epoch_001", folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"lm_head.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_pretrained(folder, compose(RUN).model)
    assert not marker.exists()


def test_remote_code_is_never_run_unless_configured(reference, tmp_path):
    """A checkpoint whose config maps AutoModelForCausalLM to its own code: loaded with the default config the
    code is never imported; only model.trust_remote_code=true runs it."""
    from omegaconf import OmegaConf

    from lark.models import load_pretrained

    for path in (ROOT / "conf/model").glob("*.yaml"):
        assert OmegaConf.load(path).get("trust_remote_code", False) is False, path
    folder, marker = tmp_path / "custom", tmp_path / "pwned"
    shutil.copytree(reference["dir"] / "checkpoints/epoch_000", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Evil"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    model, _ = load_pretrained(folder, OmegaConf.create({"dtype": "float32"}))
    assert type(model).__name__ == "Olmo3ForCausalLM" and not marker.exists()
    with pytest.raises(Exception):
        load_pretrained(folder, OmegaConf.create({"dtype": "float32", "trust_remote_code": True}))
    assert marker.exists()  # the key, and only the key, runs it


def test_wandb_failures_degrade_to_a_warning(tmp_path, monkeypatch):
    import wandb

    from lark.loggers import log_metrics, wandb_logger

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="W&B logging disabled"):
        assert wandb_logger("p", "n", save_dir=str(not_a_dir / "wandb")) is None  # unwritable folder

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.warns(UserWarning, match="No space left on device"):
        assert wandb_logger("p", "n", save_dir=str(tmp_path / "w"), offline=False) is None  # no network, full disk

    class Broken:
        def log_metrics(self, metrics, step):
            raise OSError(28, "No space left on device")

    class Trainer:
        loggers = [Broken()]

    with pytest.warns(UserWarning, match="could not log metrics"):
        log_metrics(Trainer(), {"a": 1.0}, step=0)


def test_a_resumed_run_logs_into_the_w_and_b_run_it_started(tmp_path, monkeypatch):
    """resume=true opened a new W&B run: the resumed epochs' curves were in another run than the first epochs'."""
    from lark.loggers import wandb_logger

    def run_id(continue_run):
        logger = wandb_logger("p", "n", save_dir=str(tmp_path), continue_run=continue_run)
        logger.experiment.finish()
        return logger.experiment.id

    first = run_id(False)
    assert run_id(True) == first and (tmp_path / "wandb" / "run_id").read_text().strip() == first
    folders = [d.name for d in (tmp_path / "wandb").glob("offline-run-*")]  # two in one second: "-<id>-1"
    assert len(folders) == 2 and all(f"-{first}" in name for name in folders), folders
    assert run_id(False) != first  # a run started over in the folder is a new W&B run
    cfg = compose(["resume=true"])
    assert cfg.logger.wandb.continue_run is True and compose([]).logger.wandb.continue_run is False
    from lightning.pytorch.utilities import rank_zero_only

    from lark.loggers import wandb_run_id

    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)  # another DDP rank, its own process
    saved = (tmp_path / "wandb" / "run_id").read_text()
    assert wandb_run_id(tmp_path, False) is None and (tmp_path / "wandb" / "run_id").read_text() == saved


def test_a_run_continues_when_wandb_cannot_write_its_folder(tmp_path):
    from omegaconf import open_dict

    from lark.experiment import train

    cfg = compose(
        [o for o in SMALL if not o.startswith("trainer.max_epochs")]
        + ["trainer.max_epochs=0", "logger=wandb", "analysis.enabled=false"]
    )
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.logger.wandb.save_dir = str(blocked / "wandb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(cfg, log=lambda m: None)
    assert any("W&B logging disabled" in str(w.message) for w in caught)
    assert (out / "attribution/epoch_000/metrics.json").is_file()


def test_a_base_model_only_run_logs_its_metrics(tmp_path):
    """trainer.max_epochs=0 (attribute the base model alone): its metrics reach the loggers as an epoch's do."""
    import csv

    from omegaconf import open_dict

    from lark.experiment import train

    cfg = compose(
        [o for o in SMALL if not o.startswith("trainer.max_epochs")]
        + ["trainer.max_epochs=0", "logger=csv", "analysis.enabled=false"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    out = train(cfg, log=lambda m: None)
    (metrics,) = out.rglob("metrics.csv")
    columns = next(csv.reader(metrics.open()))
    assert "influence/ft" in columns and "influence/pt_wins" in columns


def test_a_run_that_stops_on_an_error_closes_its_loggers_as_failed(tmp_path, monkeypatch):
    """W&B recorded a crashed run as finished (finalize("success"), exit code 0); a finished run stays success."""
    from omegaconf import open_dict

    import lark.experiment as E

    calls = []

    class Recorder:
        def finalize(self, status):
            calls.append(status)

        @property
        def experiment(self):
            return self

        def finish(self, **kwargs):
            calls.append(kwargs)

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "build_loggers", lambda spec: [Recorder()])
    monkeypatch.setattr(E, "evaluate_checkpoint", crash)
    cfg = compose([o for o in SMALL if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=0"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(OSError, match="No space"):
        E.train(cfg, log=lambda m: None)
    assert calls == ["failed", {"exit_code": 1}]
    calls.clear()
    E.finish([Recorder()])
    assert calls == ["success", {}]


# ------------------------------------------------------------------------------------------------------ 8. disk
def test_attribution_refuses_to_start_without_disk_space(reference, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from lark.errors import RunDirError
    from lark.experiment import attribute

    run_dir = tmp_path / "run"
    shutil.copytree(reference["dir"], run_dir)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RunDirError, match=r"attribution needs about .* GB in .* but only 0\.00 GB is free"):
        attribute(run_dir, {"projector": {"k": 4096}}, log=lambda m: None)
    assert json.loads((run_dir / "attribution/epoch_000/metrics.json").read_text())["projector"]["k"] == 512


# ------------------------------------------------------------------------- 5. property-based: loaders and metrics
BAD_LINES = [
    b"{not json",
    b"[1, 2]",
    b'"text"',
    b"null",
    b'{"id": "x"}',
    b'{"id": "x", "text": 5}',
    b'{"id": "x", "text": " \\t "}',
    b'\xff\xfe{"id": "x", "text": "t"}',
    b'{"id": [1], "text": "t"}',
    b'{"id": true, "text": "t"}',
]
ROWS = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.integers(0, 12), st.text(min_size=1, max_size=30).filter(str.strip)),
        st.tuples(st.just("bad"), st.sampled_from(BAD_LINES), st.none()),
    ),
    max_size=14,
)


@settings(max_examples=40, deadline=None)
@given(rows=ROWS, mode=st.sampled_from(["error", "skip"]))
def test_corpus_loader_keeps_exactly_the_good_rows_or_names_the_first_bad_line(rows, mode):
    import tempfile

    from omegaconf import OmegaConf

    from lark.data.io import BadRows
    from lark.data.readers import DataError, load_corpus

    lines, expected, seen, first_bad, skipped = [], [], set(), None, 0
    for n, (kind, a, b) in enumerate(rows, 1):
        lines.append(a if kind == "bad" else json.dumps({"id": f"d{a}", "text": b}).encode())
        if kind == "bad" or f"d{a}" in seen:
            first_bad, skipped = first_bad or n, skipped + 1
        else:
            seen.add(f"d{a}")
            expected.append({"id": f"d{a}", "text": b})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "docs.jsonl"
        write_lines(path, lines)
        cfg = OmegaConf.create({"path": str(path), "text_field": "text", "id_field": "id"})
        bad = BadRows(mode)
        if not expected or (mode == "error" and first_bad):
            with pytest.raises(DataError) as error:
                load_corpus(cfg, bad=bad)
            where = f"{path}:{first_bad}: " if mode == "error" and first_bad else f"{path}: no documents"
            assert str(error.value).startswith(where)
        else:
            assert load_corpus(cfg, bad=bad) == expected and len(bad.messages) == skipped


SCORE = st.one_of(st.floats(-1, 1, width=32), st.just(float("nan")))


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(SCORE, SCORE), max_size=30))
def test_wins_count_no_ties_and_means_skip_nan(pairs):
    from lark.analysis.metrics import mean_max, wins

    a, b = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    both = torch.isfinite(a) & torch.isfinite(b)
    if not both.any():
        assert wins(a, b) is None
    else:
        ties = (a[both] == b[both]).float().mean().item()
        assert wins(a, b) + wins(b, a) + ties == pytest.approx(1) and wins(a, a) == 0
    finite = a[torch.isfinite(a)]
    assert mean_max(a) == (pytest.approx(finite.mean().item()) if finite.numel() else None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_queries=st.integers(1, 8), sizes=st.lists(st.integers(0, 5), min_size=4, max_size=4))
def test_influence_metrics_ignore_nan_queries_and_empty_sources(data, n_queries, sizes):
    from lark.analysis.metrics import influence_metrics, max_influence, wins

    names = ["ft", "pt", "xf", "xr"]
    nan_rows = data.draw(st.lists(st.integers(0, n_queries - 1), max_size=n_queries, unique=True))
    maxinf = {}
    for name, n_docs in zip(names, sizes):
        values = data.draw(
            st.lists(st.floats(-1, 1, width=32), min_size=n_queries * n_docs, max_size=n_queries * n_docs)
        )
        scores = torch.tensor(values).view(n_queries, n_docs)
        scores[nan_rows] = float("nan")  # queries whose gradient was not finite
        maxinf[name] = max_influence(scores)
    m = influence_metrics(maxinf, "ft", "pt", {"x": ["xf", "xr"]})
    keep = [i for i in range(n_queries) if i not in nan_rows]
    clean = influence_metrics({k: v[keep] for k, v in maxinf.items()}, "ft", "pt", {"x": ["xf", "xr"]})
    for key in ("ft", "pt", "ft_pt_ratio", "ft_wins", "pt_wins", "format_effect"):
        assert m[key] == clean[key]  # NaN queries are left out, nothing else
    for name, n_docs in zip(names, sizes):
        assert m["sources"][name]["n_nonfinite"] == (n_queries if n_docs == 0 else len(nan_rows))
        assert (m["sources"][name]["mean_max"] is None) == (n_docs == 0 or not keep)
    if m["ft_wins"] is not None:
        assert 0 <= m["ft_wins"] <= 1 and m["pt_wins"] == wins(maxinf["pt"], maxinf["ft"])  # strict both ways
    perm = data.draw(st.permutations(range(n_queries)))
    shuffled = influence_metrics({k: v[list(perm)] for k, v in maxinf.items()}, "ft", "pt", {"x": ["xf", "xr"]})
    for key in ("ft_wins", "pt_wins"):
        assert shuffled[key] == m[key]


def test_resume_accepts_keys_added_since_the_run_started(tmp_path):
    """A run started before a config key existed resumes (the key takes today's value); a changed key still stops."""
    from omegaconf import OmegaConf

    from lark.errors import RunDirError
    from lark.resume import check_same_run

    cfg = compose([f"paths.output_dir={tmp_path}"])
    saved = tmp_path / "checkpoints" / "epoch_000" / "lark_config.yaml"
    saved.parent.mkdir(parents=True)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["attribution"]["projector"]["plan_tokens"]
    OmegaConf.save(OmegaConf.create(old), saved)
    check_same_run(cfg, tmp_path)  # no error: the key is new
    changed = OmegaConf.merge(cfg, {"attribution": {"projector": {"k": 1024}}})
    with pytest.raises(RunDirError, match=r"attribution\.projector\.k was 65536, now 1024"):
        check_same_run(changed, tmp_path)


def test_resume_accepts_another_fold_schedule_but_not_another_projection(tmp_path):
    """attribution.projector.fold and cache_bytes change how the sums are scheduled, not what they are: a run
    started with fold=index resumes with fold=slices; another seed still stops it."""
    from omegaconf import OmegaConf

    from lark.errors import RunDirError
    from lark.resume import check_same_run

    cfg = compose([f"paths.output_dir={tmp_path}", "attribution.projector.fold=index"])
    saved = tmp_path / "checkpoints" / "epoch_000" / "lark_config.yaml"
    saved.parent.mkdir(parents=True)
    OmegaConf.save(cfg, saved)
    check_same_run(OmegaConf.merge(cfg, {"attribution": {"projector": {"fold": "slices", "cache_bytes": 0}}}), tmp_path)
    with pytest.raises(RunDirError, match=r"attribution\.projector\.seed was 0, now 1"):
        check_same_run(OmegaConf.merge(cfg, {"attribution": {"projector": {"seed": 1}}}), tmp_path)


@pytest.mark.parametrize("script", ["attribute.py", "analyze.py", "validate.py"])
def test_a_mistyped_run_dir_is_one_line_and_makes_no_folder(script, tmp_path):
    """attribute.py / analyze.py / validate.py run_dir=<no such folder>: exit 2 with one line naming it, and no
    folder made (Hydra would create run_dir for its log before the script could say the run is missing)."""
    missing = tmp_path / "runs" / "typo"
    done = subprocess.run(
        [sys.executable, script, f"run_dir={missing}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        f"[lark] error: run_dir={missing}: not a directory (a run folder written by train.py)"
    ), done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_sweeps_folder_given_to_attribute_or_validate_names_its_jobs(tmp_path, capsys):
    """attribute.py / validate.py take one run; a sweep's folder answered '.hydra/config.yaml: not found' and left
    a log in the sweep's root. analyze.py compares a sweep's jobs and takes it."""
    from lark.console import require_run_dir

    (tmp_path / "multirun.yaml").write_text("{}")
    for job in ("0", "1"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        require_run_dir([f"run_dir={tmp_path}"])
    assert (
        stop.value.code == 2
        and f"a sweep's folder; give one job's run folder, e.g. run_dir={tmp_path / '0'} (jobs: 0, 1)"
        in capsys.readouterr().err
    )
    require_run_dir([f"run_dir={tmp_path}"], sweep=True)
    require_run_dir([f"run_dir={tmp_path / '0'}"])


@pytest.mark.parametrize("args", [[], ["run_dir="], ["analyze=false"]])
def test_a_missing_or_empty_run_dir_stops_in_one_line(args, capsys):
    """`python attribute.py` without run_dir printed Hydra's 99-line traceback about its ??? value; an empty
    run_dir= analysed the current folder (conf/ taken for a run) and left a log in the checkout."""
    from lark.console import require_run_dir

    with pytest.raises(SystemExit) as stop:
        require_run_dir(args)
    assert stop.value.code == 2 and "[lark] error: run_dir=<run folder> is required" in capsys.readouterr().err
    require_run_dir(["--cfg", "job"])  # Hydra's own flags need no run


def test_a_run_without_attribution_ends_well_and_attribute_py_attributes_it(tmp_path):
    """attribution.enabled=false (evaluation only) ended in analyze's 'no run directory' error, exit 2; its
    checkpoints then could not be attributed: attribute.py kept the run's enabled=false and found none wanted."""
    from omegaconf import open_dict

    from lark.experiment import attribution_config, close_run

    cfg = compose(RUN + ["attribution.enabled=false"])
    lines = []
    close_run(cfg, tmp_path, [], lines.append)
    assert "attribution.enabled=false: no influence tables" in lines[0]
    with open_dict(cfg):
        assert attribution_config(cfg, {"checkpoints": [1]}).attribution.enabled is True


def test_attribute_py_refuses_a_misspelt_attribution_key():
    """attribute.py run_dir=<run> +attribution.checkpont=[0] merged the typo silently: every epoch was attributed
    again (not the one meant) under a new fingerprint. Known keys, nested ones and null-valued ones, merge."""
    from lark.errors import ConfigError
    from lark.experiment import attribution_config

    cfg = compose(RUN)
    for typo in ({"checkpont": [0]}, {"projector": {"kk": 8}}):
        with pytest.raises(ConfigError, match=r"attribution\.(checkpont|projector\.kk): the run's attribution config"):
            attribution_config(compose(RUN), typo)
    merged = attribution_config(cfg, {"checkpoints": [0], "projector": {"k": 1024}, "tokens": "topk"}).attribution
    assert merged.checkpoints == [0] and merged.projector.k == 1024 and merged.tokens == "topk"
    other = {"kernel": {"_target_": "lark.kernel.kernels.TrackStar", "eps": 1e-8, "factored": True, "mix": 0.9}}
    assert attribution_config(compose(RUN), other).attribution.kernel.mix == 0.9  # a group: replaced whole
