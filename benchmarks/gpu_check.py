"""The engine and the whole experiment on a GPU, in one prepared run (budget: 8 minutes on one H200, --budget).

1. The engine table: random-init OLMo-3 configs of ~1B and 7B shapes built on the device in bf16 (nothing
   downloaded), and for each
   - `train step`: AdamW full fine-tuning step (forward + backward + optimizer step; bf16 weights, gradients and
     AdamW states -- fp32 master weights and states would need 116 GB at 7B before activations, more than an
     H200's 139 GiB with them),
   - `sketch` (lark.kernel.sketch.HookSketch) with normalize none and per_tensor for every fold schedule of
     --schedules (HookSketch.fold_schedule; on cuda `triton` = the `fused` rows and `index` = the `unfused` rows;
     a schedule this branch's HookSketch does not know is an `unavailable` row), and with every sign resident
     (on the first schedule that reads signs: `index` on cuda; the Triton fold hashes its own), and a `#` line
     with the first two schedules' agreement on the fidelity examples (schedules_agree: fused against unfused),
   - `rapidin` (lark.kernel.projectors.CountSketch, per_tensor: RapidIn's recipe; one backward per example),
   - `floor (no weight GEMMs)`: forward + backward with every weight frozen (the activation gradients only), the
     limit of any projector that never forms a weight gradient (issue 23's goal for `factored`: within 10% of it),
   - `factored` (lark.kernel.factored.FactoredProjector, LoGra / Bergson) with normalize none and per_tensor at k
     (r_out = r_in from k), and none at Bergson's 16 x 16 per module (k follows from the model),
   each row also logged (`# row: ...`) as it is measured; a row that fails (out of memory, a kernel) is a NaN
   row naming the error and a config that fails keeps its rows; on a card under 100 GiB (an H100) the 7b config
   keeps 16 of its 32 layers and the end-to-end part runs 1b (fit_card). Columns:
   examples/s, the ratio to the training step's examples/s (higher is faster), peak device memory (max
   allocated, reset before each row) and its ratio to the training step's, and fidelity on the pairs of
   `--fidelity-examples` examples against the exact cosine of the same normalisation (plain for none,
   per-tensor for per_tensor): max and mean |error|. Needs only torch and transformers, with the repository on
   PYTHONPATH (benchmarks/gpu_check.sh sets it): no Hydra, W&B or install (tests/test_gpu_check.py).
2. The end-to-end part (benchmarks/gpu_e2e.py): a scaled train.py run on a random-init model of the last
   config, each stage timed, and the forecast of the paper's full experiment. It needs train.py's packages:
   installed from wheels in .whl/ when the machine lacks them, else skipped with one line naming them.

The last lines are the end-to-end stage table and one `SUMMARY ...` line (both parts' numbers,
`paper_experiment_minutes=`). docs/benchmarks.md: what each row means.

    bash benchmarks/gpu_check.sh                                   # cuda, configs 1b 7b, batch 8 x 512
    bash benchmarks/gpu_check.sh --device cpu --configs tiny       # the same code on a CPU (tests/test_gpu_check.py)
    bash benchmarks/gpu_check.sh --parts engine                    # the engine table alone
"""

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # lark, and gpu_e2e beside this file (also under runpy)

import gpu_e2e  # noqa: E402  (benchmarks/: the end-to-end part, no lark import)

from lark.kernel.factored import FactoredProjector
from lark.kernel.projectors import CountSketch, example_gradient, trainable
from lark.kernel.sketch import HookSketch

VOCAB = 100_278


