"""Scoring speed: all-pairs cosine and blocked top-k against this machine's plain matrix-multiply rate.

    python benchmarks/scoring_speed.py              # 1,024 queries x 4,096 documents, k = 65,536
    python benchmarks/scoring_speed.py --quick      # 512 x 2,048

Rows: torch.mm on the same float32 operands (the machine's rate, = 1.0), lark.kernel.stores.cosine_scores (blocked
all-pairs) and lark.kernel.stores.topk_scores (top-10 per query, one block of scores in memory at a time), each for the
float16 tier (decoded once when a store is loaded, as load_store does) and the bit tier. Median of 3 after a warm-up.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lark.kernel.stores import cosine_scores, stored_view, topk_scores


def median_seconds(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--block", type=int, default=4096)
    args = ap.parse_args()
    n_q, n_d = (512, 2048) if args.quick else (1024, 4096)
    gen = torch.Generator().manual_seed(0)
    raw_q, raw_d = torch.randn(n_q, args.k, generator=gen), torch.randn(n_d, args.k, generator=gen)
    flops = 2 * n_q * n_d * args.k
    print(f"# {n_q} queries x {n_d} documents, k = {args.k}, {torch.get_num_threads()} threads, block {args.block}")
    print(f"{'row':<34} {'GFLOP/s':>9} {'x mm':>6}")
    base = None
    rows = [("torch.mm (float32)", lambda: raw_q @ raw_d.T)]
    for tier in ("float16", "bit"):
        q, d = stored_view(raw_q, tier), stored_view(raw_d, tier)
        rows.append((f"cosine_scores ({tier})", lambda q=q, d=d, t=tier: cosine_scores(q, d, t, args.block)))
        rows.append((f"topk_scores top-10 ({tier})", lambda q=q, d=d, t=tier: topk_scores(q, d, 10, t, args.block)))
    for label, fn in rows:
        rate = flops / median_seconds(fn) / 1e9
        base = base or rate
        print(f"{label:<34} {rate:>9.1f} {rate / base:>6.2f}")


if __name__ == "__main__":
    main()
