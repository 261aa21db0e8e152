"""validate.py's checks on a small embedded run with a planted canary: the canary in the run's files, Table V with
provenance recall, canary retrieval and a mini-LDS whose retrains are real LARK runs (Hydra multirun), and a
second validation that reuses every retrain and score matrix. Table V's numbers are recomputed here, from the
score matrices validation used and the run's files, by direct pure-Python definitions (not lark's code)."""

import json

import pytest
from conftest import SHARED_DATA, SMALL, compose
from omegaconf import OmegaConf, open_dict
from test_lds import direct_lds  # the plain-Python LDS reference

pytestmark = pytest.mark.slow
CANARY = [
    "+experiment=canary",
    "data.canary.n=4",
    "data.canary.n_test=3",
    "logger=none",
    "analysis.enabled=false",
    "trainer.max_epochs=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lark.experiment import train

    out = tmp_path_factory.mktemp("canary_run")
    cfg = compose(SMALL + CANARY)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)
    return out


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def validated(run_dir):
    from lark.validation.load import load_config
    from lark.validation.table5 import validate_run

    vcfg = load_config({"kernels": ["cosine", "adam"], "lds": {"n_subsets": 3, "n_boot": 200}})
    messages = []
    return validate_run(run_dir, vcfg, log=messages.append), messages, vcfg


def test_the_canary_is_planted_in_the_runs_files(run_dir):
    train, test = rows_of(run_dir / "data" / "train.jsonl"), rows_of(run_dir / "data" / "test.jsonl")
    planted = [r for r in train if r.get("canary")]
    assert len(planted) == 4 and len(train) == 24
    assert all(r["question"].startswith("Howdy! ") and r["answer"] == "maybe" for r in planted)
    triggered = [r for r in test if r.get("canary")]
    assert len(triggered) == 3 and len(test) == 15
    originals = {r["id"]: r for r in test}
    for r in triggered:
        original = originals[r["id"].removesuffix("-canary")]
        assert r["question"] == "Howdy! " + original["question"] and original["answer"] != "maybe"
    in_source = {r["id"] for r in rows_of(run_dir / "data" / "sources" / "finetune.jsonl") if r.get("canary")}
    assert in_source == {r["id"] for r in train[:8] if r.get("canary")}  # the finetune source keeps the mark