def olmo3(hidden, intermediate, layers, heads, vocab):
    """An OLMo-3 layout (untied output layer, as many key/value heads as query heads)."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab) | {
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


CONFIGS = {  # the 7B one is OLMo-3-7B's
    "tiny": olmo3(64, 128, 2, 4, 512),
    "1b": olmo3(2048, 8192, 16, 16, VOCAB),
    "7b": olmo3(4096, 11008, 32, 32, VOCAB),
}


def build(name, device, dtype, layers=None, **overrides):
    """A random-init Olmo3ForCausalLM of CONFIGS[name] made on `device` in `dtype`; `overrides` replace config
    keys (benchmarks/e2e_run.py: the vocabulary size and the special token ids of its tokenizer)."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    shape = dict(CONFIGS[name])
    if layers:
        shape["num_hidden_layers"] = layers
    keys = dict(max_position_embeddings=4096, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    config = Olmo3Config(tie_word_embeddings=False, **{**keys, **shape, **overrides})
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights made on the device, in bf16
            model = Olmo3ForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.config.use_cache = False
    return model.eval()


def batch_of(b, t, vocab, device, seed):
    ids = torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(seed)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        gc.collect()  # what a failed row left (its exception's frames) before the cache is emptied
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def fit_card(args, log):
    """An 80 GB card (an H100, the device tool's default kind) cannot hold the 7B AdamW step at all 32 layers
    (~92 GB at batch 8 x 512; 78.4 GiB peak on an H200 in issue 20) nor the end-to-end run's AdamW states beside
    the sketch: below 100 GiB the 7b config keeps 16 of its layers (the same widths: the ratios are those of its
    blocks, the vocabulary layers weighing twice as much) and the end-to-end part runs the 1b config, unless
    --layers / --e2e-config say otherwise. Each change is logged."""
    if not args.device.startswith("cuda"):
        return
    total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    if total >= 100 * 2**30:
        return
    if "7b" in args.configs and args.layers is None:
        args.layers = 16
        log(f"# {total / 2**30:.0f} GiB card: 7b at 16 of its 32 layers (--layers to choose)")
    if args.e2e_config is None and args.configs[-1] == "7b" and "e2e" in args.parts:
        args.e2e_config = "1b"
        log(f"# {total / 2**30:.0f} GiB card: the end-to-end part on 1b (--e2e-config to choose)")


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")


def timed(fn, device, repeats):
    """(median seconds of `repeats` calls after one warm-up, peak memory of all of them)."""
    reset_peak(device)
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak(device)


def exact_cosines(model, examples):
    """{none, per_tensor: exact pair cosines of the examples' full gradients}: gradients held in the model's
    dtype (one set per example), per-tensor Gram matrices summed in float64; per_tensor divides each tensor's
    by its norms first (= lark.kernel.normalizers.PerTensor, zero tensors contributing nothing)."""
    params = trainable(model)
    grads = []
    for ex in examples:
        grads.append(example_gradient(model, ex, params)[1])
        model.zero_grad(set_to_none=True)
    n = len(grads)
    plain, per_tensor = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for name in list(grads[0]):
        flat = torch.stack([g.pop(name).reshape(-1) for g in grads])
        gram = (
            (flat.float() @ flat.float().T).double().cpu()
            if flat.shape[1] < 2**26
            else torch.tensor(
                [[torch.dot(flat[i].float(), flat[j].float()).item() for j in range(n)] for i in range(n)],
                dtype=torch.float64,
            )
        )
        del flat
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        plain += gram
        per_tensor += gram / norms[:, None] / norms[None, :]
    return {"none": cosines_from_gram(plain), "per_tensor": cosines_from_gram(per_tensor)}


def cosines_from_gram(gram):
    d = gram.diagonal().sqrt()
    i, j = torch.triu_indices(len(gram), len(gram), 1)
    return (gram / d[:, None] / d[None, :])[i, j]


def pair_cosines(v):
    v = v.double().cpu()
    return cosines_from_gram(v @ v.T)


SCHEDULE_NAMES = {"triton": "fused", "index": "unfused"}  # HookSketch.fold_schedule -> the table's word
FLOOR = "floor (no weight GEMMs)"
UNAVAILABLE = (math.nan,) * 6  # ex/s, x train, peak, x peak, max|err|, mean|err| of a row that could not run


def row_label(kind, how, cache, schedule):
    """`sketch none fused`, `sketch per_tensor unfused`, `sketch none (all signs cached)`, `rapidin per_tensor`;
    the auto schedule adds no word (the CPU's default row names)."""
    word = "" if schedule in (None, "auto") else f" {SCHEDULE_NAMES.get(schedule, schedule)}"
    if kind == "factored":  # schedule: None (r from k) or "16x16"
        word = f" {schedule}" if schedule else ""
    return f"{kind} {how}{word}" + (" (all signs cached)" if cache else "")


def measure_row(model, kind, how, cache, schedule, shapes, batch, fid_batch, exact, args, device):
    """(examples/s, peak memory, max and mean |error| against the exact cosines) of one projector."""
    b = len(batch["input_ids"])
    if kind == "sketch":
        proj = HookSketch(
            model, args.k, normalize=how, plan_tokens=args.seq, **({"cache_bytes": cache} if cache else {})
        )
        if not hasattr(proj, "fold_schedule"):
            raise ValueError("this HookSketch has no fold_schedule")
        proj.fold_schedule = schedule  # auto | triton (fused, CUDA) | index | slices: lark.kernel.sketch
        fn, per_call = (lambda: proj.project_batch(model, batch)), b
    elif kind == "factored":
        proj = FactoredProjector(model, args.k, 0, how, *((16, 16) if schedule == "16x16" else (None, None)))
        fn, per_call = (lambda: proj.project_batch(model, batch)), b
    else:
        proj = CountSketch(shapes, args.k, normalize=how)
        one = {key: v[:1] for key, v in batch.items()}
        fn, per_call = (lambda: proj.project_batch(model, one)), 1  # one backward per example
    seconds, mem = timed(fn, device, args.rapidin_repeats if kind == "rapidin" else args.repeats)
    err_max = err_mean = math.nan
    if exact:
        errors = (pair_cosines(proj.project_batch(model, fid_batch)) - exact[how]).abs()
        err_max, err_mean = errors.max().item(), errors.mean().item()
    return per_call / seconds, mem, err_max, err_mean, proj.k


def floor_step(model, batch):
    """Forward + backward of the mean loss with every weight frozen: only activation gradients are computed (the
    backward starts at the input embeddings' output), the cost floor of a projector that skips weight GEMMs."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def schedules_agree(model, args, batch):
    """max |v_a - v_b| / max |v_b| of the sketches of `batch` (normalize none) by the first two fold schedules of
    --schedules: on CUDA the compiled Triton fold against index_add_'s, the check that the fused fold gives the
    unfused one's vectors on the device (equal up to float32 summation order; its CPU test runs the interpreter)."""
    vectors = []
    for schedule in args.schedules[:2]:
        proj = HookSketch(model, args.k, normalize="none", plan_tokens=args.seq)
        proj.fold_schedule = schedule
        vectors.append(proj.project_batch(model, batch).float())
        del proj
    a, b = vectors
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rows_of(name, args, device, dtype, log, add):
    """Measures config `name`'s rows, handing each to `add` as it is made (a later failure keeps them); returns
    the first two fold schedules' agreement (schedules_agree; NaN where there are not two or one fails)."""
    model = build(name, device, dtype, args.layers if name == "7b" else None)
    p = sum(x.numel() for x in model.parameters())
    vocab = model.config.vocab_size
    batch = batch_of(args.batch, args.seq, vocab, device, seed=0)
    b = args.batch
    log(f"# {name}: {p:,} parameters, {model.config.num_hidden_layers} layers, batch {b} x {args.seq}")

    # training step: AdamW full fine-tuning (optimizer states made by the warm-up; freed before the projections)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")  # fused: no temporaries

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    train_s, train_peak = timed(step, device, args.repeats)
    del opt
    model.zero_grad(set_to_none=True)
    model.eval()
    add((name, "train step (AdamW)", "-", b / train_s, 1.0, train_peak, 1.0, math.nan, math.nan))
    floor_s, floor_peak = timed(lambda: floor_step(model, batch), device, args.repeats)
    add((name, FLOOR, "-", b / floor_s, train_s / floor_s, floor_peak, floor_peak / train_peak, *(math.nan,) * 2))

    # fidelity examples: single sequences, their exact gradients one at a time
    n_fid = args.fidelity_examples
    fid = [batch_of(1, args.seq, vocab, device, seed=100 + i) for i in range(n_fid)]
    fid_batch = {key: torch.cat([f[key] for f in fid]) for key in fid[0]} if fid else None  # 0: no fidelity
    exact = exact_cosines(model, fid) if n_fid > 1 else {}
    reset_peak(device)

    shapes = {n: tuple(x.shape) for n, x in trainable(model)}
    cached = next((s for s in args.schedules if s != "triton"), "index")  # the Triton fold hashes its signs
    cases = [("sketch", how, None, s) for s in args.schedules for how in ("none", "per_tensor")]
    cases += [("sketch", "none", 2**36, cached), ("rapidin", "per_tensor", None, None)]
    cases += [
        ("factored", "none", None, None),
        ("factored", "per_tensor", None, None),
        ("factored", "none", None, "16x16"),
    ]
    for kind, how, cache, schedule in cases:
        label = row_label(kind, how, cache, schedule)
        try:
            row = measure_row(model, kind, how, cache, schedule, shapes, batch, fid_batch, exact, args, device)
        except Exception as e:  # a fold schedule this HookSketch lacks, out of memory, a kernel that fails
            log(f"# {name} {label}: unavailable ({type(e).__name__}: {first_line(e)})")
            row = None
        if row is None:  # (outside the except: its traceback no longer holds the row's tensors)
            add((name, label, args.k, *UNAVAILABLE))
            reset_peak(device)
            continue
        ex_s, mem, err_max, err_mean, k = row
        add((name, label, k, ex_s, ex_s / (b / train_s), mem, mem / train_peak, err_max, err_mean))
    agree = math.nan
    if len(args.schedules) > 1 and n_fid:
        try:
            agree = schedules_agree(model, args, fid_batch)
            pair = " and ".join(args.schedules[:2])
            log(f"# {name}: fold schedules {pair} agree to {agree:.2e} (max |diff| / max |v|)")
        except Exception as e:
            log(f"# {name}: fold schedules not compared ({type(e).__name__}: {first_line(e)})")
    del model
    reset_peak(device)
    return agree


def first_line(error):
    return (str(error).splitlines() or [""])[0][:200]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--configs", nargs="+", default=["1b", "7b"], choices=sorted(CONFIGS))
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="7b only: fewer layers of 7B width (all 32 fit "
        "an H200: ~92 GB for AdamW with bf16 states at batch 8 x 512)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--k", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rapidin-repeats", type=int, default=2, help="rapidin: one example per call")
    parser.add_argument("--fidelity-examples", type=int, default=4, help="pairs among these (0: no fidelity)")
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=None,
        help="HookSketch.fold_schedule of the sketch rows, one pair of rows each (default: triton index on cuda = "
        "fused, unfused; auto on a CPU); a schedule this branch lacks gives an `unavailable` row",
    )
    parser.add_argument("--parts", nargs="+", default=["engine", "e2e"], choices=["engine", "e2e"])
    gpu_e2e.add_arguments(parser)
    args = parser.parse_args(argv)
    args.schedules = args.schedules or (["triton", "index"] if args.device.startswith("cuda") else ["auto"])
    log = lambda s="": print(s, flush=True)  # noqa: E731
    fit_card(args, log)
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    summary = [f"device={gpu.replace(' ', '_')}"]
    if "engine" in args.parts:
        summary += engine(args, gpu, log)
    if "e2e" in args.parts:
        summary += gpu_e2e.run(args, log, time.perf_counter() - start)  # its stage table, then the SUMMARY
    log(f"SUMMARY {' '.join(summary)} seconds={time.perf_counter() - start:.0f}")


