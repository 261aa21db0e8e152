"""Why Pearson stops short of 0.99 on some models: the noise of any k-dimensional projection, measured.

    python benchmarks/projection_noise.py            # tiny OLMo-3, 8.4M and 42M Llama-style models
    python benchmarks/projection_noise.py --quick    # tiny + 8.4M, dense Gaussian only where it is cheap

On the same (query, document) pairs as benchmarks/attribution_speed.py, for k = 1024 ... 65536: the spread of the
exact gradient cosines, the Pearson an ideal k-dimensional random projection is expected to reach
(lark.kernel.fidelity.jl_pearson), a dense Gaussian projection actually measured (streamed over the exact gradients,
where P x k random numbers are affordable: --gaussian-budget), `sketch` over --seeds seeds and `rapidin`.
If the sketch matches that expectation and the Gaussian does too, the shortfall is the spread of the exact
cosines against
the 1/k variance every k-dimensional projection has, not the sketch.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from attribution_speed import CPU_MODELS, setup, texts  # noqa: E402

from lark.kernel.build import project_examples
from lark.kernel.fidelity import agreement, fidelity, jl_pearson
from lark.kernel.projectors import CountSketch, ExactProjector, trainable
from lark.kernel.sketch import HookSketch


def unit(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def dense_gaussian(grads, k, seed, rows=2**16):
    """[n, P] unit gradients -> [n, k] by an N(0, 1) matrix generated `rows` rows at a time (never held whole)."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(grads.shape[0], k)
    for start in range(0, grads.shape[1], rows):
        block = torch.randn(min(rows, grads.shape[1] - start), k, generator=gen)
        out.addmm_(grads[:, start : start + block.shape[0]], block)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny + 8.4M models")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {CPU_MODELS}")
    ap.add_argument("--ks", nargs="*", type=int, default=[1024, 4096, 16384, 65536])
    ap.add_argument("--seeds", type=int, default=3, help="sketch seeds per k")
    ap.add_argument(
        "--gaussian-budget",
        type=float,
        default=1e10,
        help="largest P x k for which the dense Gaussian is measured (~100M numbers/s on 2 cores)",
    )
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="attribution_speed.py's timed batch: the pairs come after it")
    ap.add_argument("--fidelity-examples", type=int, default=24)
    args = ap.parse_args()
    names = args.models or (["tiny-olmo3", "llama-8.4M"] if args.quick else CPU_MODELS)
    corpus = texts()
    n = args.fidelity_examples
    print(
        f"# fidelity over {n // 3} x {n - n // 3} real-text pairs, {args.seq} tokens; sketch: mean [min, max] of "
        f"{args.seeds} seeds; gaussian where P x k <= {args.gaussian_budget:.0e}"
    )
    header = f"{'model':<11} {'k':>6} {'cos std':>8} {'JL exp.':>8} {'gaussian':>9} {'sketch':>26} {'rapidin':>8}"
    print(header)
    print("-" * len(header))
    for name in names:
        model, tokenizer, _, queries, docs = setup(name, corpus, args.seq, args.batch, n)
        pad = tokenizer.pad_token_id
        shapes = {p_name: tuple(p.shape) for p_name, p in trainable(model)}
        grads = unit(project_examples(model, queries + docs, ExactProjector(shapes), pad))
        exact = grads[: len(queries)] @ grads[len(queries) :].T
        total = grads.shape[1]
        for k in args.ks:
            gaussian = float("nan")
            if total * k <= args.gaussian_budget:
                g = unit(dense_gaussian(grads, k, seed=0))
                gaussian = agreement(exact, g[: len(queries)] @ g[len(queries) :].T)["pearson"]
            sketches = [HookSketch(model, k, seed, plan_tokens=args.seq) for seed in range(args.seeds)]
            sketch = [fidelity(model, queries, docs, h, pad, exact)["pearson"] for h in sketches]
            rapidin = fidelity(model, queries, docs, CountSketch(shapes, k, 0), pad, exact)["pearson"]
            spread = f"{sum(sketch) / len(sketch):.4f} [{min(sketch):.4f}, {max(sketch):.4f}]"
            print(
                f"{name:<11} {k:>6} {exact.std().item():>8.4f} {jl_pearson(exact, k):>8.4f} {gaussian:>9.4f} "
                f"{spread:>26} {rapidin:>8.4f}"
            )
            sys.stdout.flush()
        need = next((f"{k:,}" for k in (2**i for i in range(10, 30)) if jl_pearson(exact, k) >= 0.99), "> 2^29")
        print(
            f"# {name}: {total:,} parameters; Pearson 0.99 needs k >= {need} on these pairs "
            f"(dense JL expects {jl_pearson(exact, 65536):.4f} at 65536)"
        )
        del grads


if __name__ == "__main__":
    main()
