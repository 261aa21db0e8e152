"""The end-to-end part of benchmarks/gpu_check.sh: a scaled `train.py` run on a random-init OLMo-3 of the engine
table's last config (7b on a GPU, tiny on a CPU), made on the device and saved as a local folder with the
embedded world's tokenizer, then run as the paper runs it (`model=hub model.dtype=bfloat16 trainer=gpu`, the
default sketch projector) on the embedded world: --e2e-queries test queries, five sources of --e2e-docs
documents, --e2e-train fine-tuning questions, --e2e-epochs epochs. Each stage's time (model load, self-check,
training steps, checkpoint save, evaluation, attribution per checkpoint) comes from benchmarks/e2e_run.py's
`[gpu_e2e] stage=...` lines, read line by line as the run prints them; lark is not changed.

The paper's full experiment is forecast from them (PAPER: 500 train questions x 5 epochs at batch 4 = 625
steps, 6 checkpoints x (500 queries + 5 x 500 documents) = 3,000 gradients each): per-step and per-gradient times
scaled linearly by tokens per example, from the run's measured tokens to --paper-tokens (PubMedQA-sized examples,
docs/benchmarks.md says how), which overstates the token-independent part (the sketch's fold is per example, not
per token); `paper_experiment_minutes_unscaled` is the same forecast without the token scaling.

Imports nothing beyond the standard library: on a bare CUDA machine (torch, transformers, Lightning) it installs
train.py's missing packages from the wheels in .whl/ (repository root) into a private folder, or says in one
line what is missing and how to carry it.
"""

import importlib
import importlib.util
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "e2e_run.py"
NEEDED = {  # module train.py imports on the embedded world with logger=csv -> the pip requirement that has it
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime==4.9.3",
    "yaml": "PyYAML",
    "numpy": "numpy",
    "rank_bm25": "rank_bm25",
    "lightning": "lightning",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
}
FIGURES = "matplotlib"  # the closing analysis' figures: without it analysis.enabled=false (not a timed stage)
PAPER = {"train": 500, "epochs": 5, "batch": 4, "queries": 500, "docs": 2500, "checkpoints": 6}
STAGE = re.compile(r"^\[gpu_e2e\] stage=(\S+) seconds=([\d.]+)(.*)$")
DONE = re.compile(r"^\[lark\] (epoch_\d{3}): ft ")  # an epoch's attribution is complete


def add_arguments(parser):
    parser.add_argument("--e2e-config", default=None, help="the model's shape (default: the last of --configs)")
    parser.add_argument("--e2e-dtype", default=None, help="default: bfloat16 on cuda, float32 on a CPU")
    parser.add_argument("--e2e-train", type=int, default=100, help="fine-tuning questions (data.n_train)")
    parser.add_argument("--e2e-queries", type=int, default=100, help="test queries (data.n_test)")
    parser.add_argument("--e2e-docs", type=int, default=100, help="documents per source (source.size)")
    parser.add_argument("--e2e-epochs", type=int, default=2, help="trainer.max_epochs")
    parser.add_argument(
        "--budget",
        type=int,
        default=480,
        help="seconds for the whole check (one H200: 8 minutes); the end-to-end part gets what the engine table left",
    )
    parser.add_argument("--e2e-timeout", type=int, default=None, help="seconds for the end-to-end part (see --budget)")
    parser.add_argument(
        "--e2e-workdir", default=None, help="model folder and run (default: a temporary folder, removed after)"
    )
    parser.add_argument("--e2e-wheels", default=str(ROOT / ".whl"), help="wheels of what train.py needs")
    parser.add_argument("--e2e-keep", action="store_true", help="keep every checkpoint's weights and the workdir")
    parser.add_argument(
        "--paper-tokens",
        type=int,
        default=450,
        help="tokens per example of the paper's data (PubMedQA question + contexts, abstracts, fiction passages "
        "in OLMo-3's tokenizer with the chat template; docs/benchmarks.md)",
    )


