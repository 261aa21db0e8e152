"""Preflight (lark.preflight): the paper's command on a machine without hub and GPU stops in seconds with one
`[lark] error:` line per missing thing; cached hub ids, the model-size estimate, the GPU and the disk checks."""

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, SMALL, compose

BLOCK = """import socket
_connect = socket.socket.connect
def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith("127."):
        raise OSError("network blocked by the test: %s" % (address,))
    return _connect(sock, address)
socket.socket.connect = _guard
"""
# allenai/Olmo-3-7B-Instruct's config.json (the numbers that size it); 7,298,011,136 parameters
OLMO3_7B = (
    '{"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 100278, '
    '"num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": false}'
)


def paper_command(tmp_path, offline):
    """`python train.py +experiment=pubmedqa` with every non-loopback connection refused (sitecustomize), an empty
    Hugging Face cache and no visible GPU; returns (completed process, seconds)."""
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(
        PYTHONPATH=f"{tmp_path / 'block'}{os.pathsep}{ROOT}",
        HF_HOME=str(tmp_path / "hf"),
        CUDA_VISIBLE_DEVICES="",
        **({"HF_HUB_OFFLINE": "1"} if offline else {}),
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "train.py", "+experiment=pubmedqa", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, time.perf_counter() - start


@pytest.mark.parametrize("offline", [False, True], ids=["network-blocked", "HF_HUB_OFFLINE"])
def test_paper_command_without_hub_and_gpu_stops_in_seconds(tmp_path, offline):
    done, seconds = paper_command(tmp_path, offline)
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lark] error:")]
    assert done.returncode != 0 and seconds < 10, (seconds, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert [line.split(":")[1].split("=")[0].strip() for line in errors[:4]] == [
        "model.hub_id",
        "data.reader.hub_id",
        "data.corpora.medical.hub_id and data.corpora.entertainment.hub_id",
        "trainer",
    ]
    reason = "HF_HUB_OFFLINE=1" if offline else "the hub cannot be reached"
    assert all(reason in line for line in errors[:3]), errors
    assert "allenai/Olmo-3-7B-Instruct" in errors[0] and "qiaojin/PubMedQA" in errors[1]
    assert all("+experiment=pubmedqa_small" in line and "data=pubmedqa_local" in line for line in errors[:2])
    assert "HF_HUB_OFFLINE=1" in errors[0] and "needs a CUDA device" in errors[3]
    assert not (tmp_path / "run" / "data").exists()  # no work was started


def fake_cache(root, repo, files):
    """A Hugging Face hub cache entry (blobs + snapshot symlinks + refs/main) as huggingface_hub writes it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "abc").mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("abc")
    for n, (name, text) in enumerate(files.items()):
        (folder / "blobs" / f"blob{n}").write_text(text)
        (folder / "snapshots" / "abc" / name).symlink_to(f"../../blobs/blob{n}")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_cached_model_passes_and_is_sized_from_its_config(hub_cache, tmp_path, monkeypatch):
    from lark import preflight as P

    fake_cache(hub_cache, "allenai/Olmo-3-7B-Instruct", {"config.json": OLMO3_7B})
    cfg = compose(["+experiment=pubmedqa", f"hydra.run.dir={tmp_path}"])
    problems = P.hub_problems(cfg)
    assert [p.split("=")[0] for p in problems] == [
        "data.reader.hub_id",
        "data.corpora.medical.hub_id and data.corpora.entertainment.hub_id",
    ]  # the model is cached
    n = P.model_parameters(cfg.model)
    assert n == pytest.approx(7_298_011_136, rel=1e-3)
    assert P.training_bytes(n, "bf16-true") == 8 * n and P.training_bytes(n, "bf16-mixed") == 16 * n
    # Lightning runs "bf16" and "16" as the mixed precisions (float32 master weights): they were counted as -true
    assert P.training_bytes(n, "bf16") == P.training_bytes(n, 16) == P.training_bytes(n, "32") == 16 * n
    monkeypatch.setattr(P, "cuda_devices", lambda: [("A10G", 24e9)])
    small = P.gpu_problems(cfg, n)
    assert len(small) == 1 and "A10G has 24 GB" in small[0] and "needs ~58 GB" in small[0]
    monkeypatch.setattr(P, "cuda_devices", lambda: [("H100", 80e9)])
    assert P.gpu_problems(cfg, n) == []
    monkeypatch.setattr(P, "cuda_devices", lambda: [])
    assert "needs ~58 GB of GPU memory" in P.gpu_problems(cfg, n)[0]


def test_the_embedded_default_passes_and_a_full_disk_is_named(tmp_path, monkeypatch):
    import shutil

    from lark import preflight as P

    cfg = compose(SMALL + [f"hydra.run.dir={tmp_path}"])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    P.preflight(cfg)  # nothing missing: returns
    n = P.model_parameters(cfg.model)
    assert 50_000 < n < 500_000
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    problems = P.disk_problems(cfg, n)
    assert len(problems) == 1 and f"in {tmp_path}" in problems[0] and "3 checkpoints" in problems[0]
    with open_dict(cfg):
        cfg.source.size = 9  # a config not seen yet: checked again
    with pytest.raises(P.PreflightError) as error:
        P.preflight(cfg)
    assert str(error.value).count("\n[lark] error: ") == 1 and "free space" in str(error.value)
    with open_dict(cfg):
        cfg.preflight = False
    P.preflight(cfg)  # preflight=false skips it


def test_a_key_left_at_the_configs_placeholder_is_named_before_any_work():
    """model=hub without model.hub_id (`???`) passed preflight (OmegaConf's .get reads ??? as None), ran the data
    and BM25, then stopped in a MissingMandatoryValue traceback."""
    from lark.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match=r"model\.hub_id: not set"):
        preflight(compose(["model=hub"]))
    with pytest.raises(PreflightError, match=r"data\.reader\.path: not set"):
        preflight(compose(["data=jsonl"]))


def test_an_unsized_model_says_its_checkpoints_disk_is_not_checked(tmp_path):
    """The paper recipes' models (a hub model not yet cached, SmolLM2's GGUF) have no size before they load: the
    disk check of their checkpoints was skipped without a word."""
    from lark.preflight import PreflightError, preflight

    lines = []
    with pytest.raises(PreflightError):  # the folder is not a model either: named as a problem
        preflight(compose(["model=hub", f"model.hub_id={tmp_path}"]), lines.append)
    assert any("size is unknown before it loads" in line for line in lines), lines


def test_the_hub_check_waits_preflight_timeout_s(monkeypatch):
    """Each hub id's check waited a fixed 4 s: behind a slow proxy the run stopped with no key to raise it."""
    import huggingface_hub

    import lark.preflight as P

    asked = []

    class Api:
        def repo_info(self, repo, repo_type, timeout):
            asked.append((repo, timeout))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(P, "cached_repos", lambda: set())
    cfg = compose(["+experiment=pubmedqa", "preflight_timeout_s=30"])
    assert P.hub_problems(cfg) == [] and asked and {timeout for _, timeout in asked} == {30}
    from lark.errors import ConfigError

    for bad in (0, -1, "abc"):  # 0 became the 4 s default; a string failed inside the hub client as "unreachable"
        with pytest.raises(ConfigError, match=f"preflight_timeout_s must be a positive number of seconds, got {bad!r}"):
            P.hub_problems(compose(["+experiment=pubmedqa", f"preflight_timeout_s={bad}"]))
