"""A CPU proxy of the sketch's cost at 7B: a two-layer stack with OLMo-3-7B's layer shapes (hidden 4096, MLP
11008, 32 heads, so 4096^2 attention projections and 4096 x 11008 MLP matrices; a 512-token vocabulary keeps the
embedding and output layer small), random weights.

    python benchmarks/fold_profile.py            # T = 512, B = 2 4 8, bf16 where the CPU has bf16 units
    python benchmarks/fold_profile.py --quick    # T = 64, B = 2, 2 pairs (CI; about a minute on 2 cores)

1. Tensor operations per batch (torch.profiler: ATen operations with no ATen operation inside them, i.e. what
   a GPU would launch as kernels) of a training step and of `sketch` (normalize none, materialize), at two k
   (P / k x 8 apart), for each fold schedule and blocking: `index` with one block per layer (what a GPU runs:
   HookSketch.max_workspace), `slices` with one block per layer (the chunk-by-chunk fold a GPU would have run
   before: 2 operations per k-chunk), and `slices` with the CPU's cache-sized blocks (what runs here). "fold ops"
   are those inside HookSketch.fold_into, "chunks" P / k.
2. Time per example of a training step (forward + backward of the mean loss, no optimizer) and of `sketch` on
   the CPU path, `--repeats` alternations on the same batch: "x train" is the median of the paired ratios
   (higher is faster), "fold share" the median share of the sketch's time spent in fold_into (timed around each
   call), and the same for the index schedule on the CPU (its speed here, not a GPU's).
The last line is `SUMMARY ...`.

    python benchmarks/fold_profile.py --fold-only    # on CUDA: the fold alone, one schedule per row

3. `--fold-only`: the fold alone on one block of per-example gradients (default B = 8 x an OLMo-3-7B MLP matrix,
   11008 x 4096, bf16, k = 65,536; issue 20's prototype measured 0.44 ms for `triton` and 5.12 ms for `index`
   on an H200): each schedule (`index` with signs cached and rehashed, `slices` on a CPU only, `triton` on CUDA
   at a few tile shapes and unrolls), median milliseconds of `--repeats` calls, G read in GB/s, and the largest
   difference from the first row. On a CPU the triton rows run only under TRITON_INTERPRET=1, marked
   (interpreted): that checks them, it is not a speed. The last line is `SUMMARY fold ...`.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lark.kernel import fold_triton
from lark.kernel.hashing import name_key
from lark.kernel.sketch import HookSketch

SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def build(layers, dtype, vocab=512, **shapes):
    from transformers import Olmo3Config, Olmo3ForCausalLM

    torch.manual_seed(0)
    config = Olmo3Config(
        vocab_size=vocab,
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
        **{**SHAPES, **shapes},
    )
    return Olmo3ForCausalLM(config).to(dtype).eval()


def batch_of(b, t, vocab, seed=0):
    ids = torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_step(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


class FoldTimer:
    """Wraps a HookSketch's fold_into: a profiler range around each call and the seconds spent in it."""

    def __init__(self, hook):
        self.seconds, self.calls, inner = 0.0, 0, hook.fold_into

        def timed(*args):
            t = time.perf_counter()
            with torch.profiler.record_function("lark.fold"):
                out = inner(*args)
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

        hook.fold_into = timed


