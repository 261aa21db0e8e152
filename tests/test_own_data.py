"""+experiment=own_data end to end: train.py on a non-PubMedQA JSON Lines set (free-form answers) with three
corpora and sources of four kinds, under eval=exact_match and eval=loss, and every artifact it writes."""

import csv
import json
import string
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from safetensors import safe_open

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "docs" / "examples" / "own_data"
SOURCES = {"finetune": 38, "atlas_retrieved": 16, "atlas_raw": 16, "news_sampled": 16, "recipes_all": 12}
SMALL = [
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=20",
    "model.pretrain.batch_size=8",
    "model.pretrain.max_length=64",
    "max_length=96",
    "attribution.projector.k=512",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def normal(text):
    """Exact match's comparison form: lower case, single spaces, no surrounding punctuation."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def independent_eval(run, epoch, max_length=96, max_new_tokens=32):
    """([answer loss], [greedy prediction]) of a checkpoint on the example's test rows, computed outside lark: the
    checkpoint loaded by transformers, the ChatML turns written out by hand (no system turn, the prompt alone as the
    user turn), one example at a time (no padding), prediction by transformers' own greedy generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run / "checkpoints" / f"epoch_{epoch:03d}"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stop = [tok.eos_token_id, tok.pad_token_id]
    losses, predicted = [], []
    for row in lines(EXAMPLE / "test.jsonl"):
        user = f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        prompt = tok(user, add_special_tokens=False)["input_ids"]
        answer = tok(f"{row['response']}<|im_end|>", add_special_tokens=False)["input_ids"]
        assert len(prompt) + len(answer) <= max_length and len(prompt) <= max_length - max_new_tokens  # no cut
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0]
            losses.append(F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(answer)).item())
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=stop[1],
            )
        predicted.append(" ".join(tok.decode(out[0, len(prompt) :], skip_special_tokens=True).split()))
    return losses, predicted


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One Hydra sweep through train.py: job 0 = eval=exact_match, job 1 = eval=loss (the experiment's)."""
    out = tmp_path_factory.mktemp("own_data") / "sweep"
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "+experiment=own_data",
            "eval=exact_match,loss",
            *SMALL,
            f"hydra.sweep.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout + run.stderr


@pytest.mark.parametrize("job,metric,column", [(0, "exact_match", "Exact match"), (1, "answer_loss", "Answer loss")])
def test_every_artifact_of_an_own_data_run(sweep, job, metric, column):
    from lark.analysis.schema import check

    run = sweep[0] / str(job)
    assert "sketch self-check on cpu: the hooks reach all" in sweep[1]
    train, test = lines(run / "data" / "train.jsonl"), lines(run / "data" / "test.jsonl")
    assert (len(train), len(test)) == (38, 10)
    assert test == [
        {"id": r["id"], "question": r["prompt"], "contexts": [], "answer": r["response"]}
        for r in lines(EXAMPLE / "test.jsonl")
    ]  # free-form answers, mapped fields
    atlas_ids = {r["id"] for r in lines(EXAMPLE / "atlas.jsonl")}
    news_ids = {r["id"] for r in lines(EXAMPLE / "news.jsonl")}
    for name, size in SOURCES.items():
        rows = lines(run / "data" / "sources" / f"{name}.jsonl")
        assert len(rows) == size
        assert ("text" in rows[0]) == (name in ("atlas_raw", "news_sampled", "recipes_all"))  # formatted or raw
    assert [r["id"] for r in lines(run / "data" / "sources" / "recipes_all.jsonl")] == [
        r["id"] for r in lines(EXAMPLE / "recipes.jsonl")
    ]  # `all`: every document, in order
    assert {r["id"] for r in lines(run / "data" / "sources" / "atlas_retrieved.jsonl")} <= atlas_ids
    assert {r["id"] for r in lines(run / "data" / "sources" / "news_sampled.jsonl")} <= news_ids
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000", "epoch_001"]
    for epoch in (0, 1):
        assert (run / "checkpoints" / f"epoch_{epoch:03d}" / "model.safetensors").is_file()
        folder = run / "attribution" / f"epoch_{epoch:03d}"
        metrics = check(json.loads((folder / "metrics.json").read_text()), folder)
        assert metrics["eval"]["metric"] == metric and metrics["n_queries"] == 10
        value = metrics["eval"]["value"]
        losses, predicted = independent_eval(run, epoch)
        saved = lines(folder / "predictions.jsonl")
        assert [r["loss"] for r in saved] == pytest.approx(losses, rel=1e-5)
        if metric == "exact_match":
            assert [r["predicted"] for r in saved] == predicted
            gold = [r["response"] for r in lines(EXAMPLE / "test.jsonl")]
            assert value == sum(normal(p) == normal(g) for p, g in zip(predicted, gold)) / len(gold)
        else:
            assert value == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        assert metrics["accuracy"] == (value if metric == "exact_match" else None)
        assert {n: s["n_docs"] for n, s in metrics["sources"].items()} == SOURCES
        assert {n: s["kind"] for n, s in metrics["sources"].items()} == {
            "finetune": "finetune",
            "atlas_retrieved": "retrieve",
            "atlas_raw": "retrieve",
            "news_sampled": "sample",
            "recipes_all": "all",
        }
        assert metrics["sources"]["news_sampled"]["corpus"] == "news"
        assert 0 < metrics["ft_wins"] + metrics["pt_wins"] <= 1 and set(metrics["format_effect"]) == {"atlas"}
        with safe_open(str(folder / "stores" / "test_queries.safetensors"), framework="pt") as f:
            assert f.get_tensor("vectors").shape == (10, 512)
        for name, size in SOURCES.items():
            with safe_open(str(folder / "scores" / f"{name}.safetensors"), framework="pt") as f:
                scores = f.get_tensor("scores")
                assert scores.shape == (10, size) and torch.isfinite(scores).all()
        rows = list(csv.reader((folder / "top_influences.csv").open()))
        assert rows[0] == ["query_id", "source", "rank", "doc_id", "score"] and len(rows) == 1 + 10 * 5 * 5
    for n in range(1, 5):
        assert (run / "tables" / f"table{n}.md").is_file() and (run / "tables" / f"table{n}.csv").is_file()
    table2 = (run / "tables" / "table2.md").read_text()
    assert f"| {column} |" in table2 and "| Acc. |" not in table2
    for name in ("fig1_influence.png", "fig2_pt_wins.png", "fig3_method.png"):
        assert (run / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_example_files_are_what_the_readme_says():
    assert len(lines(EXAMPLE / "train.jsonl")) == 38 and len(lines(EXAMPLE / "test.jsonl")) == 10
    assert all(set(r) == {"id", "prompt", "response"} for r in lines(EXAMPLE / "train.jsonl"))
    assert all(
        set(r) == {"id", "text"} for name in ("atlas", "news", "recipes") for r in lines(EXAMPLE / f"{name}.jsonl")
    )


def test_metrics_schema_names_the_bad_key(tmp_path):
    from lark.analysis.runs import load_metrics

    folder = tmp_path / "attribution" / "epoch_000"
    folder.mkdir(parents=True)
    good = {
        "epoch": 0,
        "sources": {"ft": {"mean_max": 0.5}, "pt": {"mean_max": 0.2}},
        "ft_source": "ft",
        "pt_source": "pt",
        "eval": {"metric": "accuracy", "value": 0.5, "higher_is_better": True},
    }
    (folder / "metrics.json").write_text(json.dumps(good))
    assert load_metrics(tmp_path)[0]["eval"]["value"] == 0.5
    for change, key in [
        ({"pt_source": "nope"}, "pt_source 'nope'"),
        ({"eval": {"metric": 3}}, "eval.metric"),
        ({"sources": {"ft": {"n_docs": "8"}}, "ft_source": "ft", "pt_source": "ft"}, "sources.ft.n_docs"),
        ({"n_queries": 2.5}, "n_queries"),
    ]:
        (folder / "metrics.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=f"metrics.json: {key}"):
            load_metrics(tmp_path)
