"""BM25 at scale: index 10^5 and 10^6 generated documents and retrieve the top 500 for 500 queries, with each backend
of lark.data.bm25 (bm25s, the default, and rank_bm25, the reference).

    python benchmarks/bm25_scale.py                              # 10^5 and 10^6 documents, both backends
    python benchmarks/bm25_scale.py --sizes 100000 --backends bm25s
    python benchmarks/bm25_scale.py --rank-bm25-budget-s 300 --max-rss-gb 6  # give up on rank_bm25 sooner

The documents are 200-400 words drawn from a Zipfian (s = 1) vocabulary of 50,000 made-up words (seed 0), written
once per size as JSON Lines under --workdir and streamed from there (lark.data.corpora.JsonlCorpus, stream: true)
into the index in chunks, as a real corpus is; the queries are 8-20 words from the same distribution. Each backend x
size runs in a fresh subprocess, which reports its index time (read + tokenise + build), query time (500 queries,
top 500 each, best first) and peak memory (ru_maxrss: the whole process, numpy and the imported torch included). A run
that passes its time budget (--budget-s for bm25s, --rank-bm25-budget-s for rank_bm25, which scores every document of
every query in Python) or --max-rss-gb of memory is stopped and shown as not finished, with what it did finish.
Times are wall-clock seconds with the process's CPU seconds in brackets (on a shared machine the CPU time is the
comparable figure).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lark.data.bm25 import BM25
from lark.data.corpora import JsonlCorpus
from lark.data.io import BadRows

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def vocabulary(rng, size):
    """[size] distinct made-up words of 2-12 letters, and their Zipfian (s = 1) cumulative probabilities."""
    words = {}
    while len(words) < size:
        word = "".join(LETTERS[rng.integers(0, 26, rng.integers(2, 13))])
        words.setdefault(word, None)
    p = 1 / np.arange(1, size + 1)
    return list(words), np.cumsum(p / p.sum())


def draw(rng, words, cdf, lengths):
    """One text per length, its words drawn from the vocabulary's distribution."""
    ids = np.minimum(np.searchsorted(cdf, rng.random(int(lengths.sum()))), len(words) - 1).tolist()
    texts, start = [], 0
    for n in lengths.tolist():
        texts.append(" ".join([words[i] for i in ids[start : start + n]]))
        start += n
    return texts


def write_corpus(path, n_docs, seed=0, vocab=50_000, chunk=10_000):
    """The corpus of n_docs documents as JSON Lines (written once; reused when it exists)."""
    if path.is_file():
        return
    rng = np.random.default_rng(seed)
    words, cdf = vocabulary(rng, vocab)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for first in range(0, n_docs, chunk):
            lengths = rng.integers(200, 401, min(chunk, n_docs - first))
            for i, text in enumerate(draw(rng, words, cdf, lengths)):
                f.write(json.dumps({"id": f"d{first + i}", "text": text}) + "\n")
    tmp.rename(path)


def queries(n, seed=1, vocab=50_000):
    rng = np.random.default_rng(seed)
    words, cdf = vocabulary(np.random.default_rng(0), vocab)  # the corpus's vocabulary
    return draw(rng, words, cdf, rng.integers(8, 21, n))


def child(backend, path, n_queries, depth, report, dtype):
    """Index the corpus at `path` with `backend`, retrieve, and keep `report` (JSON) up to date: index time, then
    the queries done so far and their time, then the peak memory (a stopped run still tells its rate)."""
    docs = JsonlCorpus(path, stream=True)(BadRows())
    start, cpu = time.perf_counter(), time.process_time()
    index = BM25((d["text"] for d in docs), backend=backend, dtype=dtype)
    out = {"docs": len(index), "index_s": time.perf_counter() - start, "index_cpu": time.process_time() - cpu}
    Path(report).write_text(json.dumps(out | {"done": 0}))
    qs = queries(n_queries)
    start, cpu = time.perf_counter(), time.process_time()
    for i, q in enumerate(qs, start=1):
        ranking = index.rankings([q], depth)[0]
        assert len(ranking) == depth
        if i % 10 == 0 or i == n_queries:
            out |= {"done": i, "query_s": time.perf_counter() - start, "query_cpu": time.process_time() - cpu}
            Path(report).write_text(json.dumps(out))
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    Path(report).write_text(json.dumps(out))


