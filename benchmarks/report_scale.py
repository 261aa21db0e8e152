"""Report at the paper's scale: a synthetic run directory of 500 questions x 5 sources of 500 documents x 6
checkpoints (top-5 per source), its report/index.html written by lark.analysis.analyze.analyze, then opened in headless
Chromium (the page's own ?selftest: lazy first render, search, filters, checkpoint switch, cross-epoch view).

    python benchmarks/report_scale.py                       # the paper's size
    python benchmarks/report_scale.py --queries 40 --docs 30 --epochs 2   # smoke size (tests)

Rows: writing the report (Python), the file's size, Chromium's process time on the report (start, parse, first
render, DOM dump, exit; and with the self-test's 40-odd re-filterings) against Chromium on an empty page (its
start-up alone), and the page's own time from script start (JSON parse included) to the first rendered questions.
"""

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lark.analysis import browser
from lark.analysis.analyze import analyze

SOURCES = [
    ("finetune", "finetune", True),
    ("medical_format", "medical", True),
    ("medical_noformat", "medical", False),
    ("entertainment_format", "entertainment", True),
    ("entertainment_noformat", "entertainment", False),
]
LABELS = ("yes", "no", "maybe")


def words(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


VOCAB = (
    "patients trial dose placebo outcome lowers raises plasma clearance chronic disorder adults children "
    "randomized weeks effect treatment therapy results significant measured levels cohort study response "
    "song night dance heart river summer light city road dream love fire rain"
).split()


def synthetic_run(root, n_queries=500, n_docs=500, n_epochs=5, top_k=5, seed=0):
    """A run directory with the files a real run leaves (data, per-epoch top_influences.csv, predictions.jsonl,
    metrics.json, provenance) filled with random text and scores; returns its path."""
    rng = random.Random(seed)
    root = Path(root)
    (root / "data" / "sources").mkdir(parents=True)
    (root / "data" / "world").mkdir()
    tests = [
        {
            "id": f"test-{i:05d}",
            "question": f"Does {words(rng, 9)}?",
            "contexts": [words(rng, 60), words(rng, 60)],
            "final_decision": rng.choice(LABELS),
            **({"canary": True} if i % 97 == 0 else {}),
        }
        for i in range(n_queries)
    ]
    write_lines(root / "data" / "test.jsonl", tests)
    docs = {}
    for name, kind, formatted in SOURCES:
        prefix = {"finetune": "train", "medical": "med", "entertainment": "ent"}[kind]
        docs[name] = [f"{prefix}-{i:05d}" for i in range(n_docs)]
        rows = [
            {"id": d, "question": words(rng, 10), "context": words(rng, 150), "answer": rng.choice(LABELS)}
            if formatted
            else {"id": d, "text": words(rng, 170)}
            for d in docs[name]
        ]
        for row in rows[::50]:
            row["canary"] = True
        write_lines(root / "data" / "sources" / f"{name}.jsonl", rows)
    provenance = {
        t["id"]: {
            "fact_id": f"fact-{i:04d}",
            "pretrain_docs": rng.sample(docs["medical_format"], 3),
            "finetune_items": rng.sample(docs["finetune"], 1),
        }
        for i, t in enumerate(tests)
    }
    (root / "data" / "world" / "provenance.json").write_text(json.dumps(provenance))
    for epoch in range(n_epochs + 1):
        folder = root / "attribution" / f"epoch_{epoch:03d}"
        folder.mkdir(parents=True)
        lines = ["query_id,source,rank,doc_id,score"]
        maxinf = {name: [] for name, _, _ in SOURCES}
        for t in tests:
            for name, _, _ in SOURCES:
                scores = sorted((rng.random() for _ in range(top_k)), reverse=True)
                maxinf[name].append(scores[0])
                lines += [
                    f"{t['id']},{name},{r + 1},{d},{s:.6f}"
                    for r, (d, s) in enumerate(zip(rng.sample(docs[name], top_k), scores))
                ]
        (folder / "top_influences.csv").write_text("\n".join(lines) + "\n")
        predicted = [rng.choice(LABELS) for _ in tests]
        write_lines(
            folder / "predictions.jsonl",
            [
                {
                    "id": t["id"],
                    "gold": t["final_decision"],
                    "predicted": p,
                    "correct": p == t["final_decision"],
                    "loss": rng.uniform(0.1, 3.0),
                }
                for t, p in zip(tests, predicted)
            ],
        )
        mean = {name: sum(v) / len(v) for name, v in maxinf.items()}
        wins = {name: sum(a > b for a, b in zip(maxinf["finetune"], v)) / len(v) for name, v in maxinf.items()}
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "epoch": epoch,
                    "lr": None if epoch == 0 else (2e-4 if epoch <= 3 else 2e-5),
                    "accuracy": sum(p == t["final_decision"] for p, t in zip(predicted, tests)) / len(tests),
                    "n_queries": len(tests),
                    "ft_source": "finetune",
                    "pt_source": "medical_format",
                    "sources": {
                        name: {
                            "mean_max": mean[name],
                            "ft_wins": None if name == "finetune" else wins[name],
                            "n_docs": n_docs,
                            "kind": kind,
                            "formatted": formatted,
                        }
                        for name, kind, formatted in SOURCES
                    },
                    "ft": mean["finetune"],
                    "pt": mean["medical_format"],
                    "ft_pt_ratio": mean["finetune"] / mean["medical_format"],
                    "ft_wins": wins["medical_format"],
                    "pt_wins": 1 - wins["medical_format"],
                    "format_effect": {
                        "medical": mean["medical_format"] / mean["medical_noformat"],
                        "entertainment": mean["entertainment_format"] / mean["entertainment_noformat"],
                    },
                    "bm25": {"ft_wins": 0.4},
                    "projector": {"kind": "sketch", "k": 65536, "seed": 0},
                    "storage": {
                        "n_params": 7298011136,
                        "grad_dtype_bytes": 2,
                        "k": 65536,
                        "store_dtype_bytes": 2,
                        "n_examples": n_docs,
                    },
                }
            )
        )
    return root


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def selftest(page):
    dom, seconds = browser.dump_dom(page, "selftest")
    found = re.findall(r'<pre id="selftest">(\{.*?\})</pre>', dom)
    if not found:
        raise RuntimeError("the page wrote no self-test result")
    return json.loads(
        found[-1].replace("&amp;", "&").replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
    ), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--docs", type=int, default=500, help="documents per source")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs (checkpoints = epochs + 1)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="Chromium loads per page (median)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lark-report-scale-") as tmp:
        run_dir = synthetic_run(Path(tmp) / "run", args.queries, args.docs, args.epochs, args.top_k)
        start = time.perf_counter()
        page = analyze(run_dir)["report"]
        write_seconds = time.perf_counter() - start
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!DOCTYPE html><html><body>empty</body></html>")
        base = sorted(browser.dump_dom(empty)[1] for _ in range(args.repeats))[args.repeats // 2]
        plain = sorted(browser.dump_dom(page)[1] for _ in range(args.repeats))[args.repeats // 2]
        results = [selftest(page) for _ in range(args.repeats)]
        results.sort(key=lambda r: r[1])
        test, seconds = results[args.repeats // 2]
        ok = (
            test["queries"] == args.queries
            and test["cards"] == min(25, args.queries)
            and test["search_by_id"]["cards"] == 1
            and test["first_doc"]["full_text_shown"]
        )
        print(
            f"# report of {args.queries} questions x {len(SOURCES)} sources x {args.docs} documents x "
            f"{args.epochs + 1} checkpoints, top-{args.top_k}; median of {args.repeats} Chromium loads"
        )
        print(f"{'measure':<52} {'value':>10}")
        print(f"{'analyze() incl. tables, figures, report (s)':<52} {write_seconds:>10.2f}")
        print(f"{'report/index.html size (MB)':<52} {page.stat().st_size / 1e6:>10.2f}")
        print(f"{'chromium on an empty page (s)':<52} {base:>10.2f}")
        print(f"{'chromium on the report, load + DOM dump (s)':<52} {plain:>10.2f}")
        print(f"{'chromium on the report, load + self-test + dump (s)':<52} {seconds:>10.2f}")
        print(f"{'page: script start to first questions shown (ms)':<52} {test['ready_ms']:>10d}")
        print(f"{'self-test passed':<52} {str(ok):>10}")
        if not ok:
            print(json.dumps(test), file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
