"""validate.py's checks on a small embedded run with a planted canary: the canary in the run's files, Table V with
provenance recall, canary retrieval and a mini-LDS whose retrains are real LARK runs (Hydra multirun), and a
second validation that reuses every retrain and score matrix."""

import json

import pytest
from conftest import SHARED_DATA, SMALL, compose
from omegaconf import OmegaConf, open_dict

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
    from lark.validation.table5 import load_config, validate_run

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
    result, _, _ = validated
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
    for row in result["rows"]:
        assert 0 <= row["ft_mrr"] <= 1 and 0 <= row["canary_p@n"] <= 1 and 0 < row["canary_auprc"] <= 1
        assert -1 <= row["lds"] <= 1 and row["lds_low"] <= row["lds"] <= row["lds_high"]
        if not row["method"].endswith("TracIn-CP"):
            assert row["pt_n"] == 12 and 0 <= row["pt_recall@1"] <= row["pt_recall@10"] <= 1
    assert result["n_pool"] == 100  # pool.kind=all: every abstract of the world
    table = (run_dir / "tables" / "table5.md").read_text()
    assert "| bm25 | - |" in table and "Canary AUPRC" in table and "LDS" in table
    assert (run_dir / "figures" / "fig5_validation.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["backdoor"]) == {0, 1} and result["backdoor"][1]["n"] == 3


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