def rss_gib(pid):
    """The resident memory of a process, GiB (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run(backend, path, args):
    """{docs, index_s, index_cpu, done, query_s, query_cpu, peak_gib} of one fresh subprocess ({stopped: why}
    added when stopped)."""
    budget = args.rank_bm25_budget_s if backend == "rank_bm25" else args.budget_s
    report = path.with_name(f"{path.stem}.{backend}.json")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", backend, str(path), str(report), "--queries", str(args.queries)]
    proc = subprocess.Popen(cmd + ["--depth", str(args.depth), "--dtype", args.dtype])
    start, stopped = time.monotonic(), None
    while proc.poll() is None and stopped is None:
        time.sleep(0.2)
        if time.monotonic() - start > budget:
            stopped = f"did not finish within {budget:.0f} s"
        elif rss_gib(proc.pid) > args.max_rss_gb:
            stopped = f"stopped at {args.max_rss_gb} GiB resident after {time.monotonic() - start:.0f} s"
    if stopped:
        proc.kill()
        proc.wait()
    elif proc.returncode:
        stopped = f"failed (exit {proc.returncode})"
    out = json.loads(report.read_text()) if report.is_file() else {}
    return out | ({"stopped": stopped} if stopped else {})


def row(backend, n, r, n_queries):
    """One table row; a stopped run shows what it finished (its index time, its queries' rate)."""
    index = f"{r['index_s']:.1f} ({r['index_cpu']:.1f})" if "index_s" in r else "-"
    if r.get("done") == n_queries:
        query = f"{r['query_s']:.1f} ({r['query_cpu']:.1f})"
    elif r.get("done"):
        all_cpu = r["query_cpu"] / r["done"] * n_queries
        query = f"{r['done']} queries in {r['query_s']:.0f} ({r['query_cpu']:.0f}) s: ~{all_cpu:.0f} s CPU for all"
    else:
        query = "-"
    peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
    return f"| {backend} | {n:,} | {index} | {query} | {peak} | {r.get('stopped', '')} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--backends", nargs="+", default=["bm25s", "rank_bm25"])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--depth", type=int, default=500, help="documents retrieved per query")
    ap.add_argument("--budget-s", type=float, default=3600, help="stop a bm25s run after this many seconds")
    ap.add_argument("--rank-bm25-budget-s", type=float, default=600, help="stop a rank_bm25 run after this many s")
    ap.add_argument("--max-rss-gb", type=float, default=8, help="stop a run whose resident memory passes this")
    ap.add_argument("--dtype", default="float64", help="the bm25s index's weights (source.bm25.dtype)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lark_bm25_scale"), help="where the corpora go")
    ap.add_argument("--child", nargs=3, metavar=("BACKEND", "CORPUS", "REPORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child[:2], args.queries, args.depth, args.child[2], args.dtype)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"<!-- load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores -->")
    head = f"| backend | documents | index, s (CPU s) | {args.queries} queries, top {args.depth}: s (CPU s) |"
    print(head + " peak memory (GiB) | |")
    print("|---|---:|---:|---:|---:|---|")
    for n in args.sizes:
        path = args.workdir / f"corpus_{n}.jsonl"
        start = time.perf_counter()
        write_corpus(path, n)
        print(f"<!-- corpus of {n} documents ready in {time.perf_counter() - start:.0f} s: {path} -->", flush=True)
        for backend in args.backends:
            print(row(backend, n, run(backend, path, args), args.queries), flush=True)


if __name__ == "__main__":
    main()
