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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_e2e  # noqa: E402  (benchmarks/gpu_e2e.py: standard library only)

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


def test_the_paper_forecast_scales_each_stage_by_its_count_and_tokens():
    """From stage lines as e2e_run.py prints them: 625 steps at the steady step time (the first step left out),
    18,000 gradients at the median per-gradient time, 3,000 evaluated queries, each x (paper tokens / measured
    tokens); save, load and self-check unscaled; moments: epoch 0's pass x 500 / train questions + 5 later ones."""
    lines = [
        "[gpu_e2e] stage=load seconds=20.000",
        "[gpu_e2e] stage=self_check seconds=5.000",
        "[gpu_e2e] stage=moments seconds=4.000 epoch=0",
        "[gpu_e2e] stage=save seconds=10.000 epoch=0",
        "[gpu_e2e] stage=evaluate seconds=2.000 epoch=0 examples=100",
        "[gpu_e2e] stage=attribute seconds=60.000 epoch=0 examples=600 tokens=90000",
        "[gpu_e2e] stage=train seconds=27.000 epoch=1 steps=25 first_step=3.000 examples=100 tokens=12000 "
        "padded_tokens=15000",
        "[gpu_e2e] stage=moments seconds=0.500 epoch=1",
        "[gpu_e2e] stage=save seconds=12.000 epoch=1",
        "[gpu_e2e] stage=attribute seconds=90.000 epoch=1 examples=600 tokens=90000",
        "[lark] epoch_001: ft 0.5",  # not a stage line
    ]
    stages = [s for s in map(gpu_e2e.parse, lines) if s]
    assert len(stages) == 10 and stages[6]["padded_tokens"] == "15000"
    f = gpu_e2e.paper_forecast(stages, paper_tokens=300)  # train: 150 padded tokens/example, attribution: 150
    assert f["train"] == (625, pytest.approx(625 * 1.0 * 2), True)  # (27 - 3) / 24 s per step, x 300 / 150
    assert f["attribute"] == (18000, pytest.approx(18000 * 0.125 * 2), True)  # median of 0.1 and 0.15 s/gradient
    assert f["evaluate"] == (3000, pytest.approx(3000 * 0.02 * 2), True)
    assert f["moments"][1] == pytest.approx((4.0 * 500 / 100 + 5 * 0.5) * 2)
    assert f["save"] == (6, pytest.approx(6 * 11.0), False) and f["load"][1] == 20 and f["self_check"][1] == 5
    parts = ("load", "self_check", "train", "moments", "save", "evaluate", "attribute")
    assert f["total"] == pytest.approx(sum(f[p][1] for p in parts))
    assert f["total_unscaled"] == pytest.approx(20 + 5 + 625 + (20 + 2.5) + 66 + 60 + 2250)


@pytest.mark.slow
def test_gpu_check_sh_runs_the_whole_check_on_a_cpu(tmp_path):
    """`bash benchmarks/gpu_check.sh --device cpu --configs tiny`: the engine table, then train.py end to end on a
    random-init tiny OLMo-3 made and saved here with the embedded world's tokenizer (model=hub), every stage
    timed at every checkpoint; its last lines one table and the SUMMARY with the paper's forecast."""
    e2e = ["--e2e-train", "8", "--e2e-queries", "4", "--e2e-docs", "4", "--e2e-epochs", "1"]
    out = run(["bash", "benchmarks/gpu_check.sh", *ENGINE_TINY, *e2e, "--e2e-workdir", str(tmp_path / "e2e")])
    assert re.search(r"^tiny\s+train step \(AdamW\)", out, re.M), out
    assert "[lark] sketch self-check on cpu: the hooks reach all" in out, out
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


