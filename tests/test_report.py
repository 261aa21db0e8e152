"""report/index.html (lark.analysis.report): the data the page carries is the run's files joined correctly, the page is
self-contained, a sweep gets a comparison page; and in headless Chromium the page's question browser works."""

import csv
import html
import json
import math
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lark.analysis import browser
from lark.analysis.analyze import analyze
from lark.analysis.report import markdown_html
from lark.analysis.report_data import LEVELS, SHADES, doc_text, read_config
from lark.errors import CorruptFile, DataError, RunDirError

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
    rows[0]["text"] = "lyrics </script><b>not markup</b> & more <!-- <script> var x = 1;"  # (web text does this)
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
    assert "</script><b>" not in text and "<!-- <script>" not in text  # escaped inside the JSON blob


def test_table5_and_markdown_tables():
    html = markdown_html("### TABLE V: x\n\n| a | b \\| c |\n|---|---|\n| 1 | <2> |\n\n\\*note")
    assert "<h3>TABLE V: x</h3>" in html and "<th>b | c</th>" in html and "<td>&lt;2&gt;</td>" in html
    assert "<p class='note'>*note</p>" in html


def two_job_sweep(root):
    """A synthetic sweep of two one-epoch jobs, 0 (format=chatml) and 1 (format=noformat)."""
    for job, overrides in (
        ("0", ["format=chatml", "seed=0", "logger=none"]),
        ("1", ["format=noformat", "seed=0", "logger=none"]),
    ):
        synthetic_run(root / job, n_queries=10, n_docs=8, n_epochs=1, top_k=2, seed=int(job))
        (root / job / ".hydra").mkdir()
        (root / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return root


def test_a_sweep_gets_a_comparison_page_with_the_varying_keys(tmp_path):
    root = two_job_sweep(tmp_path / "sweep")
    page = analyze(root)["report"]
    text = page.read_text()
    header = re.search(r"<table class='sortable'><thead><tr>(.*?)</tr>", text)[1]
    assert re.findall(r"<th>(.*?)</th>", header)[:3] == ["job", "format", "Epoch"]  # seed, logger do not vary
    assert "<th>Test metric</th>" in header  # the metric that chose each row's epoch (answer loss: no accuracy)
    assert "<td>noformat</td>" in text and "<td>chatml</td>" in text
    heads = re.findall(r"<th>(.*?)</th>", header)
    assert heads[heads.index("PT wins") :][:3] == ["PT wins", "FT wins", "BM25 FT wins"]  # RQ3: LARK vs BM25
    body = re.search(r"<tbody>(.*?)</tbody>", text[text.index("class='sortable'") :])[1]
    for job, row in zip(("0", "1"), re.findall(r"<tr>(.*?)</tr>", body)):
        cells = re.findall(r"<td>(.*?)</td>", row)
        epoch = int(cells[heads.index("Epoch")])
        metrics = json.loads((root / job / "attribution" / f"epoch_{epoch:03d}" / "metrics.json").read_text())
        assert metrics["ft_wins"] is not None and metrics["bm25"]["ft_wins"] is not None
        assert cells[heads.index("FT wins")] == f"{100 * metrics['ft_wins']:.1f}%"
        assert cells[heads.index("BM25 FT wins")] == f"{100 * metrics['bm25']['ft_wins']:.1f}%"
    links = re.findall(r"href='([^']+)'>open<", text)
    assert links == ["../0/report/index.html", "../1/report/index.html"]
    assert all((page.parent / link).resolve().is_file() for link in links)
    for job in ("0", "1"):  # each job's page embeds its own tables, written now at the sweep's epoch rule
        for rule, epoch in (("last", 1), (0, 0)):
            analyze(root, table1_epoch=rule)
            job_page = (root / job / "report" / "index.html").read_text()
            table1 = (root / job / "tables" / "table1.md").read_text()
            assert f"(Epoch {epoch})" in table1 and f"first show epoch {epoch}:" in job_page
            assert f"across data sources (Epoch {epoch})" in job_page


def test_a_sweep_analysed_into_out_dir_writes_nothing_into_its_jobs(tmp_path):
    """out_dir was ignored for a sweep's jobs: their tables, figures and pages went into the input job folders, and
    the sweep page linked there. Now every output lies under out_dir, a job's at its path in the sweep."""
    root, out = two_job_sweep(tmp_path / "sweep"), tmp_path / "out"
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    page = analyze(root, out_dir=out, table1_epoch=0)["report"]
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert page == out / "report" / "index.html"
    links = re.findall(r"href='([^']+)'>open<", page.read_text())
    assert links == ["../0/report/index.html", "../1/report/index.html"]
    for job, link in zip(("0", "1"), links):
        assert (page.parent / link).resolve() == (out / job / "report" / "index.html").resolve()
        assert "(Epoch 0)" in (out / job / "tables" / "table1.md").read_text()
        assert "across data sources (Epoch 0)" in (out / job / "report" / "index.html").read_text()
        assert (out / job / "figures").is_dir()


def outputs(run):
    return sorted(p.relative_to(run) for sub in ("tables", "figures", "report") for p in (run / sub).rglob("*"))


def test_a_torn_top_influences_csv_names_its_file_and_line_and_writes_nothing(small_run):
    """A top_influences.csv cut mid-row crashed the report with a TypeError naming no file, after the tables and
    figures were written; analyze.py now prints one `[lark] error: <file>:<line>: ...` line and exits 2."""
    file = small_run / "attribution" / "epoch_001" / "top_influences.csv"
    rows = file.read_text().splitlines()
    file.write_text("\n".join(rows[:3] + [rows[3][:15]]) + "\n")  # line 4 cut in its source: no rank, doc, score
    with pytest.raises(CorruptFile, match=f"^{re.escape(str(file))}:4: expected the columns query_id, source, rank"):
        analyze(small_run)
    assert outputs(small_run) == []
    done = subprocess.run(
        [sys.executable, "analyze.py", f"run_dir={small_run}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and done.stderr.startswith(f"[lark] error: {file}:4: expected"), done.stderr[-2000:]
    rows[5] = rows[5].replace(",2,", ",two,")
    file.write_text("\n".join(rows) + "\n")
    with pytest.raises(CorruptFile, match=f"^{re.escape(str(file))}:6: .*invalid literal for int"):
        analyze(small_run)


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"test-00000": {"pretrain_docs": ["med-0', "invalid JSON in {file}"),
        ('{"test-00000": 3}', "{file}: 'test-00000'"),
    ],
)
def test_an_unreadable_provenance_json_names_its_file_and_writes_nothing(small_run, text, problem):
    """provenance.json, optional, but there and torn: a JSONDecodeError naming no file (or an AttributeError)."""
    file = small_run / "data" / "world" / "provenance.json"
    file.write_text(text)
    with pytest.raises(CorruptFile, match="^" + re.escape(problem.format(file=file))):
        analyze(small_run)
    assert outputs(small_run) == []
    file.write_text(json.dumps({"test-00000": {"pretrain_docs": ["med-00001"], "finetune_items": None}}))
    assert blob(analyze(small_run)["report"])["prov"] == {"test-00000": ["med-00001"]}


def test_a_torn_tracin_metrics_json_names_its_file(small_run):
    """attribution/tracin_cp/metrics.json was read with a bare json.loads: a JSONDecodeError naming no file."""
    file = small_run / "attribution" / "tracin_cp" / "metrics.json"
    file.parent.mkdir()
    file.write_text('{"kernel": "tracin_cp", "epochs": [0, 1, ')
    with pytest.raises(CorruptFile, match=f"^invalid JSON in {re.escape(str(file))}"):
        analyze(small_run, report=False)
    metrics = json.loads((small_run / "attribution" / "epoch_001" / "metrics.json").read_text())
    file.write_text(json.dumps({**metrics, "epoch": "all", "epochs": [0, 1], "lr": [None, 1e-4], "ft": "0.3"}))
    with pytest.raises(CorruptFile, match=f"^{re.escape(str(file))}: ft must be"):
        analyze(small_run, report=False)
    file.write_text(json.dumps({**metrics, "epoch": "all", "epochs": [0, 1], "lr": [None, 1e-4]}))
    assert analyze(small_run, report=False)["tables"]["tracin_cp"][0]["epochs"] == "0, 1"


@needs_chromium
def test_the_sweep_table_sorts_numbers_as_numbers_and_dashes_last(tmp_path):
    """Clicking a column of the sweep table sorts it, ascending then descending; a job without that number ("-")
    comes last both ways, not in the middle (it compared as text with the numbers)."""
    root = tmp_path / "sweep"
    for job, accuracy in (("0", 0.5), ("1", None), ("2", 0.3)):
        synthetic_run(root / job, n_queries=10, n_docs=8, n_epochs=1, top_k=2, seed=int(job))
        (root / job / ".hydra").mkdir()
        (root / job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))
        for path in (root / job / "attribution").glob("epoch_*/metrics.json"):
            metrics = json.loads(path.read_text())
            path.write_text(json.dumps({**metrics, "accuracy": accuracy}))
    result = selftest(analyze(root)["report"])
    assert result["sorted"]["Acc."] == [["30.0%", "50.0%", "-"], ["50.0%", "30.0%", "-"]], result
    assert result["sorted"]["seed"] == [["0", "1", "2"], ["2", "1", "0"]], result


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
    assert result["verdict_filter"] is True and result["prediction_badges"] == result["cards"]
    assert result["across_columns"] == 3 and result["across_headers"] == ["epoch 0", "epoch 1", "epoch 2"]
    first = result["search_by_id"]["first"]  # the first card's answer at each checkpoint, in its cross-epoch view
    shown = []
    for epoch in range(3):
        p = next(
            p for p in lines(small_run / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl") if p["id"] == first
        )
        mark = "\u2713" if p["correct"] else "\u2717"
        shown.append(f"{p['predicted']} {mark} loss {p['loss']:.3f}")
    assert result["across_answers"] == shown
    dom, _ = browser.dump_dom(page, "q=" + tests[4]["question"].split()[3] + "+" + tests[4]["question"].split()[4])
    assert re.search(r'data-id="%s"' % tests[4]["id"], dom)  # the URL's search shows the question
    dom, _ = browser.dump_dom(page, "questions#" + tests[7]["id"])  # a link to one question: its card alone
    assert re.findall(r'<article class="q"[^>]*data-id="([^"]+)"', dom) == [tests[7]["id"]]


@needs_chromium
def test_a_run_without_predictions_shows_no_verdicts(small_run):
    """eval=loss predicts nothing (predictions.jsonl: predicted and correct null): every card showed a red
    "predicted: null \u2717" badge, and the correct / incorrect filter showed 0 of 30 either way."""
    for epoch in range(3):
        path = small_run / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl"
        rows = [{**p, "predicted": None, "correct": None} for p in lines(path)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = analyze(small_run)["report"]
    result = selftest(page)
    assert result["verdict_filter"] is False and result["prediction_badges"] == 0 and result["correct"] == {}
    assert result["cards"] == 25 and result["count_text"].startswith("30 of 30 questions")
    dom, _ = browser.dump_dom(page, "correct=correct")  # a link made before: the filter is not applied
    assert "predicted: null" not in dom and 'id="f-correct"' not in dom and dom.count('class="q"') >= 25


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

    def lowest(epoch):  # the ids of a checkpoint's lowest-loss third
        rows = lines(small_run / "attribution" / f"epoch_{epoch:03d}" / "predictions.jsonl")
        cut = sorted(p["loss"] for p in rows)[len(rows) // 3]
        return sorted(str(p["id"]) for p in rows if p["loss"] < cut)

    assert sorted(result["loss_low_ids"]) == lowest(2) != lowest(0)  # the shown checkpoint's, and that matters
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


# -------------------------------------------------------------------------------------------- token-wise attribution


def made_up_contributions(n, score, seed):
    """n deterministic contributions of both signs that sum to `score` (a stand-in for the kernel's split)."""
    wiggle = [math.sin(1.7 * t + seed) for t in range(n)]
    mean = sum(wiggle) / n
    return [score / n + 2 * abs(score) / n * (w - mean) for w in wiggle]


def tokenised(tokenizer, text, loss_from, score, seed):
    """{text, tokens: [[piece, start, end, contribution or None]]} with the tokens starting before `loss_from`
    carrying no loss (None) and the others made-up contributions that sum to `score`."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    loss = [n for n, (start, _) in enumerate(offsets) if start >= loss_from]
    values = dict(zip(loss, made_up_contributions(len(loss), score, seed)))
    return {"text": text, "tokens": [[text[s:e], s, e, values.get(n)] for n, (s, e) in enumerate(offsets)]}


def write_token_files(run, extra=True):
    """attribution/epoch_NNN/tokens/<source>.jsonl in the layout the `tokens` branch writes, for every pair of each
    top_influences.csv: the run's real document and question texts tokenised by its own tokenizer (the fast
    tokenizer's offsets), made-up contributions that sum to the pair's score, no loss on a question's words before
    its answer nor on a Formatted document's words before its last line. `extra`: one more line per file, for a
    pair the page does not list (the page must leave it out). Returns {(epoch, source, query, doc): line}."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoints" / "epoch_000")
    tests = {t["id"]: t for t in lines(run / "data" / "test.jsonl")}
    sources = read_config(run)["source"]["sources"]
    written = {}
    for folder in sorted((run / "attribution").glob("epoch_*")):
        epoch, by_source = int(folder.name[6:]), {}
        with open(folder / "top_influences.csv", newline="") as f:
            for row in csv.DictReader(f):
                by_source.setdefault(row["source"], []).append(row)
        for source, ranked in by_source.items():
            docs = {d["id"]: doc_text(d) for d in lines(run / "data" / "sources" / f"{source}.jsonl")}
            if extra:  # a document outside the query's top list
                listed = {r["doc_id"] for r in ranked if r["query_id"] == ranked[0]["query_id"]}
                other = next(d for d in docs if d not in listed)
                ranked = [*ranked, dict(ranked[0], doc_id=other, rank="99")]
            out = []
            for row in ranked:
                test, score = tests[row["query_id"]], float(row["score"])
                query = f"{test['question']}\nAnswer: {test.get('answer', test.get('final_decision'))}"
                text, seed = docs[row["doc_id"]], zlib.crc32(f"{epoch}{row['query_id']}{row['doc_id']}".encode())
                line = {"query_id": row["query_id"], "doc_id": row["doc_id"], "rank": int(row["rank"]), "score": score}
                line |= {"kernel": "rapidin"}
                loss_from = text.rfind("\n") + 1 if sources[source]["formatted"] else 0
                line["doc"] = tokenised(tokenizer, text, loss_from, score, seed)
                line["query"] = tokenised(tokenizer, query, query.rindex("Answer:") + 7, score, seed + 1)
                written[epoch, source, row["query_id"], row["doc_id"]] = line
                out.append(json.dumps(line))
            (folder / "tokens").mkdir(exist_ok=True)
            (folder / "tokens" / f"{source}.jsonl").write_text("\n".join(out) + "\n")
    return written


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A real finished run (the small embedded run, one epoch: checkpoints 0 and 1) and a copy of it with token files
    (write_token_files): (plain run, run with tokens, {(epoch, source, query, doc): line written})."""
    from conftest import SMALL, compose
    from omegaconf import OmegaConf, open_dict

    from lark.experiment import train

    plain = tmp_path_factory.mktemp("plain_run")
    cfg = compose(
        [o for o in SMALL if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1", "logger=none"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(plain)
    (plain / ".hydra").mkdir()
    (plain / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)
    tokens = tmp_path_factory.mktemp("token_run") / "run"
    shutil.copytree(plain, tokens)
    return plain, tokens, write_token_files(tokens)


def decoded(data, entry):
    """[(piece, level or None)], top [(index, c)] of one side of a blob's pair entry (text index, shades, top)."""
    text, offsets = data["tokens"]["texts"][entry[0]]
    pieces, at = [], 0
    for gap, length in zip(offsets[::2], offsets[1::2]):
        pieces.append(text[at + gap : at + gap + length])
        at += gap + length
    shades = re.sub(r"\.(\d+)", lambda run: "." * int(run[1]), entry[1])
    levels = [None if s == "." else SHADES.index(s) - LEVELS for s in shades]
    return list(zip(pieces, levels)), list(zip(entry[2][::2], entry[2][1::2]))


def expected(side):
    """What the page should carry of one side of a file's line: [(piece, level or None)], top [(index, c)]."""
    values = [c for *_, c in side["tokens"]]
    peak = max(abs(c) for c in values if c is not None)
    levels = [None if c is None else c and (round(LEVELS * c / peak) or (1 if c > 0 else -1)) for c in values]
    top = sorted((n for n, c in enumerate(values) if c is not None), key=lambda n: -abs(values[n]))[:10]
    return [(p, level) for (p, *_), level in zip(side["tokens"], levels)], [(n, float(f"{values[n]:.4g}")) for n in top]


@pytest.mark.slow
def test_the_page_data_carries_the_token_files_of_the_listed_pairs(real_runs):
    plain, run, written = real_runs
    assert "tokens" not in blob(analyze(plain)["report"])  # no tokens/ folder: the page of before
    data = blob(analyze(run)["report"])
    ids = {s: [d[0] for d in docs] for s, docs in data["docs"].items()}
    queries = [q["id"] for q in data["queries"]]
    carried = 0
    for (epoch, source, query, doc), line in written.items():
        entry = data["tokens"]["pairs"][str(epoch)][source][str(queries.index(query))].get(str(ids[source].index(doc)))
        if line["rank"] == 99:  # the pair the page does not list
            assert entry is None
            continue
        assert decoded(data, entry[:3]) == expected(line["doc"]) and decoded(data, entry[3:]) == expected(line["query"])
        assert sum(c for *_, c in line["doc"]["tokens"] if c is not None) == pytest.approx(line["score"], abs=1e-9)
        carried += 1
    assert carried == 2 * 12 * 5 * 5 and data["tokens"]["kernel"] == {"0": "rapidin", "1": "rapidin"}
    assert data["tokens"]["split"] == {"0": "loss", "1": "loss"}  # lines without "split" (written before it): loss


@pytest.mark.slow
def test_the_page_carries_the_token_files_attribute_py_writes(real_runs, tmp_path):
    """The page tests above read made-up contributions; these are the files the token pass itself writes (real
    pieces, offsets and contributions, the run's own kernel), added to the finished run by attribute.py."""
    from lark.experiment import attribute

    run = tmp_path / "run"
    shutil.copytree(real_runs[0], run)
    attribute(run, {"tokens": "topk", "tokens_top_k": 1}, log=lambda *a: None)
    data = blob(analyze(run)["report"])
    ids = {s: [d[0] for d in docs] for s, docs in data["docs"].items()}
    queries = [q["id"] for q in data["queries"]]
    carried = 0
    for folder in sorted((run / "attribution").glob("epoch_*")):
        epoch = int(folder.name[6:])
        for path in sorted((folder / "tokens").glob("*.jsonl")):
            for line in lines(path):
                pairs = data["tokens"]["pairs"][str(epoch)][path.stem][str(queries.index(line["query_id"]))]
                entry = pairs[str(ids[path.stem].index(line["doc_id"]))]
                assert decoded(data, entry[:3]) == expected(line["doc"]), (path, line["doc_id"])
                assert decoded(data, entry[3:]) == expected(line["query"]), (path, line["query_id"])
                carried += 1
    assert carried == 2 * len(queries) * len(ids)  # 2 checkpoints x each query's top document of every source
    assert data["tokens"]["kernel"] == {"0": "cosine", "1": "cosine"}


@pytest.mark.slow
@needs_chromium
def test_a_position_split_shows_every_token_and_says_what_it_is(real_runs, tmp_path):
    """attribution.tokens_split=position on checkpoint 1 beside the loss split on checkpoint 0: the page carries
    each epoch's split and the files' numbers, every token of a position-split text shaded (none grey), and the
    opened views' legend and headings say which split they show (a position-split text read with the loss
    split's legend would call the prompt's shades loss)."""
    from lark.experiment import attribute

    run = tmp_path / "run"
    shutil.copytree(real_runs[0], run)
    quiet = lambda *a: None  # noqa: E731
    attribute(run, {"tokens": "topk", "tokens_top_k": 1, "checkpoints": [0]}, log=quiet)
    attribute(run, {"tokens": "topk", "tokens_top_k": 1, "tokens_split": "position", "checkpoints": [1]}, log=quiet)
    page = analyze(run)["report"]
    data = blob(page)
    assert data["tokens"]["split"] == {"0": "loss", "1": "position"}
    ids = {s: [d[0] for d in docs] for s, docs in data["docs"].items()}
    queries = [q["id"] for q in data["queries"]]
    for path in sorted((run / "attribution" / "epoch_001" / "tokens").glob("*.jsonl")):
        for line in lines(path):
            assert line["split"] == "position"
            entry = data["tokens"]["pairs"]["1"][path.stem][str(queries.index(line["query_id"]))]
            entry = entry[str(ids[path.stem].index(line["doc_id"]))]
            assert decoded(data, entry[:3]) == expected(line["doc"]) and decoded(data, entry[3:]) == expected(
                line["query"]
            )
            assert all(c is not None for side in ("doc", "query") for *_, c in line[side]["tokens"])
            assert "." not in entry[1] + entry[4]  # no grey token
    views = selftest(page)["tokens"]
    assert views["first"]["epoch"] == 1 and views["across"]["epoch"] == 0
    assert "split by position" in views["first"]["legend"] and "grey: a token without loss" in views["across"]["legend"]
    assert "its positions" in views["first"]["headings"][1] and "its loss tokens" in views["across"]["headings"][1]


@pytest.mark.slow
def test_the_factored_position_split_reads_the_store_pass_pieces(real_runs, tmp_path, monkeypatch):
    """attribute.py with attribution/projector=factored and tokens_split=position: the token pass reads every pair's
    parts from the pieces the store pass kept (lark.kernel.tokens_kept: no second pass runs), or, added to a finished
    run's stores (tokens off first, then topk: the stores are not rebuilt), from pieces kept batch by batch (no second
    pass either); both equal the second pass's (tokens_kept=0: every example through it) within float32 rounding,
    their sums the scores."""
    from omegaconf import OmegaConf

    from lark.experiment import attribute
    from lark.kernel import tokens, tokens_kept

    factored = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "attribution" / "projector" / "factored.yaml"))
    calls, later = [], []
    second, keep_batch = tokens.position_products, tokens_kept.keep_batch
    monkeypatch.setattr(tokens, "position_products", lambda *a, **k: calls.append(1) or second(*a, **k))
    monkeypatch.setattr(tokens_kept, "keep_batch", lambda *a, **k: later.append(1) or keep_batch(*a, **k))
    written, quiet = {}, lambda *a: None
    for how, kept in (("store", 2**28), ("late", 2**28), ("second", 0)):
        run, calls[:], later[:] = tmp_path / how, [], []
        shutil.copytree(real_runs[0], run)
        options = {"tokens": "topk", "tokens_top_k": 2, "tokens_split": "position", "tokens_kept": kept}
        options.update(checkpoints=[1], projector={**factored, "k": 4096})
        store = run / "attribution" / "epoch_001" / "stores" / "test_queries.safetensors"
        if how == "late":
            attribute(run, {**options, "tokens": "off"}, log=quiet)
            built = store.stat().st_mtime_ns
        attribute(run, options, log=quiet)
        assert how != "late" or store.stat().st_mtime_ns == built  # (the finished run's stores, read)
        files = sorted((run / "attribution" / "epoch_001" / "tokens").glob("*.jsonl"))
        written[how] = {(p.name, i): line for p in files for i, line in enumerate(lines(p))}
        assert files and (len(calls) == 0) == (kept > 0), (how, len(calls))
        assert (len(later) > 0) == (how == "late"), (how, len(later))  # the store pass kept every pair's example
    assert written["second"].keys() == written["store"].keys() == written["late"].keys()
    assert len(written["second"]) == 2 * 12 * len(files)
    for how in ("store", "late"):
        for key, line in written[how].items():
            for side in ("doc", "query"):
                mine, theirs = ([c for *_, c in w[side]["tokens"]] for w in (line, written["second"][key]))
                assert mine == pytest.approx(theirs, abs=1e-6), (how, key, side)
                assert sum(mine) == pytest.approx(line["score"], abs=1e-3), (how, key, side)


def test_a_token_that_is_not_its_text_slice_names_the_file_and_line(small_run):
    folder = small_run / "attribution" / "epoch_001"
    with open(folder / "top_influences.csv", newline="") as f:
        row = next(csv.DictReader(f))
    side = {"text": "abc def", "tokens": [["abc", 0, 3, 0.5], [" dx", 3, 7, None]]}
    line = {"query_id": row["query_id"], "doc_id": row["doc_id"], "rank": 1, "score": 0.5, "kernel": "rapidin"}
    (folder / "tokens").mkdir()
    (folder / "tokens" / f"{row['source']}.jsonl").write_text("\n" + json.dumps(line | {"doc": side, "query": side}))
    with pytest.raises(DataError, match=rf"epoch_001/tokens/{row['source']}.jsonl:2: doc: token 1 ' dx' is not"):
        analyze(small_run)


def page_pieces(entry_texts):
    """Each page text's tokens as report.js's tokenSpans slices them (String.slice: UTF-16 code units), run in
    Node on the function itself; in Python (the same arithmetic on the UTF-16 encoding) where Node is missing."""
    js = (ROOT / "lark" / "resources" / "report.js").read_text()
    spans = re.search(r"\n  const spansCache = new Map\(\);\n  function tokenSpans\(t\) \{.*?\n  \}\n", js, re.S)
    if shutil.which("node") and spans:
        script = f"const T = {{texts: {json.dumps(entry_texts)}}};{spans[0]}console.log(JSON.stringify("
        script += "T.texts.map(([text], t) => tokenSpans(t).map(([s, e]) => text.slice(s, e)))));"
        return json.loads(subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout)
    out = []
    for text, offsets in entry_texts:
        units, at, pieces = text.encode("utf-16-le"), 0, []
        for gap, length in zip(offsets[::2], offsets[1::2]):
            pieces.append(units[2 * (at + gap) : 2 * (at + gap + length)].decode("utf-16-le"))
            at += gap + length
        out.append(pieces)
    return out


def test_the_page_slices_each_token_after_an_emoji_to_its_piece():
    """The files' offsets are Python code points, the page slices JavaScript strings (UTF-16 units): after a
    character outside the Basic Multilingual Plane (an emoji, two units) every boundary moved one unit left, unless
    the page's offsets are UTF-16 units (read_tokens)."""
    from lark.analysis.report_data import token_entry

    text = "Gene \U0001f9ec drives \U0001f600\U0001f600 BRCA1 caf\u00e9 \u65e5\u672c expression"
    tokens = [[m[0], m.start(), m.end(), 0.1 * n] for n, m in enumerate(re.finditer(r"\s*\S+", text))]
    texts = {}
    index, shades, top = token_entry({"text": text, "tokens": tokens}, texts, "here")
    assert index == 0 and len(shades) == len(tokens) and len(top) == 2 * min(10, len(tokens))
    assert page_pieces([[t, list(offsets)] for t, offsets in texts]) == [[piece for piece, *_ in tokens]]


def test_a_character_split_over_byte_tokens_is_one_page_token_with_their_contributions_added():
    """Byte-level BPE splits an emoji or an accent over tokens: the files give the ones before the last an empty
    piece and their own contribution (the page showed them shaded but zero-width, their tops as ''), a fast
    tokenizer's offsets the same span twice; the page shows the character once, its tokens' contributions added
    (a text's sum unchanged), a token without loss among them not hiding the others'."""
    from lark.analysis.report_data import token_entry

    text = "Gene \U0001f9ec caf\u00e9 ok"
    tokens = [["Gene", 0, 4, 0.1], [" ", 4, 5, None], ["", 5, 5, 0.2], ["", 5, 5, None], ["\U0001f9ec", 5, 6, 0.3]]
    tokens += [[" caf", 6, 10, 0.1], ["\u00e9", 10, 11, -0.4], ["\u00e9", 11 - 1, 11, 0.1], [" ok", 11, 14, 0.05]]
    texts = {}
    _, shades, top = token_entry({"text": text, "tokens": tokens}, texts, "here")
    assert page_pieces([[t, list(offsets)] for t, offsets in texts]) == [
        ["Gene", " ", "\U0001f9ec", " caf", "\u00e9", " ok"]
    ]
    assert len(shades) == 6 and shades[1] == "."
    assert dict(zip(top[::2], top[1::2])) == {2: 0.5, 4: -0.3, 0: 0.1, 3: 0.1, 5: 0.05}
    assert sum(top[1::2]) == pytest.approx(sum(c for *_, c in tokens if c is not None))


def token_spans(dom):
    """[(class, white text, data-n, data-l or None, (r, g, b, alpha) or None, text)] of the shaded tokens in a DOM
    dump, in order."""
    found = re.findall(
        r'<span class="tk (\w+)( dark)?( nl)?" data-n="(\d+)"(?: data-l="(-?\d+)")?'
        r'(?: style="background-color: rgba?\(([^)]*)\);")?>(.*?)</span>',
        dom,
        re.S,
    )
    colour = lambda text: tuple(float(x) for x in (text + ", 1").split(",")[:4]) if text else None  # noqa: E731
    return [
        (c, bool(dark), int(n), int(level) if level else None, colour(rgba), html.unescape(t))
        for c, dark, nl, n, level, rgba, t in found
        if nl == (" nl" if level and "\n" in html.unescape(t) and not html.unescape(t).strip() else "")  # shaded breaks
    ]


@pytest.mark.slow
@needs_chromium
def test_the_token_views_in_chromium_show_the_files_numbers(real_runs, tmp_path):
    plain, run, written = real_runs
    before = selftest(analyze(plain)["report"])
    assert "tokens" not in before and before["cards"] == 12  # a run without tokens/ renders as before
    plain_dom = browser.dump_dom(plain / "report" / "index.html", "tokens")[0]
    assert not re.search(r'class="(tok-btn|tokens|tok-box)"', plain_dom) and plain_dom.count('<article class="q"') == 12
    page = analyze(run)["report"]
    result = selftest(page)
    assert result["tokens"]["buttons"] == 12 * 5 * 5
    for view in (result["tokens"]["first"], result["tokens"]["across"]):
        line = written[view["epoch"], view["source"], view["query"], view["doc"]]
        assert view["legend"] and view["texts"] == [line["doc"]["text"], line["query"]["text"]]
        for shown, side in zip(view["top"], (line["doc"], line["query"])):
            _, top = expected(side)
            assert [(piece, c) for piece, c, _ in shown] == [(side["tokens"][n][0], c) for n, c in top]
            assert all(text.startswith("+" if c > 0 else "-") for _, c, text in shown)
    assert result["tokens"]["across"]["epoch"] == 0  # the cross-epoch view's first column
    # every shaded token of one question's opened views: its level, class and colour follow the file's number
    query, epoch = result["tokens"]["first"]["query"], result["tokens"]["first"]["epoch"]
    dom, _ = browser.dump_dom(page, f"q={query}&epoch={epoch}&tokens")
    views = re.findall(r'<div class="tokens" data-epoch="(\d+)" data-source="(\w+)" data-query="([\w-]+)" '
                       r'data-doc="([\w-]+)"[^>]*>(.*?)</ol></div>', dom, re.S)  # fmt: skip
    assert len(views) == 1
    colours = {"pos": (42, 91, 215), "neg": (214, 84, 31)}  # report.js COLOURS
    line = written[int(views[0][0]), views[0][1], views[0][2], views[0][3]]
    spans = token_spans(views[0][4])
    tokens = line["doc"]["tokens"] + line["query"]["tokens"]
    assert len(spans) == len(tokens) and sum(c is None for *_, c in tokens) > 0
    want = expected(line["doc"])[0] + expected(line["query"])[0]
    for (cls, dark, _, level, rgba, text), (piece, *_, c), (_, want_level) in zip(spans, tokens, want):
        assert text == piece and level == want_level and dark == (c is not None and abs(level) > 0.55 * LEVELS)
        if c is None:
            assert cls == "none" and rgba is None
        else:
            assert cls == ("pos" if c > 0 else "neg") and rgba == (*colours[cls], round(abs(level) / LEVELS, 2))
    browser.screenshot(page, tmp_path / "tokens.png", f"questions&q={query}&epoch={epoch}&tokens")
    assert_not_blank(tmp_path / "tokens.png")


def test_the_config_summary_names_the_projector_and_kernel(tmp_path):
    """Today's configs name the projector and kernel by `_target_` (a config from before those groups by `kind`);
    the kernel row is its class path, not the config mapping printed raw."""
    from lark.analysis.report import config_summary

    (tmp_path / ".hydra").mkdir()
    attribution = {"projector": {"_target_": "lark.kernel.sketch.HookSketch", "k": 4096}}
    attribution["kernel"] = {"_target_": "lark.kernel.kernels.Cosine"}
    scheduler = {"name": "paper", "lr": 2e-4}  # the schedule's name: a label no code reads, shown here
    (tmp_path / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"attribution": attribution, "scheduler": scheduler})
    )
    rows = dict(config_summary(tmp_path))
    assert rows["schedule"] == "paper" and rows["peak lr"] == 2e-4
    assert rows["projector"] == "lark.kernel.sketch.HookSketch" and rows["kernel"] == "lark.kernel.kernels.Cosine"
    assert rows["k"] == 4096
    legacy = {"attribution": {"projector": {"kind": "rapidin"}}}
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(legacy))
    assert dict(config_summary(tmp_path))["projector"] == "rapidin"