def count_ops(fn):
    """(leaf ATen operations, those inside a lark.fold range) of one call of fn."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    total = fold = 0
    for e in prof.events():
        if not e.name.startswith("aten::") or any(c.name.startswith("aten::") for c in e.cpu_children):
            continue
        total += 1
        parent = e.cpu_parent
        while parent is not None and parent.name != "lark.fold":
            parent = parent.cpu_parent
        fold += parent is not None
    return total, fold


def sketch(model, k, schedule, whole_layers):
    hook = HookSketch(model, k, method="materialize")
    hook.fold_schedule = schedule
    if whole_layers:
        hook.block_elements = hook.max_workspace
    return hook, FoldTimer(hook)


def op_table(model, batch, ks, log):
    log(f"{'row':42s} {'k':>6s} {'chunks':>7s} {'ops/batch':>10s} {'fold ops':>9s} {'fold calls':>10s}")
    log("-" * 89)
    p = sum(x.numel() for x in model.parameters())
    log(
        f"{'train step':42s} {'-':>6s} {'-':>7s} {count_ops(lambda: train_step(model, batch))[0]:10d} "
        f"{'-':>9s} {'-':>10s}"
    )
    counts = {}
    for label, schedule, whole in [
        ("sketch, index, one block per layer (GPU)", "index", True),
        ("sketch, slices, one block per layer", "slices", True),
        ("sketch, slices, cache-sized blocks (CPU)", "slices", False),
    ]:
        for k in ks:
            hook, timer = sketch(model, k, schedule, whole)
            hook.project_batch(model, batch)  # warm-up: the sign cache
            timer.calls = 0
            total, fold = counts[schedule, whole, k] = count_ops(lambda: hook.project_batch(model, batch))
            log(f"{label:42s} {k:6d} {-(-p // k):7d} {total:10d} {fold:9d} {timer.calls:10d}")
    return counts


def timing_rows(model, batch, k, repeats, log):
    """Paired alternations of a training step and sketch (auto = the CPU's schedule, then index)."""
    b = batch["input_ids"].shape[0]
    rows = {}
    for label, schedule in [("sketch (auto: slices)", "auto"), ("sketch (index)", "index")]:
        hook, timer = sketch(model, k, schedule, False)
        for _ in range(2):  # warm-up: caches, allocator, threads
            hook.project_batch(model, batch)
            train_step(model, batch)
        train, mine, ratios, shares = [], [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            train_step(model, batch)
            train.append(time.perf_counter() - t)
            timer.seconds = 0.0
            t = time.perf_counter()
            hook.project_batch(model, batch)
            mine.append(time.perf_counter() - t)
            ratios.append(train[-1] / mine[-1])
            shares.append(timer.seconds / mine[-1])
        rows[label] = (
            statistics.median(train) / b,
            statistics.median(mine) / b,
            statistics.median(ratios),
            statistics.median(shares),
        )
        log(
            f"{b:3d} {label:24s} {k:6d} {rows[label][0]:10.3f} {rows[label][1]:10.3f} {rows[label][2]:8.2f} "
            f"{rows[label][3]:10.2f}"
        )
    return rows


def timed_ms(fn, device, repeats):
    """Median milliseconds of `repeats` calls of fn after one warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def fold_schedules(device, part, k):
    """[(row label, fold(out) -> out)] of the schedules that run on `device` (triton: tile shapes to choose from)."""
    host = build(
        1, torch.float32, 16, hidden_size=16, intermediate_size=16, num_attention_heads=1, num_key_value_heads=1
    )
    rows = [("index, signs cached", "index", 2**40), ("index, signs rehashed", "index", 0)]
    rows += [("slices", "slices", 2**40)] if device.type == "cpu" else []
    fns = []
    for label, schedule, cache in rows:
        hook = HookSketch(host, k, fold=schedule, cache_bytes=cache)
        fns.append((label, lambda out, h=hook: h.fold_into(out, "w", part, 0, part.shape[1])))
    if fold_triton.usable(device):  # on a CPU only under TRITON_INTERPRET=1: the rows' code checked, not a speed
        keys = (name_key(0, "w", "offset"), name_key(0, "w", "sign"))
        for block_k, per, unroll in [(1024, 1, 1), (512, 1, 1), (2048, 1, 1), (1024, 2, 1), (1024, 4, 1), (1024, 1, 2),
                                     (1024, 1, 4)]:  # fmt: skip
            label = f"triton, {block_k} buckets x {per} ex. x {unroll} chunks"
            label += " (interpreted)" if fold_triton.INTERPRETED else ""
            fns.append((label, lambda out, b=block_k, e=per, u=unroll: fold_triton.fold(
                out, part, 0, *keys, block_k=b, examples_per_program=e, unroll=u)))  # fmt: skip
    return fns


def fold_table(args, device, dtype, log):
    """The fold alone: [B, rows * cols] per-example gradients into k buckets, one row per schedule."""
    b, rows, cols = args.fold_shape
    k = args.ks[0]
    part = torch.randn(b, rows * cols, device=device, generator=torch.Generator(device).manual_seed(0)).to(dtype)
    log(f"# fold alone on {device}: B = {b} x {rows} x {cols} {str(dtype).replace('torch.', '')}, k = {k}")
    log(f"{'schedule':46s} {'ms':>9s} {'G GB/s':>8s} {'max |diff|':>11s}")
    log("-" * 77)
    first, best = None, {}
    for label, fn in fold_schedules(device, part, k):
        out = fn(torch.zeros(b, k, device=device))
        first = out if first is None else first
        ms = timed_ms(lambda: fn(torch.zeros(b, k, device=device)), device, args.repeats)
        name = label.split(",")[0] + ("_interpreted" if label.endswith("(interpreted)") else "")
        best[name] = min(ms, best.get(name, float("inf")))
        gbs = part.numel() * part.element_size() / ms / 1e6
        log(f"{label:46s} {ms:9.3f} {gbs:8.1f} {(out - first).abs().max().item():11.2e}")
    rest = " ".join(f"{name}_ms={ms:.3f}" for name, ms in best.items())
    log(f"SUMMARY fold device={device.type} batch={b} rows={rows} cols={cols} k={k} {rest}")


def bf16_supported():
    return "AMX" in torch.backends.cpu.get_cpu_capability() or _bf16_flag()


def _bf16_flag():
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="defaults T = 64, B = 2, 2 pairs (CI)")
    parser.add_argument("--seq", type=int, help="tokens per example (512; --quick 64)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes of the timing rows (2 4 8; --quick 2)")
    parser.add_argument(
        "--ops-seq",
        type=int,
        help="tokens per example of the op-count batch (default --seq; "
        "the one-block-per-layer rows' counts do not depend on it)",
    )
    parser.add_argument("--repeats", type=int, help="alternations with a training step per row (3; --quick 2)")
    parser.add_argument("--ks", type=int, nargs=2, default=[65536, 8192], help="two k for the op counts")
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bfloat16 where the CPU has bf16 units (AVX512-BF16/AMX), else float32",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=SHAPES["hidden_size"], help="smaller only for tests")
    parser.add_argument("--mlp", type=int, default=SHAPES["intermediate_size"], help="smaller only for tests")
    parser.add_argument("--heads", type=int, default=SHAPES["num_attention_heads"], help="smaller only for tests")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fold-only", action="store_true", help="time the fold alone, each schedule (3. above)")
    parser.add_argument(
        "--fold-shape", type=int, nargs=3, default=[8, 11008, 4096], help="--fold-only: B, rows, columns of the block"
    )
    parser.add_argument("--device", help="--fold-only: cuda where available, else cpu")
    args = parser.parse_args(argv)
    for key, full, quick in [("seq", 512, 64), ("batches", [2, 4, 8], [2]), ("repeats", 3, 2)]:
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {
        "auto": torch.bfloat16 if bf16_supported() else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[args.dtype]
    log = lambda s="": print(s, flush=True)  # noqa: E731
    if args.fold_only:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if args.dtype == "auto" and device.type == "cuda" else dtype
        return fold_table(args, device, dtype, log)
    model = build(
        args.layers,
        dtype,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    p = sum(x.numel() for x in model.parameters())
    log(
        f"# torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
        f"threads, {str(dtype).replace('torch.', '')}; {args.layers} layers of hidden {args.hidden} x MLP {args.mlp}, "
        f"{args.heads} heads; P = {p:,}; T = {args.seq}"
    )
    ops_seq = args.ops_seq or args.seq
    log(f"## tensor operations per batch (B = {args.batches[0]}, T = {ops_seq})")
    counts = op_table(model, batch_of(args.batches[0], ops_seq, 512), args.ks, log)
    log()
    log(f"## time per example, median of {args.repeats} alternations with a training step")
    log(f"{'B':>3s} {'row':24s} {'k':>6s} {'train s/ex':>10s} {'sketch s/ex':>10s} {'x train':>8s} {'fold share':>10s}")
    log("-" * 76)
    rows = {}
    for b in args.batches:
        rows[b] = timing_rows(model, batch_of(b, args.seq, 512), args.ks[0], args.repeats, log)
    k0, k1 = args.ks
    last = rows[args.batches[-1]]["sketch (auto: slices)"]
    log(
        f"SUMMARY fold_ops_gpu_k{k0}={counts['index', True, k0][1]} fold_ops_gpu_k{k1}={counts['index', True, k1][1]} "
        f"fold_ops_chunk_loop_k{k0}={counts['slices', True, k0][1]} "
        f"fold_ops_chunk_loop_k{k1}={counts['slices', True, k1][1]} "
        f"speed_vs_train_step={last[2]:.2f} fold_share={last[3]:.2f} batch={args.batches[-1]} seq={args.seq}"
    )


if __name__ == "__main__":
    main()
