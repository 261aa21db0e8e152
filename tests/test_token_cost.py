"""benchmarks/token_cost.py --run re-attributes a copy of the run: the run itself is left as it was."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder):
    """{relative path: (md5 of a file's bytes or None for a folder, size, mtime in ns)} of everything under it."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.stat()
        digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(folder))] = (digest, st.st_size if path.is_file() else None, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_token_cost_on_a_run_measures_a_copy_and_leaves_the_run_untouched(tmp_path):
    """A 1-epoch small run, attributed (stores, scores, metrics.json and tokens/ at epochs 0 and 1), then
    token_cost.py --run --epoch 1 --top-k 1 2 (four attributions per top-k, resume=False): every file and folder
    of the run keeps its bytes and modification time, and the rows are measured (off, forward, auto, position per
    top-k)."""
    from conftest import SMALL

    run = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")]
    overrides += ["trainer.max_epochs=1", "logger=none", "attribution.tokens=topk", "attribution.tokens_top_k=1"]
    overrides.append(f"hydra.run.dir={run}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "attribution" / "epoch_001" / "tokens").is_dir()
    before = snapshot(run)

    args = ["--run", str(run), "--epoch", "1", "--repeats", "1", "--top-k", "1", "2"]
    script = ROOT / "benchmarks" / "token_cost.py"
    done = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(
        r"^embedded, tokens_top_k=(\d)\s+(off|topk, forward|topk, auto|topk, position)\s+[0-9.]+", done.stdout, re.M
    )
    assert sorted(rows) == sorted(
        (k, m) for k in "12" for m in ("off", "topk, forward", "topk, auto", "topk, position")
    ), done.stdout

    after = snapshot(run)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"token_cost.py --run changed the run: {changed[:10]}"


def test_token_cost_refuses_an_epoch_the_run_has_not_saved(tmp_path):
    (tmp_path / "checkpoints" / "epoch_000").mkdir(parents=True)
    script = ROOT / "benchmarks" / "token_cost.py"
    args = ["--run", str(tmp_path), "--epoch", "3", "--repeats", "1"]
    done = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "epoch_003: not found" in done.stderr, done.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, str(script), *args[:2], "--projector", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "--projector nope: no " in done.stderr and "nope.yaml" in done.stderr, done.stderr
