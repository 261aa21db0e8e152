"""The embedded run end to end through the real entry points, on a small size."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA, SMALL, compose
from omegaconf import open_dict
from safetensors import safe_open

from lark.analysis import browser

pytestmark = pytest.mark.slow
SOURCES = ["finetune", "medical_format", "medical_noformat", "entertainment_format", "entertainment_noformat"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One small embedded run (W&B offline), shared by the assertions below."""
    from lark.experiment import train

    out = tmp_path_factory.mktemp("run")
    cfg = compose(SMALL)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)
    return out


def test_checkpoints_are_hf_loadable(run_dir):
    from transformers import AutoModelForCausalLM

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["epoch_000", "epoch_001", "epoch_002"]
    for name in names:
        files = {p.name for p in (run_dir / "checkpoints" / name).iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "lark_config.yaml"} <= files
    first = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "epoch_000")
    last = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "epoch_002")
    assert type(first).__name__ == "Olmo3ForCausalLM"
    assert not torch.equal(first.lm_head.weight, last.lm_head.weight)  # fine-tuning changed the weights


def test_attribution_artifacts(run_dir):
    for epoch in range(3):
        folder = run_dir / "attribution" / f"epoch_{epoch:03d}"
        metrics = json.loads((folder / "metrics.json").read_text())
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert metrics["epoch"] == epoch and len(predictions) == 12
        assert metrics["accuracy"] == pytest.approx(sum(p["correct"] for p in predictions) / 12)
        assert list(metrics["sources"]) == SOURCES
        # the metrics agree with the saved full score matrices (maxinf there comes from the block-wise top-k)
        best = {
            s: safe_open(str(folder / "scores" / f"{s}.safetensors"), "pt").get_tensor("scores").max(1).values
            for s in SOURCES
        }
        assert metrics["ft"] == pytest.approx(best["finetune"].mean().item(), abs=1e-6)
        assert metrics["pt"] == pytest.approx(best["medical_format"].mean().item(), abs=1e-6)
        assert metrics["ft_wins"] == (best["finetune"] > best["medical_format"]).float().mean().item()
        assert (
            metrics["sources"]["entertainment_format"]["ft_wins"]
            == (best["finetune"] > best["entertainment_format"]).float().mean().item()
        )
        assert set(metrics["format_effect"]) == {"medical", "entertainment"}
        assert metrics["bm25"]["ft_wins"] == pytest.approx(bm25_ft_wins(run_dir, "finetune", "medical_format"))
        assert metrics["storage"]["store_bytes_per_example"] == 512 * 2
        assert (epoch == 0) == (metrics["lr"] is None)
        with safe_open(str(folder / "stores" / "test_queries.safetensors"), framework="pt") as f:
            vectors = f.get_tensor("vectors")
            assert vectors.dtype == torch.float16 and vectors.shape == (12, 512)
            assert len(json.loads(f.metadata()["ids"])) == 12
            assert json.loads(f.metadata()["projector"])["kind"] == "sketch"
        for source in SOURCES:
            with safe_open(str(folder / "scores" / f"{source}.safetensors"), framework="pt") as f:
                scores = f.get_tensor("scores")
                assert scores.shape == (12, 8) and scores.abs().max() <= 1 + 1e-3
        rows = (folder / "top_influences.csv").read_text().splitlines()
        assert rows[0] == "query_id,source,rank,doc_id,score" and len(rows) == 1 + 12 * 5 * 5


def bm25_ft_wins(run_dir, ft, pt):
    """Table IV's BM25 FT wins recomputed with rank_bm25 alone: one Okapi index over every source's documents
    (their text, lower-cased runs of word characters); a query (test question) is an FT win when its best FT
    document outscores its best PT document."""
    from rank_bm25 import BM25Okapi

    def text(e):
        return e["text"] if "text" in e else " ".join([e["question"], e["context"], e["answer"]])

    def words(t):
        return re.findall(r"\w+", t.lower())

    docs = {s: [json.loads(line) for line in (run_dir / "data" / "sources" / f"{s}.jsonl").open()] for s in SOURCES}
    names = [s for s in SOURCES for _ in docs[s]]
    index = BM25Okapi([words(text(e)) for s in SOURCES for e in docs[s]])
    wins = []
    for line in (run_dir / "data" / "test.jsonl").open():
        scores = index.get_scores(words(json.loads(line)["question"])).astype(np.float32)
        best = {s: max(v for v, n in zip(scores, names) if n == s) for s in (ft, pt)}
        wins.append(best[ft] > best[pt])
    return sum(wins) / len(wins)