def test_a_failing_row_is_a_nan_row_the_rest_is_measured_and_two_schedules_are_compared(monkeypatch, capsys):
    """An error in one row (here factored runs out of memory, as a 7B row may on an 80 GB card) is a NaN row naming
    it; the rows before and after it are kept and the SUMMARY is printed. With two fold schedules their vectors on
    the fidelity examples are compared (slices and index on a CPU: the same float32 sums)."""
    import gpu_check

    def out_of_memory(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gpu_check.FactoredProjector, "project_batch", out_of_memory)
    gpu_check.main([*ENGINE_TINY, "--parts", "engine", "--schedules", "slices", "index"])
    out = capsys.readouterr().out
    assert re.search(r"^tiny\s+sketch none slices\s+4096\s+[\d.]+", out, re.M), out
    assert re.search(r"^tiny\s+rapidin per_tensor\s+4096\s+[\d.]+", out, re.M), out
    assert re.search(r"^tiny\s+sketch none slices \(all signs cached\)\s+4096\s+[\d.]+", out, re.M), out
    assert re.search(r"^tiny\s+factored none\s+4096\s+nan\s+nan", out, re.M), out
    assert "# tiny factored none: unavailable (OutOfMemoryError: CUDA out of memory." in out, out
    agree = float(re.search(r"^# tiny: fold schedules slices and index agree to (\S+) ", out, re.M).group(1))
    assert agree < 1e-6, out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("SUMMARY device=cpu config=tiny sketch_vs_train_step="), summary
    for kept in ("sketch", "rapidin", "floor", "sketch_unfused"):
        assert re.search(rf" {kept}_vs_train_step=\d", summary), (kept, summary)
    assert "factored_vs_train_step=nan" in summary and "fold_schedules_rel_diff=0.00e+00" in summary, summary


def test_an_80_gb_card_runs_7b_at_16_layers_and_the_end_to_end_part_at_1b(monkeypatch):
    """fit_card: under 100 GiB (an H100) 7b keeps 16 of its 32 layers and the end-to-end part runs 1b, unless the
    arguments chose; an H200 (139 GiB) and a CPU keep the defaults."""
    import argparse

    import gpu_check

    def card(gib):
        props = argparse.Namespace(total_memory=gib * 2**30)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def fitted(**given):
        args = argparse.Namespace(device="cuda", configs=["1b", "7b"], layers=None, e2e_config=None, parts=["e2e"])
        vars(args).update(given)
        lines = []
        gpu_check.fit_card(args, lines.append)
        return args.layers, args.e2e_config, len(lines)

    card(79)
    assert fitted() == (16, "1b", 2)
    assert fitted(layers=8, e2e_config="7b") == (8, "7b", 0)
    assert fitted(device="cpu") == (None, None, 0)
    card(139)
    assert fitted() == (None, None, 0)


def test_no_fidelity_examples_still_times_every_row(capsys):
    """--fidelity-examples 0 ("no fidelity") lost every projector row to an IndexError on the empty list."""
    import gpu_check

    args = [a for a in ENGINE_TINY if a != "3"]
    args[args.index("--fidelity-examples") + 1 : args.index("--fidelity-examples") + 1] = ["0"]
    gpu_check.main([*args, "--parts", "engine", "--schedules", "slices"])
    out = capsys.readouterr().out
    assert re.search(r"^tiny\s+sketch none slices\s+4096\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(r"^tiny\s+factored none\s+\d+\s+[\d.]+", out, re.M), out
    assert "stopped" not in out, out


def test_the_paper_forecast_runs_the_papers_kernel():
    """The end-to-end part's train.py run (what the paper forecast scales) uses RapidIn's per-tensor kernel, as
    +experiment=pubmedqa does; the default cosine made the attribution stage about 7% cheaper at 7B."""
    import argparse

    import gpu_e2e

    args = argparse.Namespace(e2e_epochs=1, e2e_train=4, e2e_queries=2, e2e_docs=2, k=4096, e2e_keep=False)
    assert "attribution/kernel=rapidin" in gpu_e2e.overrides(args, "m", "r", cuda=True, dtype="bfloat16")