def test_an_exact_match_run_is_not_labelled_accuracy(tmp_path):
    """metrics.json's `accuracy` holds exact match under eval=exact_match; the sweep table's "Acc." column and the
    question browser's "accuracy" showed it as accuracy."""
    from lark.analysis.report import metric_cell

    m = {"epoch": 2, "accuracy": 0.31, "eval": {"metric": "exact_match", "value": 0.31, "higher_is_better": True}}
    assert metric_cell(m, "accuracy", "%") == "-" and metric_cell(m, "eval", ".4g") == "0.31 (exact_match)"
    m["eval"]["metric"] = "accuracy"
    assert metric_cell(m, "accuracy", "%") == "31.0%"
    run = tmp_path / "run"
    synthetic_run(run, n_queries=6, n_docs=5, n_epochs=1, top_k=2, seed=0)
    for file in run.glob("attribution/epoch_*/metrics.json"):
        metrics = json.loads(file.read_text())
        metrics["eval"] = {"metric": "exact_match", "value": metrics.get("accuracy"), "higher_is_better": True}
        file.write_text(json.dumps(metrics))
    assert blob(analyze(run)["report"])["accuracy_metric"] == "exact_match"


@pytest.mark.parametrize("name", [".hydra/overrides.yaml", ".hydra/config.yaml"])
def test_a_torn_yaml_file_of_the_run_names_its_file_and_line(small_run, name):
    """The run's .hydra files were read with a bare yaml.safe_load: a torn one gave PyYAML's traceback (a
    ScannerError naming no LARK file) after the tables were written."""
    file = small_run / name
    file.parent.mkdir(exist_ok=True)
    file.write_text('- format=noformat\n- "data.n_test=3\n')  # cut inside a quoted string: line 3 ends the file
    with pytest.raises(RunDirError, match=f"^{re.escape(str(file))}:3: not valid YAML"):
        analyze(small_run)
    done = subprocess.run(
        [sys.executable, "analyze.py", f"run_dir={small_run}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and done.stderr.startswith(f"[lark] error: {file}:3: not valid YAML"), done.stderr
    file.write_text("format: noformat\n" if name.endswith("overrides.yaml") else "- format=noformat\n")  # not its shape
    with pytest.raises(RunDirError, match=f"^{re.escape(str(file))}: must hold a"):
        analyze(small_run)


def test_a_data_file_changed_after_training_is_not_shown_as_the_runs(small_run):
    """analyze.py read data/'s text unverified (attribute.py and validate.py check data/checksums.json): a test
    question edited after training was shown as the one the scores were computed for."""
    from lark.data.io import write_manifest
    from lark.rundir import DATA_FILES

    write_manifest(small_run / "data", DATA_FILES)  # as lark.experiment.train writes it
    file = small_run / "data" / "test.jsonl"
    file.write_text(file.read_text().replace('"question": "', '"question": "Edited: ', 1))
    with pytest.raises(CorruptFile, match=f"{re.escape(str(file))}.*restore the file"):
        analyze(small_run)
    assert outputs(small_run) == []


def test_a_prediction_with_a_list_for_its_id_names_its_file_and_line(small_run):
    """predictions.jsonl with an id that is not a string crashed the report with `unhashable type: 'list'`."""
    file = small_run / "attribution" / "epoch_001" / "predictions.jsonl"
    rows = file.read_text().splitlines()
    rows[1] = json.dumps({**json.loads(rows[1]), "id": ["test-00001"]})
    file.write_text("\n".join(rows) + "\n")
    with pytest.raises(CorruptFile, match=f"^{re.escape(str(file))}:2: expected a string id and a numeric loss"):
        analyze(small_run)
    assert outputs(small_run) == []


@needs_chromium
def test_a_card_says_whose_answer_its_documents_explain_and_keeps_the_answer_line_in_view(small_run):
    """A wrong card showed `predicted: yes` above documents ranked for the gold `maybe`, and nothing on the card said
    so; QA documents longer than the snippet hid their answer line (the part that carries the loss) behind "full
    text"; the yellow marks (shared words) had no legend."""
    metrics = small_run / "attribution" / "epoch_002" / "metrics.json"
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "lr": 2e-5}))  # epoch 2 at the lower lr
    page = analyze(small_run)["report"]
    dom, _ = browser.dump_dom(page, "epoch=1&questions")
    assert re.findall(r"<option [^>]*>checkpoint (epoch \d\*?)", dom) == ["epoch 0", "epoch 1", "epoch 2*"]
    cards = re.findall(r'<article class="q"[^>]*>(.*?)</article>', dom, re.S)
    assert len(cards) == 25
    for body in cards:
        wrong = 'class="badge bad"' in body
        assert ("documents ranked for the gold answer" in body) == wrong
    assert sum('class="badge bad"' in body for body in cards) > 0
    assert re.search(r'<p class="note" id="reading">score: the cosine .*gold answer.*yellow: words the document', dom)
    formatted = {d["id"]: d for d in lines(small_run / "data" / "sources" / "medical_format.jsonl")}
    shown = 0
    for section in re.findall(r'<section class="src" data-source="medical_format">(.*?)</section>', dom, re.S):
        for doc_id, text in re.findall(r'<li data-doc="(med-\d+)">.*?<div class="text">(.*?)</div>', section, re.S):
            plain = html.unescape(re.sub(r"</?mark>", "", text))  # question, context, "Answer: <label>", cut
            assert plain.endswith(f"\u2026 Answer: {formatted[doc_id]['answer']}"), plain[-80:]
            shown += 1
    assert shown > 0
    # attribute.py re-attributed epoch 2 with attribution.query_target=predicted: its metrics.json says so, the
    # run's config still says gold; the page follows each checkpoint's own
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "loss_target": {"query_target": "predicted"}}))
    page = analyze(small_run)["report"]
    for epoch, whose in ((1, "gold answer"), (2, "predicted answer")):
        dom, _ = browser.dump_dom(page, f"epoch={epoch}&questions")
        assert f"that of the question's {whose} (the run's kernel)" in dom
        badges = set(re.findall(r'class="badge target"[^>]*>documents ranked for the ([a-z ]+)<', dom))
        assert badges == {whose}, badges


def test_the_summary_reads_the_runs_resolved_config_without_a_checkpoint(small_run):
    """A run with attribution.save_checkpoints=false has no checkpoints/epoch_000/lark_config.yaml: the page's
    config summary fell back to .hydra/config.yaml and showed its interpolations ("${optimizer.lr}") as values."""
    (small_run / ".hydra").mkdir()
    (small_run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"scheduler": {"lr": "${optimizer.lr}"}}))
    (small_run / "lark_config.yaml").write_text(yaml.safe_dump({"scheduler": {"lr": 0.0002, "name": "paper"}}))
    page = analyze(small_run)["report"].read_text()
    assert "${" not in page and re.search(r"peak lr</t[hd]>\s*<td>0\.0002</td>", page), page[:3000]
