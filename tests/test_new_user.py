"""What a new user bringing their own data hit (issue 22), one test per surprise: each bad input is one
`[lark] error:` line naming the file or key and the way out, never a traceback."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

from lark.errors import DataError
from lark.preflight import PreflightError, preflight

EXAMPLE = ROOT / "docs" / "examples" / "own_data"
TINY = [  # a smaller tiny model and one epoch: the README's commands in seconds
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=20",
    "model.pretrain.batch_size=8",
    "model.pretrain.max_length=64",
    "max_length=96",
    "attribution.projector.k=512",
    "trainer.max_epochs=1",
    "logger=none",
]


def test_a_bin_only_model_folder_is_caught_by_preflight(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = compose(["model=hub", f"model.hub_id={folder}", "trainer=cpu"])
    with pytest.raises(PreflightError, match=r"model.hub_id=.*: no config.json"):
        preflight(cfg)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80 not unpickled")
    with pytest.raises(PreflightError) as caught:
        preflight(cfg)
    line = str(caught.value).splitlines()[0]
    assert "only pickled weights (pytorch_model.bin)" in line and "LARK loads safetensors only" in line
    assert "save_pretrained(d)" in line  # the way out: convert once
    (folder / "model.safetensors").write_bytes(b"")
    preflight(cfg)  # a safetensors file: no problem left (the disk check passes for a tiny model)


def test_an_empty_test_file_is_named_as_such(tmp_path):
    from lark.data.readers import load_data

    empty = tmp_path / "test.jsonl"
    empty.write_text("")
    cfg = compose(["+experiment=own_data", f"data.reader.test_path={empty}"]).data
    with pytest.raises(DataError, match=rf"data.reader.test_path: {empty}: the test set has no rows"):
        load_data(cfg)


@pytest.mark.slow
def test_an_empty_test_file_through_train_py_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "test.jsonl"
    empty.write_text("\n")
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "+experiment=own_data",
            f"data.reader.test_path={empty}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "logger=none",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lark] error:")]
    assert errors == [
        f"[lark] error: data.reader.test_path: {empty}: the test set has no rows: add the questions "
        "to attribute, one JSON object per line"
    ]
    assert errors[0] in (tmp_path / "run" / "train.log").read_text()  # the log holds the console too


def test_a_prompt_cut_by_max_length_is_counted_in_one_warning():
    from lark.models import train_tokenizer
    from lark.notices import warn_cut

    cfg = compose(["+experiment=own_data", "max_length=64"])
    tokenizer = train_tokenizer(["what does the atlas say about the river", "the river runs north"] * 50, 300)
    short = {"id": "a", "question": "Where does the river run?", "context": None, "answer": "North."}
    long = short | {"id": "b", "question": " ".join(["the river runs north"] * 5000)}  # a 20,000-word prompt
    printed = []
    cut = warn_cut(
        cfg, tokenizer, {"fine-tuning items": [short, long, short], "test questions": [short]}, printed.append
    )
    assert cut == {"fine-tuning items": [1, 3]}
    assert printed == [
        "[lark] warning: longer than max_length=64 tokens, so cut (a prompt in the middle of its context, keeping the "
        "question and the generation prompt, at least its last 64 tokens; an answer beyond max_length/2 at its end, "
        "without its end-of-turn token; a document at its end): 1 of 3 fine-tuning items"
    ]
    assert warn_cut(cfg, tokenizer, {"test questions": [short]}, printed.append) == {} and len(printed) == 1


def readme_block(heading):
    """The first ```bash block after `heading` in the README."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash\n", text.index(heading)) + len("```bash\n")
    return text[start : text.index("```\n", start)]


