"""benchmarks/gpu_check.sh (issue 20, item 4): the engine table imports with torch and transformers alone (the
device machine has no Hydra, omegaconf, rank_bm25, bm25s, W&B or datasets), a fold schedule this branch lacks
is a row that says so, a machine without train.py's packages gets one line naming them, and the whole check --
engine table, then the scaled end-to-end train.py run and the paper's forecast -- runs on a CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("hydra", "omegaconf", "rank_bm25", "bm25s", "wandb", "datasets")

# A Python where the packages the device lacks are absent, as there: the path finder does not find them or their
# submodules (importlib.util.find_spec gives None, `import` raises ModuleNotFoundError); then it runs
# benchmarks/gpu_check.py as a script with the given arguments.
BARE = f"""
import importlib.machinery, runpy, sys

class Bare(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [Bare if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = ["benchmarks/gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]  # nothing got around the block
"""

ENGINE_TINY = ["--device", "cpu", "--configs", "tiny", "--batch", "2", "--seq", "16", "--repeats", "1"]
ENGINE_TINY += ["--rapidin-repeats", "1", "--fidelity-examples", "3", "--k", "4096"]


def run(args, timeout=600):
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_blocker_blocks():
    """The bare interpreter really lacks Hydra: train.py's chain does not import under it."""
    code = BARE.replace('runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")', "import lark.experiment")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "No module named 'hydra'" in done.stderr, done.stderr[-2000:]


def test_engine_table_runs_without_hydra_and_names_what_the_end_to_end_part_lacks(tmp_path):
    """Without Hydra & co. the engine table (lark.kernel) runs; a schedule HookSketch does not know is an
    `unavailable` row, not a crash; the end-to-end part names the missing packages in one line and is skipped."""
    args = [*ENGINE_TINY, "--schedules", "auto", "bogus", "--e2e-wheels", str(tmp_path / "no_wheels")]
    out = run([sys.executable, "-c", BARE, *args])
    assert re.search(r"^tiny\s+sketch none\s+4096\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(r"^tiny\s+sketch none bogus\s+4096\s+nan\s+nan", out, re.M), out
    assert re.search(r"^# tiny sketch none bogus: unavailable \(.*bogus", out, re.M), out
    missing = re.search(r"^\[gpu_e2e\] missing Python packages for train.py: (.*); carry them", out, re.M)
    assert missing and {"hydra-core", "omegaconf", "rank_bm25"} <= set(missing.group(1).split(", ")), out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("SUMMARY device=cpu config=tiny sketch_vs_train_step="), summary
    assert " e2e=missing_packages " in summary and "paper_experiment_minutes=nan" in summary, summary
    assert "sketch_bogus_vs_train_step=nan" in summary, summary


@pytest.mark.slow
def test_gpu_check_sh_runs_the_whole_check_on_a_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --device cpu --configs tiny`: the engine table, then train.py end to end on a
    random-init tiny OLMo-3 made and saved here with the embedded world's tokenizer (model=hub), every stage
    timed at every checkpoint; its last lines one table and the SUMMARY with the paper's forecast."""
    e2e = ["--e2e-train", "8", "--e2e-queries", "4", "--e2e-docs", "4", "--e2e-epochs", "1"]
    out = run(["bash", "benchmarks/gpu_check.sh", *ENGINE_TINY, *e2e, "--e2e-workdir", str(tmp_path / "e2e")])
    assert re.search(r"^tiny\s+train step \(AdamW\)", out, re.M) and "[lark] sketch self-check:" in out, out
    stages = re.findall(r"^e2e\s+(\S+)\s+(\S+)\s+([\d.]+)", out, re.M)
    seen = {(stage, epoch) for stage, epoch, _ in stages}
    for stage, epoch in [("make_model", "-"), ("load", "-"), ("self_check", "-"), ("train", "1")]:
        assert (stage, epoch) in seen, (stage, epoch, out)
    for epoch in ("0", "1"):  # epoch 0 = the base model, 1 = after the one epoch
        assert {("save", epoch), ("evaluate", epoch), ("attribute", epoch)} <= seen, out
    assert re.search(r"^e2e\s+attribute\s+0\s+[\d.]+\s+24\s", out, re.M), out  # 4 queries + 5 x 4 documents
    assert re.search(r"^e2e\s+train\s+1\s+[\d.]+\s+2\s", out, re.M), out  # 8 questions at batch 4
    lines = out.strip().splitlines()
    assert re.match(r"paper\s+total\s+-\s+[\d.]+$", lines[-2]), lines[-2]
    assert re.search(r"^paper\s+attribute\s+-\s+[\d.]+\s+18000\s", out, re.M), out  # 6 x (500 + 2,500)
    assert re.search(r"^paper\s+train\s+-\s+[\d.]+\s+625\s", out, re.M), out  # 500 / 4 x 5 epochs
    summary = lines[-1]
    assert summary.startswith("SUMMARY device=cpu config=tiny ") and " e2e=ok " in summary, summary
    minutes = float(re.search(r" paper_experiment_minutes=([\d.]+) ", summary).group(1))
    assert minutes > float(re.search(r"paper_experiment_minutes_unscaled=([\d.]+)", summary).group(1)) > 0
    checkpoint, model = tmp_path / "e2e" / "run" / "checkpoints" / "epoch_000", tmp_path / "e2e" / "model"
    assert (checkpoint / "config.json").is_file() and (model / "tokenizer.json").is_file()
    weights = [*model.glob("*.safetensors"), *checkpoint.parent.glob("*/*.safetensors")]
    assert not weights, weights  # deleted once loaded / attributed (a 7B run's disk)