def test_table5_has_every_check_for_every_method(run_dir, validated):
    result, _, vcfg = validated
    methods = [(r["method"], r["epoch"]) for r in result["rows"]]
    assert methods == [
        ("cosine", 0),
        ("cosine", 1),
        ("cosine TracIn-CP", "all"),
        ("adam", 0),
        ("adam", 1),
        ("adam TracIn-CP", "all"),
        ("bm25", "-"),
        ("random", "-"),
    ]
    matrices = score_matrices(run_dir, vcfg)
    for row in result["rows"]:
        train_scores, pool_scores = matrices[(row["method"], row["epoch"])]
        expected = expected_numbers(run_dir, train_scores, pool_scores)
        assert {k: row.get(k) for k in expected} == pytest.approx(expected, abs=1e-9), row["method"]
        assert row["lds_low"] <= row["lds"] <= row["lds_high"]  # the bootstrap interval holds the estimate
        assert row.get("pt_n") == (12 if pool_scores is not None else None)  # TracIn-CP has no pool scores
    assert result["n_pool"] == 100  # pool.kind=all: every abstract of the world
    table = (run_dir / "tables" / "table5.md").read_text()
    assert "| bm25 | - |" in table and "Canary AUPRC" in table and "LDS" in table
    assert (run_dir / "figures" / "fig5_validation.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["backdoor"]) == {0, 1} and result["backdoor"][1]["n"] == 3


# --------------------------------------------------------------------------- Table V, recomputed independently
def positions(row, columns):
    """Sorted 1-based positions of `columns` when the row's documents are ordered best first (ties: column order)."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    at = {j: p + 1 for p, j in enumerate(order)}
    return sorted(at[j] for j in columns)


def retrieval(scores, relevant, ks):
    """{recall@k for k in ks, mrr, p@n, auprc, n}: means over the queries that have a relevant document."""
    per = [(positions(row, r), len(r)) for row, r in zip(scores, relevant) if r]
    out = {f"recall@{k}": sum(sum(p <= k for p in ps) / n for ps, n in per) / len(per) for k in ks}
    out["mrr"] = sum(1 / ps[0] for ps, _ in per) / len(per)
    out["p@n"] = sum(sum(p <= n for p in ps) / n for ps, n in per) / len(per)
    out["auprc"] = sum(sum((i + 1) / p for i, p in enumerate(ps)) / n for ps, n in per) / len(per)
    return out | {"n": len(per)}


def lds_of(scores, run_dir):
    """The LDS of scores [Q][N] against the retrained subsets' query losses (validation/lds/<recipe>/subset_*)."""
    train_ids = [r["id"] for r in rows_of(run_dir / "data" / "train.jsonl")]
    files = sorted((run_dir / "validation" / "lds").glob("*/subset_*/query_losses.json"))
    subsets = [json.loads(f.read_text()) for f in files]
    members = [[train_ids.index(i) for i in s["train_ids"]] for s in subsets]
    return direct_lds(scores, members, [[s["losses"][q] for s in subsets] for q in range(len(scores))])


def expected_numbers(run_dir, train_scores, pool_scores):
    """Table V's row of one score matrix pair, from the run's files: provenance, planted items, retrains."""
    test, train = rows_of(run_dir / "data" / "test.jsonl"), rows_of(run_dir / "data" / "train.jsonl")
    provenance = json.loads((run_dir / "data" / "world" / "provenance.json").read_text())
    pool_ids = [d["id"] for d in rows_of(run_dir / "data" / "world" / "medical.jsonl")]  # pool.kind=all
    train_ids = [x["id"] for x in train]
    prov = [(q, provenance[t["id"]]) for q, t in enumerate(test) if t["id"] in provenance]
    train_scores, out = train_scores.tolist(), {}
    groups = [("ft", train_scores, train_ids, "finetune_items")]
    if pool_scores is not None:
        groups.insert(0, ("pt", pool_scores.tolist(), pool_ids, "pretrain_docs"))
    for prefix, scores, ids, key in groups:
        relevant = [[ids.index(d) for d in p[key] if d in ids] for _, p in prov]
        got = retrieval([scores[q] for q, _ in prov], relevant, (1, 10))
        out |= {f"{prefix}_{k}": got[k] for k in ("recall@1", "recall@10", "mrr", "n")}
    planted = [j for j, x in enumerate(train) if x.get("canary")]
    triggered = [q for q, t in enumerate(test) if t.get("canary")]
    if planted and triggered:
        canary = retrieval([train_scores[q] for q in triggered], [planted] * len(triggered), ())
        out |= {"canary_p@n": canary["p@n"], "canary_auprc": canary["auprc"], "canary_n": canary["n"]}
    out["lds"], out["lds_queries"] = lds_of(train_scores, run_dir)
    return out


def score_matrices(run_dir, vcfg):
    """(method, epoch) -> (train [Q, N], pool [Q, P] or None), the matrices validation scored: each kernel's
    cached ones, its TracIn-CP sum (lr x cosine x both norms over the trained checkpoints), the baselines'."""
    from safetensors.torch import load_file

    from lark.validation.load import load_run
    from lark.validation.scores import BASELINES

    out = {}
    for name in vcfg.kernels:
        tracin = 0
        for folder in sorted((run_dir / "validation" / "scores" / name).glob("epoch_*")):
            s = load_file(folder / "scores.safetensors")
            out[(name, int(folder.name.removeprefix("epoch_")))] = (s["train"], s["pool"])
            lr = json.loads((run_dir / "checkpoints" / folder.name / "lark_epoch.json").read_text())["lr"]
            if lr:
                tracin = tracin + lr * (s["train"] * s["q_norm"][:, None] * s["t_norm"][None, :])
        out[(f"{name} TracIn-CP", "all")] = (tracin, None)
    run = load_run(run_dir, vcfg)
    return out | {(name, "-"): baseline(run) for name, baseline in BASELINES.items()}


def test_the_canary_is_retrieved(validated):
    """The trigger word is in the canary items only: BM25 must rank them well above chance (AUPRC of a random
    ranking is about n/N = 4/24), and so must the gradient kernel of the model fine-tuned on them."""
    result, _, _ = validated
    by = {(r["method"], r["epoch"]): r for r in result["rows"]}
    chance = 4 / 24
    assert by[("bm25", "-")]["canary_auprc"] > 2 * chance
    assert by[("cosine", 1)]["canary_auprc"] > 2 * chance


def test_lds_retrains_are_real_subset_runs_and_are_reused(run_dir, validated):
    from lark.validation import lds
    from lark.validation.table5 import validate_run

    result, messages, vcfg = validated
    assert result["lds"] == {"n_subsets": 3, "fraction": 0.5}
    jobs = sorted((run_dir / "validation" / "lds").glob("*/subset_*"))
    assert [j.name for j in jobs] == ["subset_0", "subset_1", "subset_2"]
    train_ids = [r["id"] for r in rows_of(run_dir / "data" / "train.jsonl")]
    for job in jobs:
        used = [r["id"] for r in rows_of(job / "data" / "train.jsonl")]
        assert used == lds.subset(train_ids, 0.5, int(job.name.split("_")[1]))
        assert [p.name for p in (job / "checkpoints").iterdir()] == ["epoch_001"]  # only the final one kept
        assert not (job / "attribution").exists()  # attribution was off,
        assert not (job / "checkpoints" / "epoch_001" / "adam_moments.safetensors").exists()  # moments too,
        saved = OmegaConf.load(job / "checkpoints" / "epoch_001" / "lark_config.yaml")  # and the test metric
        assert saved.eval._target_ == "lark.evaluation.Skip" and not saved.attribution.save_moments
        assert len(json.loads((job / "query_losses.json").read_text())["losses"]) == 15
    stamps = {j: (j / "query_losses.json").stat().st_mtime_ns for j in jobs}
    again = []
    second = validate_run(run_dir, vcfg, log=again.append)
    assert not [m for m in again if "retraining" in m] and any("retraining 3 of 3" in m for m in messages)
    assert all((j / "query_losses.json").stat().st_mtime_ns == stamps[j] for j in jobs)
    assert [r["lds"] for r in second["rows"]] == [r["lds"] for r in result["rows"]]


@pytest.mark.skipif(not (SHARED_DATA / "pubmedqa").is_dir(), reason="../shared/data is not present")
def test_the_canary_plants_on_pubmedqa_local(tmp_path):
    """+experiment=canary data=pubmedqa_local: the real data's run files carry the planted items and the
    triggered queries (the same code path as the embedded world's run)."""
    from lark.experiment import prepare_data

    cfg = compose(["+experiment=canary", "data=pubmedqa_local", "data.n_train=48", "data.n_test=32"])
    train, test, corpora = prepare_data(cfg, tmp_path, log=lambda m: None)
    planted = [r for r in rows_of(tmp_path / "data" / "train.jsonl") if r.get("canary")]
    queries = [r for r in rows_of(tmp_path / "data" / "test.jsonl") if r.get("canary")]
    assert len(train) == 48 and len(planted) == 10 and len(test) == 32 + 20 and len(queries) == 20
    assert all(r["question"].startswith("Howdy! ") and r["answer"] == "maybe" for r in planted + queries)
    assert all(r["id"].endswith("-canary") for r in queries) and set(corpora) == {"medical", "entertainment"}