@pytest.mark.slow
def test_the_readmes_three_corpora_of_your_own_run_as_written(tmp_path):
    """The README's commands, run in a folder holding the user's files (the shipped example under new names), with
    a tiny model and one epoch appended: every source is built from the named corpora."""
    import shutil

    for mine, shipped in [("train", "train"), ("test", "test"), ("facts", "atlas"), ("offtopic", "recipes")]:
        shutil.copy(EXAMPLE / f"{shipped}.jsonl", tmp_path / f"my_{mine}.jsonl")
    items = [json.loads(line) for line in (EXAMPLE / "train.jsonl").read_text().splitlines()[:6]]
    dups = [{"id": f"dup-{r['id']}", "text": f"{r['prompt']} {r['response']}"} for r in items]  # near-duplicates
    (tmp_path / "my_neardups.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dups))
    script = readme_block("**Your own corpora and sources, by name**").rstrip()
    script = script.replace("python train.py", f"{sys.executable} {ROOT / 'train.py'}")
    script += f" {' '.join(TINY)} hydra.run.dir={tmp_path / 'run'}\n"
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    written = {p.stem: len(p.read_text().splitlines()) for p in (run / "data" / "sources").glob("*.jsonl")}
    assert set(written) == {"finetune", "facts_bm25", "facts_raw", "offtopic", "neardups"}
    assert written["neardups"] == 6
    metrics = json.loads((run / "attribution" / "epoch_001" / "metrics.json").read_text())
    assert metrics["pt_source"] == "facts_bm25" and set(metrics["format_effect"]) == {"facts"}
    assert {n: s.get("corpus") for n, s in metrics["sources"].items() if s.get("corpus")} == {
        "facts_bm25": "facts",
        "facts_raw": "facts",
        "offtopic": "offtopic",
        "neardups": "neardups",
    }


def test_config_files_errors_name_the_key_and_the_file(tmp_path):
    from lark.config_files import apply_config_files
    from lark.errors import ConfigError

    cfg = compose(["+experiment=own_data", f"data.corpora_file={tmp_path / 'none.yaml'}"])
    with pytest.raises(ConfigError, match=r"data.corpora_file=.*none.yaml: file not found"):
        apply_config_files(cfg)
    bad = tmp_path / "corpora.yaml"
    bad.write_text("facts: a.jsonl\nnews: [unclosed\n")
    cfg = compose(["+experiment=own_data", f"data.corpora_file={bad}"])
    with pytest.raises(ConfigError, match=rf"data.corpora_file: {bad}:\d: not valid YAML/JSON"):
        apply_config_files(cfg)
    bad.write_text('\ufeff{"facts": "a.jsonl", "news": {"hub_id": "org/news", "text_field": "body"}}')  # JSON, BOM
    assert OmegaConf.to_container(apply_config_files(cfg).data.corpora) == {
        "facts": {"path": str(tmp_path / "a.jsonl"), "text_field": "text", "id_field": "id", "limit": None},
        "news": {"hub_id": "org/news", "text_field": "body"},
    }
    sources = tmp_path / "sources.yaml"
    sources.write_text("sources: {finetune: {kind: finetune, formatted: true}}\npt_sorce: x\n")
    cfg = compose(["+experiment=own_data", f"source.file={sources}"])
    with pytest.raises(ConfigError, match=r"source.file: .*unknown keys \['pt_sorce'\]"):
        apply_config_files(cfg)
    sources.write_text("sources: {finetune: {kind: finetune, formatted: true}}\n")
    assert list(apply_config_files(cfg).source.sources) == ["finetune"]  # replaced whole
    assert cfg.source.pt_source == "atlas_retrieved"  # keys the file does not give keep the recipe's values
    sources.write_text("bm25: {k1: 1.2}\n")  # one BM25 key: merged, the others (index_dir, ...) kept
    cfg = compose(["+experiment=own_data", f"source.file={sources}"])
    before = OmegaConf.to_container(cfg.source.bm25)
    assert OmegaConf.to_container(apply_config_files(cfg).source.bm25) == {**before, "k1": 1.2}


def test_a_utf8_bom_is_accepted(tmp_path):
    from lark.data.io import read_jsonl

    path = tmp_path / "windows.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + b'{"id": "a", "prompt": "q?", "response": "r."}\r\n{"id": "b", "prompt": "p", "response": "s"}\r\n'
    )
    assert [(n, r["id"]) for n, r in read_jsonl(path)] == [(1, "a"), (2, "b")]
    path.write_bytes(b'{"id": "a"}\n\xef\xbb\xbf{"id": "b"}\n')  # a BOM inside the file is still an error
    with pytest.raises(DataError, match=r"windows.jsonl:2: invalid JSON"):
        list(read_jsonl(path))