def test_data_tables_figures_and_wandb(run_dir):
    assert {p.name for p in (run_dir / "data" / "sources").iterdir()} == {f"{s}.jsonl" for s in SOURCES}
    provenance = json.loads((run_dir / "data" / "world" / "provenance.json").read_text())
    assert len(provenance) == 12
    for n in range(1, 5):
        assert (run_dir / "tables" / f"table{n}.md").is_file() and (run_dir / "tables" / f"table{n}.csv").is_file()
    for name in ("fig1_influence.png", "fig2_pt_wins.png", "fig3_method.png"):
        assert (run_dir / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0


@pytest.mark.skipif(browser.find() is None, reason="chromium is not installed (CI installs it)")
def test_report_of_the_run_in_chromium(run_dir, tmp_path):
    """The run's report/index.html in headless Chromium: every question, a top document's text, the filters."""
    from test_report import assert_not_blank, lines, selftest

    tests, result = lines(run_dir / "data" / "test.jsonl"), selftest(run_dir / "report" / "index.html")
    assert result["queries"] == result["cards"] == len(tests) == 12
    assert result["first_doc"]["full_text_shown"] and result["search_by_id"]["cards"] == 1
    assert sum(result["labels"].values()) == 12
    for epoch in range(3):
        predictions = lines(run_dir / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl")
        right = sum(p["correct"] for p in predictions)
        assert result["correct"][str(epoch)] == [right, 12 - right]
    doc = lines(run_dir / "data" / "sources" / f"{result['first_doc']['source']}.jsonl")
    assert result["first_doc"]["id"] in {d["id"] for d in doc}
    browser.screenshot(run_dir / "report" / "index.html", tmp_path / "report.png", "questions")
    assert_not_blank(tmp_path / "report.png")


def test_reattribution_reproduces_the_scores(run_dir):
    """attribute.py with resume=false recomputes every store from the saved checkpoint (nothing is reused) and
    gets the training-time scores and metrics bit for bit."""
    from lark.experiment import attribute

    folder = run_dir / "attribution" / "epoch_002"
    stores = sorted((folder / "stores").glob("*.safetensors"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in stores}
    scores_before = safe_open(str(folder / "scores/finetune.safetensors"), "pt").get_tensor("scores")
    metrics_before = json.loads((folder / "metrics.json").read_text())
    messages = []
    attribute(run_dir, {"checkpoints": [2]}, log=messages.append, resume=False)
    assert not [m for m in messages if "reused" in m or "not attributed again" in m], messages
    assert all(p.stat().st_mtime_ns != before[p.name][0] for p in stores)  # rewritten...
    assert all(p.read_bytes() == before[p.name][1] for p in stores)  # ...to the same bytes
    assert torch.equal(safe_open(str(folder / "scores/finetune.safetensors"), "pt").get_tensor("scores"), scores_before)
    assert json.loads((folder / "metrics.json").read_text()) == metrics_before


def test_resume_attributes_again_an_epoch_whose_stores_hold_other_token_ids(run_dir):
    """An epoch complete by its fingerprint is reused whole, unless a store was projected from other token ids than
    today's LARK gives the same examples (an earlier version's cut of long prompts): the fingerprint hashes the text,
    not the tokenisation. Then the epoch is attributed again, saying which stores, and ends as it was."""
    from lark.experiment import attribute
    from lark.kernel.stores import load_store, save_store

    folder = run_dir / "attribution" / "epoch_001"
    path = folder / "stores" / "medical_format.safetensors"
    original = path.read_bytes()
    messages = []
    attribute(run_dir, {"checkpoints": [1]}, log=messages.append, resume=True)
    assert any("epoch_001: complete" in m for m in messages), messages
    unit, norms, ids, meta = load_store(path)
    tier, _ = meta.pop("tier"), meta.pop("k")
    save_store(path, unit * norms[:, None], ids, {**meta, "examples": "an earlier tokenisation"}, tier)
    messages.clear()
    attribute(run_dir, {"checkpoints": [1]}, log=messages.append, resume=True)
    assert any("stores of medical_format were projected from other token ids" in m for m in messages), messages
    assert not any("epoch_001: complete" in m for m in messages)
    assert path.read_bytes() == original  # projected again from the checkpoint, as the run first wrote it


@pytest.mark.parametrize("epochs", [1, 0])
def test_attribute_reloads_a_bf16_true_run_in_bf16_and_reuses_its_epochs(tmp_path, epochs):
    """trainer.precision=bf16-true with model.dtype float32 (the default) trains and saves bf16 weights, but
    attribute.py reloaded them as float32: other fingerprints, so it attributed every epoch again in float32 and
    overwrote the training-time results with other numbers. trainer.max_epochs=0 (no fit()) attributes the base
    model as the trainer would hold it, in bf16, too."""
    from lark.experiment import attribute, train
    from lark.models import weights_dtype

    cfg = compose(SMALL + ["trainer.precision=bf16-true", f"trainer.max_epochs={epochs}", "logger=none"])
    assert cfg.model.dtype == "float32" and weights_dtype(cfg) == torch.bfloat16
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)  # (what Hydra writes before train.py's main runs)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(__import__("omegaconf").OmegaConf.to_yaml(cfg))
    run = train(cfg, log=lambda m: None)
    metrics = {p: p.read_bytes() for p in sorted(run.glob("attribution/epoch_*/metrics.json"))}
    messages = []
    attribute(run, log=messages.append)
    assert sum("complete (metrics.json matches" in m for m in messages) == epochs + 1, messages
    assert {p: p.read_bytes() for p in metrics} == metrics
    assert json.loads((run / "checkpoints/epoch_000/config.json").read_text())["dtype"] == "bfloat16"


def test_multirun_and_analyze_cli(tmp_path):
    """A real Hydra sweep of two jobs through train.py, then analyze.py over the sweep folder."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")] + [
        "trainer.max_epochs=1",
        "logger=none",
        "format=chatml,noformat",
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run([sys.executable, "train.py", "-m", *overrides], cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    out = subprocess.run(
        [sys.executable, "analyze.py", f"run_dir={sweep}"], cwd=ROOT, check=True, capture_output=True, text=True
    )
    table2 = (sweep / "tables" / "table2.md").read_text()
    assert "format=chatml" in table2 and "format=noformat" in table2
    assert (sweep / "figures" / "fig2_pt_wins.png").is_file() and "table1.md" in out.stdout


def test_ddp_attribution_equals_single_process(run_dir, tmp_path):
    """Lightning DDP (2 CPU processes): examples split across ranks and all-gathered give the same scores."""
    out = tmp_path / "ddp"
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")] + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_epochs=1",
        "logger=none",
        "analysis.enabled=false",
        f"hydra.run.dir={out}",
    ]
    subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, check=True, capture_output=True)
    for source in SOURCES:
        name = f"attribution/epoch_000/scores/{source}.safetensors"
        single = safe_open(str(run_dir / name), "pt").get_tensor("scores")
        assert torch.allclose(safe_open(str(out / name), "pt").get_tensor("scores"), single, atol=1e-6)
    for name in ("predictions.jsonl", "metrics.json"):  # the test evaluation, split across the ranks, is the same
        single, ddp = ((d / "attribution" / "epoch_000" / name).read_text() for d in (run_dir, out))
        if name == "metrics.json":
            single, ddp = (json.loads(text)["eval"] for text in (single, ddp))
        assert ddp == single


class ItemMean:
    """An evaluator whose value is the mean of its items' numbers and whose predictions are their ids; it records
    the items it was given."""

    shardable = True

    def __init__(self):
        self.seen = []

    def __call__(self, model, encoder, items, fields_list):
        self.seen.append([item["id"] for item in items])
        return (sum(item["x"] for item in items) / len(items) if items else None), [item["id"] for item in items]


@pytest.mark.parametrize("n_items, world", [(5, 2), (2, 3)])
def test_the_test_evaluation_is_split_across_ranks(n_items, world):
    """Under DDP every rank evaluated every test question (the same answers, world times the work); each now takes
    every world-th one and all get the combined value and the predictions in the items' order."""
    import threading

    from lark.evaluation import evaluate_on_ranks

    items = [{"id": f"q{i}", "x": float(i * i)} for i in range(n_items)]
    barrier, slots, results = threading.Barrier(world, timeout=10), [None] * world, {}
    evaluators = [ItemMean() for _ in range(world)]

    def run(rank):
        def gather_objects(obj):
            slots[rank] = obj
            barrier.wait()
            gathered = list(slots)
            barrier.wait()
            return gathered

        results[rank] = evaluate_on_ranks(evaluators[rank], None, None, items, items, rank, world, gather_objects)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    whole = (sum(item["x"] for item in items) / n_items, [item["id"] for item in items])
    assert [results[r] for r in range(world)] == [whole] * world
    assert [e.seen for e in evaluators] == [[[item["id"] for item in items[r::world]]] for r in range(world)]
    whole_only = ItemMean()
    whole_only.shardable = False  # a value that is not a mean over items: every rank evaluates every item
    from lark.evaluation import answer_log_likelihoods

    sums, counts = answer_log_likelihoods(torch.nn.Linear(1, 1), 0, [])  # a rank without questions (2 on 3 ranks)
    assert sums.shape == counts.shape == (0,)
    refuse = lambda obj: pytest.fail("a whole evaluation gathered")  # noqa: E731
    assert evaluate_on_ranks(whole_only, None, None, items, items, 1, world, refuse) == whole
    assert whole_only.seen == [[item["id"] for item in items]]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_paper_experiment_code_path_on_local_files(run_dir, tmp_path):
    """+experiment=pubmedqa with its hub loaders pointed at local folders in the hub's schema (datasets reads
    them like the hub), and the tiny checkpoint standing in for OLMo-3-7B: every real code path, offline."""
    from lark.data.io import read_jsonl
    from lark.experiment import train

    hub = tmp_path / "pubmedqa_hub"
    hub.mkdir()
    with open(hub / "pqa_labeled.jsonl", "w") as f:
        for _, r in read_jsonl(SHARED_DATA / "pubmedqa" / "pqa_labeled.jsonl"):
            f.write(
                json.dumps(
                    {
                        "pubid": int(r["pubid"]),
                        "question": r["question"],
                        "final_decision": r["final_decision"],
                        "long_answer": r["long_answer"],
                        "context": {"contexts": r["contexts"], "labels": r["labels"]},
                    }
                )
                + "\n"
            )
    cfg = compose(
        [
            "+experiment=pubmedqa",
            "trainer=cpu",
            "trainer.precision=32-true",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"model.hub_id={run_dir}/checkpoints/epoch_000",
            "model.dtype=float32",
            "model.gradient_checkpointing=false",
            f"data.reader.hub_id={hub}",
            "data.reader.hub_config=null",
            "data.n_train=16",
            "data.n_test=8",
            "source.size=8",
            "max_length=192",
            "attribution.projector.k=512",
            "analysis.enabled=false",
            f"data.corpora.medical.hub_id={SHARED_DATA / 'pubmed_corpus'}",
            "data.corpora.medical.limit=300",
            f"data.corpora.entertainment.hub_id={SHARED_DATA / 'entertainment'}",
            "data.corpora.entertainment.limit=300",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    out = train(cfg)
    metrics = json.loads((out / "attribution" / "epoch_001" / "metrics.json").read_text())
    assert metrics["n_queries"] == 8 and all(s["n_docs"] == 8 for s in metrics["sources"].values())
    assert metrics["storage"]["n_params"] > 0 and metrics["ft"] is not None
    test_ids = [r["id"] for _, r in read_jsonl(out / "data" / "test.jsonl")]
    from conftest import official_test_ids

    assert set(test_ids) <= official_test_ids()
    medical = [r for _, r in read_jsonl(out / "data" / "sources" / "medical_noformat.jsonl")]
    assert all(r["id"].startswith("PMC") for r in medical)  # BM25-retrieved abstracts