def found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked (sys.modules[name] = None) or broken
        return False


def missing_modules():
    importlib.invalidate_caches()
    return [m for m in NEEDED if not found(m)]


def python_path(args, workdir, log):
    """PYTHONPATH for the subprocesses (repository + the wheels of .whl/ installed under workdir/site), or None
    with one line naming what is missing."""
    paths = [str(ROOT)]
    missing = missing_modules()
    wheels = sorted(Path(args.e2e_wheels).glob("*.whl"))
    if missing and wheels:
        site = Path(workdir) / "site"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
        if subprocess.run([*pip, *map(str, wheels)]).returncode != 0:
            log(f"[gpu_e2e] pip could not install the wheels of {args.e2e_wheels} (its message above)")
        sys.path.insert(0, str(site))
        paths.append(str(site))
        log(f"[gpu_e2e] installed {len(wheels)} wheels from .whl/ into {site}")
        missing = missing_modules()
    if missing:
        log(
            f"[gpu_e2e] missing Python packages for train.py: {', '.join(NEEDED[m] for m in missing)}; carry them as "
            f"wheels in {args.e2e_wheels} (docs/benchmarks.md: `pip download ...`), the end-to-end part is skipped"
        )
        return None
    return os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def stream(command, env, timeout, on_line, log):
    """Run `command`, echo its output line by line (stdout and stderr together) and hand each line to on_line;
    killed after `timeout` seconds. Returns (exit code, timed out)."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            log(line.rstrip("\n"))
            on_line(line.rstrip("\n"))
        code = proc.wait()
    finally:
        killer.cancel()
    return code, code == -9


def parse(line):
    """A `[gpu_e2e] stage=` line as {stage, seconds, key: value}, else None."""
    match = STAGE.match(line)
    if not match:
        return None
    fields = dict(part.split("=", 1) for part in match.group(3).split())
    return {"stage": match.group(1), "seconds": float(match.group(2)), **fields}


def overrides(args, model_dir, run_dir, cuda, dtype):
    """train.py's overrides: the paper's way to run a local bf16 model on a GPU, sized by --e2e-*."""
    trainer = ["trainer=gpu"] if cuda else ["trainer=cpu"]
    return [
        "model=hub",
        f"model.hub_id={model_dir}",
        f"model.dtype={dtype}",
        *trainer,
        f"trainer.max_epochs={args.e2e_epochs}",
        "trainer.enable_checkpointing=false",  # no resume state (3 x the weights at 7B; not a paper stage)
        "preflight=false",  # its disk check counts every checkpoint; this driver deletes each once attributed
        f"data.n_train={args.e2e_train}",
        f"data.n_test={args.e2e_queries}",
        f"source.size={args.e2e_docs}",
        f"attribution.projector.k={args.k}",  # the engine table's k (gpu_check --k; the paper's 65,536)
        "attribution/kernel=rapidin",  # the paper's kernel (conf/experiment/pubmedqa.yaml): per-tensor norms
        "max_length=1024",  # the paper's (conf/experiment/pubmedqa.yaml); also the sketch's plan_tokens
        "logger=csv",
        # the closing Tables/Figures need every checkpoint's weights (a complete run) and matplotlib: only with
        # --e2e-keep (not a timed stage; the paper's analysis takes seconds)
        f"analysis.enabled={args.e2e_keep and found(FIGURES)}".lower(),
        f"hydra.run.dir={run_dir}",
    ]


def run(args, log, spent=0.0):
    """Make the model, run train.py, print the stage table; returns the SUMMARY fields. spent: seconds the check
    has run so far (--budget less them, 10 s for the table, is this part's time unless --e2e-timeout)."""
    cuda = args.device.startswith("cuda")
    config = args.e2e_config or args.configs[-1]
    dtype = args.e2e_dtype or ("bfloat16" if cuda else "float32")
    workdir = Path(args.e2e_workdir or tempfile.mkdtemp(prefix="lark_e2e_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir, run_dir = workdir / "model", workdir / "run"
    log(
        f"# end to end: train.py on a random-init {config} OLMo-3 in {dtype}, {args.e2e_train} train questions x "
        f"{args.e2e_epochs} epochs, {args.e2e_queries} queries x 5 sources x {args.e2e_docs} documents; in {workdir}"
    )
    start, stages = time.perf_counter(), []
    timeout = args.e2e_timeout or max(60, args.budget - spent - 10)
    pythonpath = python_path(args, workdir, log)
    status = "missing_packages"
    if pythonpath:
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "LARK_CACHE": str(workdir / "cache")}

        def on_line(line):
            stage = parse(line)
            if stage:
                stages.append(stage)
                if stage["stage"] == "load" and not args.e2e_keep:  # loaded: its weights are not read again
                    remove_weights(model_dir)
            done = DONE.match(line)
            if done and not args.e2e_keep:  # attributed: nothing reads this checkpoint's weights again
                remove_weights(run_dir / "checkpoints" / done.group(1))

        make = [sys.executable, str(RUNNER), "make", "--config", config, "--device", args.device]
        code, late = stream([*make, "--dtype", dtype, "--out", str(model_dir)], env, timeout, on_line, log)
        if code == 0:
            left = max(1, timeout - (time.perf_counter() - start))
            command = [sys.executable, str(RUNNER), "run", *overrides(args, model_dir, run_dir, cuda, dtype)]
            code, late = stream(command, env, left, on_line, log)
        status = "ok" if code == 0 else ("timeout" if late else f"failed_rc{code}")
    seconds = time.perf_counter() - start
    if not (args.e2e_keep or args.e2e_workdir):  # a temporary folder of ours
        shutil.rmtree(workdir, ignore_errors=True)
    measured = of(stages, "train") and of(stages, "attribute")  # a stopped run forecasts from what it measured
    forecast = paper_forecast(stages, args.paper_tokens) if measured else {}
    table(stages, forecast, args.paper_tokens, log)
    return summary_fields(status, config, dtype, stages, forecast, seconds, args.paper_tokens)


def remove_weights(folder):
    for f in Path(folder).glob("*.safetensors"):
        f.unlink(missing_ok=True)


def of(stages, name):
    return [s for s in stages if s["stage"] == name]


def paper_forecast(stages, paper_tokens):
    """{stage: (count, seconds)} of the paper's experiment, and `total` / `total_unscaled` in seconds."""
    train, attribute = of(stages, "train"), of(stages, "attribute")
    steps = sum(int(s["steps"]) for s in train)
    step_s = (sum(s["seconds"] - float(s["first_step"]) for s in train) / max(1, steps - len(train))) if steps else 0
    train_tokens = sum(int(s["padded_tokens"]) for s in train) / max(1, sum(int(s["examples"]) for s in train))
    attr_tokens = sum(int(s["tokens"]) for s in attribute) / max(1, sum(int(s["examples"]) for s in attribute))
    per_gradient = statistics.median(s["seconds"] / int(s["examples"]) for s in attribute)
    per_query = statistics.median([s["seconds"] / max(1, int(s["examples"])) for s in of(stages, "evaluate")] or [0])
    moments = of(stages, "moments")  # epoch 0: one pass over the training data; later: from the optimizer
    n_train = sum(int(s["examples"]) for s in train) / max(1, len(train))
    n_steps = PAPER["epochs"] * math.ceil(PAPER["train"] / PAPER["batch"])
    n_gradients = PAPER["checkpoints"] * (PAPER["queries"] + PAPER["docs"])
    once = {s: sum(x["seconds"] for x in of(stages, s)) for s in ("load", "self_check")}
    rows = {
        "load": (1, once["load"], 1.0),
        "self_check": (1, once["self_check"], 1.0),
        "train": (n_steps, n_steps * step_s, paper_tokens / train_tokens),
        "moments": (
            PAPER["checkpoints"],
            moments[0]["seconds"] * PAPER["train"] / n_train + (PAPER["checkpoints"] - 1) * median_seconds(moments[1:])
            if moments
            else 0,
            paper_tokens / train_tokens,
        ),
        "save": (PAPER["checkpoints"], PAPER["checkpoints"] * median_seconds(of(stages, "save")), 1.0),
        "evaluate": (PAPER["checkpoints"] * PAPER["queries"], PAPER["checkpoints"] * PAPER["queries"] * per_query,
                     paper_tokens / attr_tokens),
        "attribute": (n_gradients, n_gradients * per_gradient, paper_tokens / attr_tokens),
    }  # fmt: skip
    forecast = {name: (n, s * ratio, ratio != 1.0) for name, (n, s, ratio) in rows.items()}
    forecast["total"] = sum(s for _, s, _ in forecast.values())
    forecast["total_unscaled"] = sum(s for _, s, _ in rows.values())
    forecast["tokens"] = (train_tokens, attr_tokens)
    return forecast


def median_seconds(stages):
    return statistics.median([s["seconds"] for s in stages] or [0])


def table(stages, forecast, paper_tokens, log):
    """One table: the measured stages (seconds, count, per unit, tokens per example), then the paper's forecast."""
    log(f"{'part':6s} {'stage':12s} {'epoch':>5s} {'seconds':>9s} {'n':>7s} {'s/unit':>9s} {'tok/ex':>7s}")
    log("-" * 60)
    for s in stages:
        n = s.get("steps") or s.get("examples") or ""
        per = f"{s['seconds'] / int(n):9.4f}" if n else f"{'':9s}"
        tokens = s.get("padded_tokens") or s.get("tokens")
        tok = f"{int(tokens) / int(s['examples']):7.0f}" if tokens and s.get("examples") else ""
        log(f"{'e2e':6s} {s['stage']:12s} {s.get('epoch', '-'):>5s} {s['seconds']:9.2f} {n!s:>7s} {per} {tok:>7s}")
    for name, value in forecast.items():
        if name in ("total", "total_unscaled", "tokens"):
            continue
        n, seconds, scaled = value  # scaled: by tokens per example, to --paper-tokens
        tok = f"{paper_tokens:7d}" if scaled else f"{'-':>7s}"
        log(f"{'paper':6s} {name:12s} {'-':>5s} {seconds:9.1f} {n:7d} {seconds / max(1, n):9.4f} {tok}")
    if forecast:
        log(f"{'paper':6s} {'total':12s} {'-':>5s} {forecast['total']:9.1f}")


def summary_fields(status, config, dtype, stages, forecast, seconds, paper_tokens):
    """The end-to-end part's SUMMARY key=values."""
    attribute, train = of(stages, "attribute"), of(stages, "train")
    steps = sum(int(s["steps"]) for s in train)
    fields = [
        f"e2e={status} e2e_config={config} e2e_dtype={dtype} e2e_seconds={seconds:.0f}",
        f"e2e_load_s={sum(s['seconds'] for s in of(stages, 'load')):.1f}",
        f"e2e_self_check_s={sum(s['seconds'] for s in of(stages, 'self_check')):.1f}",
        f"e2e_train_step_s={sum(s['seconds'] for s in train) / max(1, steps):.3f}",
        f"e2e_save_s={median_seconds(of(stages, 'save')):.1f}",
        f"e2e_attribution_s_per_checkpoint={median_seconds(attribute):.1f}",
    ]
    if not forecast:
        return fields + ["paper_experiment_minutes=nan"]
    return fields + [
        f"paper_tokens={paper_tokens} e2e_tokens_train={forecast['tokens'][0]:.0f}",
        f"e2e_tokens_attribution={forecast['tokens'][1]:.0f}",
        f"paper_experiment_minutes_unscaled={forecast['total_unscaled'] / 60:.1f}",
        f"paper_experiment_minutes={forecast['total'] / 60:.1f}",
    ]