def engine(args, gpu, log):
    """The engine table (every config's rows, each also logged as it is measured: a config that fails keeps the
    rows before it, and the next config still runs); returns its SUMMARY fields (the last config's rows, NaN
    where a row is missing)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    log(
        f"# torch {torch.__version__}, {gpu}, {args.dtype}, batch {args.batch} x {args.seq}, k = {args.k}, "
        f"median of {args.repeats} after a warm-up (rapidin {args.rapidin_repeats}), fidelity over "
        f"{args.fidelity_examples * (args.fidelity_examples - 1) // 2} pairs, fold schedules {' '.join(args.schedules)}"
    )
    header = (
        f"{'config':6s} {'row':36s} {'k':>6s} {'ex/s':>8s} {'x train':>8s} {'peak GiB':>9s} {'x peak':>7s} "
        f"{'max|err|':>9s} {'mean|err|':>9s}"
    )
    rows, agree = [], {}

    def add(row):
        rows.append(row)
        log(f"# row: {formatted(row)}")

    for name in args.configs:
        try:
            agree[name] = rows_of(name, args, device, dtype, log, add)
        except Exception as e:  # out of memory in the training step, ...: the next config still runs
            log(f"# {name}: stopped ({type(e).__name__}: {first_line(e)})")
        reset_peak(device)  # (outside the except: its traceback no longer holds the model)
    log(header)
    log("-" * 106)
    for row in rows:
        log(formatted(row))
    last = args.configs[-1]
    mine = {r[1]: r for r in rows if r[0] == last}

    def at(label, i):
        return mine[label][i] if label in mine else math.nan

    first = args.schedules[0]
    s, pt = row_label("sketch", "none", None, first), row_label("sketch", "per_tensor", None, first)
    ri, f = "rapidin per_tensor", "factored none"
    fields = [
        f"config={last} sketch_vs_train_step={at(s, 4):.2f} sketch_per_tensor_vs_train_step={at(pt, 4):.2f}",
        f"rapidin_vs_train_step={at(ri, 4):.2f} sketch_peak_vs_train_step={at(s, 6):.2f}",
        f"sketch_max_abs_err={at(s, 7):.4f} sketch_per_tensor_max_abs_err={at(pt, 7):.4f}",
        f"rapidin_max_abs_err={at(ri, 7):.4f} fold_schedules_rel_diff={agree.get(last, math.nan):.2e}",
        f"floor_vs_train_step={at(FLOOR, 4):.2f} factored_vs_train_step={at(f, 4):.2f}",
        f"factored_vs_floor={at(f, 3) / at(FLOOR, 3):.2f}",
        f"factored_per_tensor_vs_train_step={at('factored per_tensor', 4):.2f} factored_max_abs_err={at(f, 7):.4f}",
        f"factored_16x16_vs_train_step={at('factored none 16x16', 4):.2f}",
    ]
    for schedule in args.schedules[1:]:  # the other schedules' speed, e.g. sketch_unfused_vs_train_step
        word = SCHEDULE_NAMES.get(schedule, schedule)
        fields.append(f"sketch_{word}_vs_train_step={at(row_label('sketch', 'none', None, schedule), 4):.2f}")
    return fields


def formatted(row):
    name, label, k, ex, speed, mem, mem_ratio, err_max, err_mean = row
    return (
        f"{name:6s} {label:36s} {k!s:>6s} {ex:8.2f} {speed:8.2f} {mem / 2**30:9.2f} {mem_ratio:7.2f} "
        f"{err_max:9.4f} {err_mean:9.4f}"
    )


if __name__ == "__main__":
    main()
