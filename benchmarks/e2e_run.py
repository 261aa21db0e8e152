"""The inside of benchmarks/gpu_check.sh's end-to-end part (benchmarks/gpu_e2e.py runs it in subprocesses; it
needs what train.py needs: Hydra, omegaconf, rank_bm25). Every stage it times is one line on stdout,
`[gpu_e2e] stage=<name> seconds=<s> key=value ...`, read by the driver.

    python benchmarks/e2e_run.py make --config 7b --device cuda --dtype bfloat16 --out <folder>
        a random-init OLMo-3 of gpu_check.CONFIGS[config] made on the device, with the embedded world's tokenizer
        (lark.models.train_tokenizer on the world's corpora, as lark.pretrain.tiny_model trains it), saved with
        save_pretrained (safetensors) as a local folder for `model=hub model.hub_id=<folder>`
    python benchmarks/e2e_run.py run <train.py overrides>
        train.py itself (its Hydra main), lark unchanged: module-level functions of lark.experiment,
        lark.checkpoint and lark.callbacks are wrapped by timers (synchronising CUDA), and a Lightning callback
        times every training step
"""

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from gpu_check import CONFIGS, build  # noqa: E402

import lark.callbacks  # noqa: E402
import lark.checkpoint  # noqa: E402
import lark.experiment  # noqa: E402
from lark.data.io import BadRows  # noqa: E402
from lark.data.readers import load_data  # noqa: E402
from lark.models import train_tokenizer  # noqa: E402


def report(stage, seconds, **fields):
    extra = "".join(f" {key}={value}" for key, value in fields.items())
    print(f"[gpu_e2e] stage={stage} seconds={seconds:.3f}{extra}", flush=True)


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make(argv):
    """The model folder: tokenizer of the embedded world, random-init weights made on the device."""
    parser = argparse.ArgumentParser(prog="e2e_run.py make")
    parser.add_argument("--config", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3", job_name="gpu_e2e"):
        cfg = compose("train")  # the embedded default: model=tiny (its tokenizer config), data=world
    start = time.perf_counter()
    _, _, corpora, _ = load_data(cfg.data, BadRows("error"))
    texts = [d["text"] for docs in corpora.values() for d in docs]  # = lark.pretrain.tiny_model's
    tokenizer = train_tokenizer(texts, cfg.model.tokenizer.vocab_size)
    report("tokenizer", time.perf_counter() - start, vocab=len(tokenizer), documents=len(texts))
    start = time.perf_counter()
    vocab = max(CONFIGS[args.config]["vocab_size"], len(tokenizer))  # 7b keeps OLMo-3's 100,278 rows (their cost)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = build(args.config, torch.device(args.device), getattr(torch, args.dtype), vocab_size=vocab, **ids)
    sync()
    params = sum(p.numel() for p in model.parameters())
    report("make_model", time.perf_counter() - start, parameters=params, layers=model.config.num_hidden_layers)
    start = time.perf_counter()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    report("save_model", time.perf_counter() - start, bytes=size)


def timed(module, name, stage, fields=None):
    """Wrap module.<name> so that each call prints its stage line; fields(args, result) adds key=values. A name
    this branch lacks is said, not fatal."""
    original = getattr(module, name, None)
    if original is None:
        print(f"[gpu_e2e] note: {module.__name__}.{name} not found: stage {stage} is not timed", flush=True)
        return

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        report(stage, time.perf_counter() - start, **(fields(args, out) if fields else {}))
        return out

    setattr(module, name, wrapper)


def n_tokens(ck, examples):
    return sum(len(ck.encoder(e)["input_ids"]) for e in examples)  # memoised: tokenised once per run


def attributed(args, out):
    ck, sets, queries = args[0], args[1], args[2]
    examples = list(queries) + [e for v in sets.values() for e in v]
    return {"epoch": ck.epoch, "examples": len(examples), "tokens": n_tokens(ck, examples)}


class StepTimer(L.Callback):
    """Every training step's time (CUDA synchronised at both ends: forward, backward, clipping, optimizer step),
    its examples, real and padded tokens; one stage line per epoch, after its last step."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.times, self.examples, self.tokens, self.padded = [], 0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync()
        self.times.append(time.perf_counter() - self.start)
        self.examples += len(batch["input_ids"])
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["input_ids"].numel()
        if batch_idx == trainer.num_training_batches - 1:  # before the epoch's checkpoint: a stopped run keeps it
            fields = dict(epoch=trainer.current_epoch + 1, steps=len(self.times), first_step=f"{self.times[0]:.3f}")
            fields |= dict(examples=self.examples, tokens=self.tokens, padded_tokens=self.padded)
            report("train", sum(self.times), **fields)


def run(overrides):
    """train.py with the timers in place."""
    experiment, checkpoint = lark.experiment, lark.checkpoint
    timed(experiment, "prepare_model", "load")
    timed(experiment, "self_check", "self_check")
    timed(lark.callbacks, "checkpoint_moments", "moments", lambda a, out: {"epoch": a[2]})
    timed(checkpoint, "save", "save", lambda a, out: {"epoch": a[0].epoch})
    timed(checkpoint, "evaluate", "evaluate", lambda a, out: {"epoch": a[0].epoch, "examples": len(a[1])})
    timed(checkpoint, "attribute_checkpoint", "attribute", attributed)
    make_trainer = experiment.make_trainer
    experiment.make_trainer = lambda cfg, run_dir, data, callbacks, loggers: make_trainer(
        cfg, run_dir, data, [*callbacks, StepTimer()], loggers
    )
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as `python train.py`: Hydra finds conf/ beside it


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    {"make": make, "run": run}[command](rest)
