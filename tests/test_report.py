"""report/index.html (lark.analysis.report): the data the page carries is the run's files joined correctly, the page is
self-contained, a sweep gets a comparison page; and in headless Chromium the page's question browser works."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lark.analysis import browser
from lark.analysis.analyze import analyze
from lark.analysis.report import markdown_html

sys.path.insert(0, str(ROOT / "benchmarks"))
from report_scale import synthetic_run  # noqa: E402  (the benchmark's generator: one source of synthetic runs)

needs_chromium = pytest.mark.skipif(browser.find() is None, reason="chromium is not installed (CI installs it)")


def blob(page):
    """The JSON data blob of a report page, parsed as the page's script parses it."""
    text = re.search(r"<script type='application/json' id='lark-data'>(.*?)</script>", page.read_text(), re.S)[1]
    return json.loads(text.replace("<\\/", "</"))


def selftest(page):
    """The results the page's ?selftest writes into <pre id="selftest"> in headless Chromium."""
    dom, _ = browser.dump_dom(page, "selftest")
    found = re.findall(r'<pre id="selftest">(\{.*?\})</pre>', dom)
    assert found, dom[-2000:]
    return json.loads(found[-1].replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))


def assert_not_blank(png):
    """A screenshot with content: many colours, and most pixels not the page background."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    background = max(colours)[1]
    covered = sum(n for n, colour in colours if colour != background) / (image.width * image.height)
    assert len(colours) > 200 and covered > 0.2, (len(colours), covered)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def small_run(tmp_path):
    run = synthetic_run(tmp_path / "run", n_queries=30, n_docs=12, n_epochs=2, top_k=3)
    source = run / "data" / "sources" / "entertainment_noformat.jsonl"  # text that must not end the script element
    rows = lines(source)
    rows[0]["text"] = "lyrics </script><b>not markup</b> & more"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_page_joins_top_influences_with_the_documents_text(small_run):
    page = analyze(small_run)["report"]
    assert page == small_run / "report" / "index.html"
    data = blob(page)
    tests = lines(small_run / "data" / "test.jsonl")
    assert [q["id"] for q in data["queries"]] == [t["id"] for t in tests] and data["epochs"] == [0, 1, 2]
    texts = {s: {r["id"]: r for r in lines(small_run / "data" / "sources" / f"{s}.jsonl")} for s in data["sources"]}
    csv_rows = (small_run / "attribution" / "epoch_001" / "top_influences.csv").read_text().splitlines()[1:]
    for row in csv_rows[:40]:
        query, source, rank, doc, score = row.split(",")
        flat = data["top"]["1"][source][[t["id"] for t in tests].index(query)]
        index, shown = flat[2 * (int(rank) - 1)], flat[2 * (int(rank) - 1) + 1]
        doc_id, text, canary = data["docs"][source][index]
        assert doc_id == doc and shown == pytest.approx(float(score), abs=1e-4)
        example = texts[source][doc]
        assert (example["text"] if "text" in example else example["context"]) in text
        assert canary == int(bool(example.get("canary")))
    predictions = lines(small_run / "attribution" / "epoch_002" / "predictions.jsonl")
    assert data["pred"]["2"] == [[p["predicted"], pytest.approx(p["loss"]), p["correct"]] for p in predictions]
    provenance = json.loads((small_run / "data" / "world" / "provenance.json").read_text())
    assert (
        data["prov"][tests[3]["id"]]
        == provenance[tests[3]["id"]]["pretrain_docs"] + provenance[tests[3]["id"]]["finetune_items"]
    )
    assert data["epoch"] == max(
        range(3),
        key=lambda e: json.loads((small_run / "attribution" / f"epoch_{e:03d}" / "metrics.json").read_text())[
            "accuracy"
        ],
    )


def test_the_page_is_self_contained(small_run):
    text = analyze(small_run)["report"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text) and "<link" not in text
    assert text.count("data:image/png;base64,") == 3 and "<script src" not in text
    assert "TABLE II: Influence score evolution during fine-tuning" in text
    assert "</script><b>" not in text  # escaped inside the JSON blob


def test_table5_and_markdown_tables():
    html = markdown_html("### TABLE V: x\n\n| a | b \\| c |\n|---|---|\n| 1 | <2> |\n\n\\*note")
    assert "<h3>TABLE V: x</h3>" in html and "<th>b | c</th>" in html and "<td>&lt;2&gt;</td>" in html
    assert "<p class='note'>*note</p>" in html


def test_a_sweep_gets_a_comparison_page_with_the_varying_keys(tmp_path):
    root = tmp_path / "sweep"
    for job, overrides in (
        ("0", ["format=chatml", "seed=0", "logger=none"]),
        ("1", ["format=noformat", "seed=0", "logger=none"]),
    ):
        synthetic_run(root / job, n_queries=10, n_docs=8, n_epochs=1, top_k=2, seed=int(job))
        (root / job / ".hydra").mkdir()
        (root / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    page = analyze(root)["report"]
    text = page.read_text()
    header = re.search(r"<table class='sortable'><thead><tr>(.*?)</tr>", text)[1]
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["job", "format", "Epoch"]  # seed, logger do not vary
    assert "<td>noformat</td>" in text and "<td>chatml</td>" in text
    links = re.findall(r"href='([^']+)'>open<", text)
    assert links == ["../0/report/index.html", "../1/report/index.html"]
    assert all((page.parent / link).resolve().is_file() for link in links)


@needs_chromium
def test_the_question_browser_in_chromium(small_run):
    page = analyze(small_run)["report"]
    result = selftest(page)
    tests = lines(small_run / "data" / "test.jsonl")
    assert result["queries"] == len(tests) == 30 and result["cards"] == 25  # the first chunk only: lazy
    assert result["count_text"].startswith("30 of 30 questions")
    assert result["first_doc"]["full_text_shown"] and result["search_by_id"] == {
        "value": tests[0]["id"],
        "cards": 1,
        "first": tests[0]["id"],
    }
    assert result["labels"] == {
        label: sum(t["final_decision"] == label for t in tests)
        for label in dict.fromkeys(t["final_decision"] for t in tests)
    }
    for epoch in range(3):
        predictions = lines(small_run / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl")
        right = sum(p["predicted"] == p["gold"] for p in predictions)
        assert result["correct"][str(epoch)] == [right, len(predictions) - right]
    assert result["across_columns"] == 3
    dom, _ = browser.dump_dom(page, "q=" + tests[4]["question"].split()[3] + "+" + tests[4]["question"].split()[4])
    assert re.search(r'data-id="%s"' % tests[4]["id"], dom)  # the URL's search shows the question


@needs_chromium
def test_free_form_answers_get_an_answer_loss_filter_not_a_label_per_sentence(small_run):
    """data.answers null (free-form answers): no gold-label entries, but answer-loss thirds at the shown checkpoint
    and correct/incorrect from the run's own verdict (predictions.jsonl `correct`)."""
    (small_run / ".hydra").mkdir(exist_ok=True)
    (small_run / ".hydra" / "config.yaml").write_text("data:\n  answers: null\n")
    tests = lines(small_run / "data" / "test.jsonl")
    for n, t in enumerate(tests):
        t["final_decision"] = f"Sentence answer number {n}."
    (small_run / "data" / "test.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tests))
    result = selftest(analyze(small_run)["report"])
    assert result["labels"] == {}
    shown = lines(small_run / "attribution" / "epoch_002" / "predictions.jsonl")  # the first view: the last epoch
    losses = sorted(p["loss"] for p in shown)
    low, high = losses[len(losses) // 3], losses[2 * len(losses) // 3]
    assert (
        result["loss"]
        == {
            "low": sum(p["loss"] < low for p in shown),
            "mid": sum(low <= p["loss"] < high for p in shown),
            "high": sum(p["loss"] >= high for p in shown),
        }
        == {"low": 10, "mid": 10, "high": 10}
    )
    for epoch in range(3):
        predictions = lines(small_run / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl")
        right = sum(bool(p["correct"]) for p in predictions)
        assert result["correct"][str(epoch)] == [right, len(predictions) - right]


@needs_chromium
def test_report_scale_benchmark_smoke():
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "report_scale.py"),
            "--queries",
            "40",
            "--docs",
            "20",
            "--epochs",
            "1",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^self-test passed\s+True$", done.stdout, re.M), done.stdout
    assert re.search(r"^page: script start to first questions shown \(ms\)\s+\d+$", done.stdout, re.M)