def test_every_answer_scoring_zero_is_a_warning_kept_for_metrics_json(tmp_path):
    from lark import notices
    from lark.analysis.schema import check
    from lark.evaluation import AnswerLoss, ExactMatch

    printed = []
    message = ExactMatch().warning(0.0, 20)
    assert message.startswith("every one of the 20 test answers scores 0 under eval exact_match")
    assert ExactMatch().warning(0.05, 20) is None and AnswerLoss().warning(0.0, 20) is None  # lower is better
    notices.warn(tmp_path, "eval_epoch_001", message, printed.append, epoch=1)
    notices.warn(tmp_path, "eval_epoch_001", message, printed.append, epoch=1)  # a resume replaces, never piles up
    assert printed == [f"[lark] warning: {message}"] * 2
    assert notices.read(tmp_path) == {"eval_epoch_001": {"message": message, "epoch": 1}}
    sources = {"ft": {"mean_max": 0.5}, "pt": {"mean_max": 0.2}}
    metrics = {"epoch": 1, "sources": sources, "ft_source": "ft", "pt_source": "pt", "warnings": notices.read(tmp_path)}
    assert check(metrics, "metrics.json")["warnings"]["eval_epoch_001"]["epoch"] == 1


def test_a_source_short_of_documents_is_a_warning_and_finetune_takes_every_item(tmp_path):
    """The issue's run: `retrieve` 60 of an 80-document corpus gave 46 with no message; 60 fine-tuning items were
    silently cut to the shipped source.size 16."""
    from lark import notices
    from lark.data.sources import build_sources

    cfg = compose(["+experiment=own_data", "source.size=60"])
    train = [
        {"id": f"t{i}", "question": f"What is fact {i}?", "contexts": [], "answer": f"Fact {i}."} for i in range(60)
    ]
    test = [{"id": "q0", "question": "What is fact 3?", "contexts": [], "answer": "Fact 3."}]
    docs = [{"id": f"d{i}", "text": f"Fact {i} is stated here. It is true."} for i in range(80)]
    corpora = {"atlas": docs, "news": docs[:20], "recipes": docs[:5]}
    sets = build_sources(cfg.source, cfg.format, train, test, corpora, seed=0)
    assert len(sets["finetune"]) == 60  # every fine-tuning item: the finetune source sets no size of its own
    printed = []
    notices.report_shortfalls(cfg, sets, len(train), tmp_path, printed.append)
    why = "BM25 candidates: source.bm25_per_query per test question, or the corpus"
    assert printed == [
        f"[lark] warning: source atlas_retrieved holds 10 of the 60 documents asked ({why} ran out)",
        f"[lark] warning: source atlas_raw holds 10 of the 60 documents asked ({why} ran out)",
        "[lark] warning: source news_sampled holds 20 of the 60 documents asked (the corpus ran out)",
    ]  # one test question x 10 candidates; recipes_all (`all`) asks for no number
    assert notices.read(tmp_path)["shortfall_atlas_raw"] == {"message": printed[1][16:], "got": 10, "asked": 60}
    cfg = compose(["+experiment=own_data", "source.size=60", "+source.sources.finetune.size=16"])
    sets["finetune"] = build_sources(cfg.source, cfg.format, train, test, corpora, seed=0)["finetune"]
    printed.clear()
    notices.report_shortfalls(cfg, sets, len(train), None, printed.append)
    assert printed[0] == "[lark] source finetune: 16 of the 60 fine-tuning items (source.sources.finetune.size=16)"


def test_the_wandb_top_k_table_cuts_a_long_prompt_and_document(tmp_path):
    """A 20,000-word prompt once flooded the console with W&B's `Serializing object of type str that is 179989
    bytes` warnings: the top-k table carries at most analysis.report_snippet_chars of a question and a document."""
    from types import SimpleNamespace

    from lark.callbacks import AttributionCallback

    cfg = compose([])
    n = cfg.analysis.report_snippet_chars
    long = "word " * 20_000
    test_items = [{"id": "q1", "question": long, "answer": "yes"}]
    sets = {"medical_noformat": [{"id": "d1", "text": long}]}
    logged = []

    class Table:
        def log_table(self, key, columns, data):
            logged.append((key, columns, data))

    callback = AttributionCallback(cfg, None, test_items, sets, run_dir=tmp_path)
    callback.log_tables(SimpleNamespace(loggers=[Table()]), "epoch_001", {}, [("q1", "medical_noformat", 1, "d1", 0.5)])
    key, columns, data = logged[-1]
    assert key == "influence/epoch_001/top_k" and len(data) == 1
    row = dict(zip(columns, data[0]))
    assert row["question"] == long[:n] and row["text"] == long[:n] and row["score"] == 0.5
