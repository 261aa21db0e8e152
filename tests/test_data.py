"""lark.data.readers: QA rows mapped by the data configs (PubMedQA local and hub as instances), the corpora, input
validation, sampling."""

import functools
import json
import os
import re
import string
import tempfile
from collections import Counter
from itertools import count
from pathlib import Path

import pytest
from conftest import compose, data_spec, load_pubmedqa_hub, load_pubmedqa_local, official_test_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lark.data import io as IO
from lark.data import readers as D
from lark.data.corpora import HubCorpus, JsonlCorpus, check_corpora, corpus_reader
from lark.data.readers import DataError
from lark.data.world import GeneratedWorld, generate_world
from lark.errors import ConfigError

ROOT = Path(__file__).parents[1]
SHARED = ROOT / "../shared"
DATA = SHARED / "data"
PQA = DATA / "pubmedqa" / "pqa_labeled.jsonl"
ABSTRACTS = DATA / "pubmed_corpus" / "abstracts.jsonl"
ENTERTAINMENT = DATA / "entertainment" / "documents.jsonl"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data folder {DATA.resolve()} is absent (see ../shared/data/SOURCES.md)"
)
LABEL_COUNTS = {"yes": 276, "no": 169, "maybe": 55}
LABELS = ("yes", "no", "maybe")


def record(pubid=1, **over):
    r = {
        "pubid": str(pubid),
        "question": f"Does drug {pubid} work?",
        "contexts": ["Background text.", "Results text."],
        "labels": ["BACKGROUND", "RESULTS"],
        "long_answer": "It works.",
        "final_decision": "yes",
        "split": "train",
    }
    r.update(over)
    return r


def write_lines(path, lines):
    """Write raw lines (str are JSON-dumped when they are not already str lines)."""
    path.write_bytes(
        b"".join(
            (x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
            for x in lines
        )
    )
    return path


def hub_row(r):
    """A local-schema record in the Hugging Face pqa_labeled schema."""
    return {
        "pubid": int(r["pubid"]),
        "question": r["question"],
        "context": {"contexts": r["contexts"], "labels": r["labels"], "meshes": r.get("meshes", [])},
        "long_answer": r["long_answer"],
        "final_decision": r["final_decision"],
    }


def fake_load_dataset(rows, calls):
    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return rows

    return load_dataset


# ----------------------------------------------------------------------------- the shared PubMedQA file
@pytest.fixture(scope="module")
def local_split():
    return load_pubmedqa_local(PQA)


@pytest.fixture(scope="module")
def pqa_records():
    return [r for _, r in IO.read_jsonl(PQA)]


@needs_data
def test_local_pubmedqa_has_official_500_500_split_with_paper_label_counts(local_split):
    train, test = local_split
    assert (len(train), len(test)) == (500, 500)
    assert Counter(x["answer"] for x in train) == LABEL_COUNTS
    assert Counter(x["answer"] for x in test) == LABEL_COUNTS
    ids = [x["id"] for x in train + test]
    assert len(set(ids)) == 1000 and all(i.isdigit() for i in ids)
    for item in train + test:
        assert list(item) == ["id", "question", "contexts", "answer", "labels", "long_answer"]
        assert item["contexts"] and len(item["labels"]) == len(item["contexts"])
        assert item["question"].strip() and item["long_answer"].strip()


@needs_data
def test_local_items_keep_the_file_order_and_text(local_split, pqa_records):
    train, test = local_split
    assert [x["id"] for x in train] == [r["pubid"] for r in pqa_records if r["split"] == "train"]
    assert [x["id"] for x in test] == [r["pubid"] for r in pqa_records if r["split"] == "test"]
    first = pqa_records[0]
    item = next(x for x in train + test if x["id"] == first["pubid"])
    assert item["question"] == first["question"] and item["contexts"] == first["contexts"]
    assert item["answer"] == first["final_decision"]


@needs_data
def test_official_test_ids_are_the_files_test_split(local_split, pqa_records):
    ids = official_test_ids()
    assert len(ids) == 500
    assert ids == {r["pubid"] for r in pqa_records if r["split"] == "test"}
    assert ids == {x["id"] for x in local_split[1]}


def test_official_test_ids_are_500_pmids_without_comment_lines():
    ids = official_test_ids()
    assert len(ids) == 500 and all(i.isdigit() for i in ids)


@needs_data
def test_local_split_by_test_ids_file_matches_split_field(local_split):
    train, test = load_pubmedqa_local(PQA, test_ids=official_test_ids())
    assert [x["id"] for x in train] == [x["id"] for x in local_split[0]]
    assert [x["id"] for x in test] == [x["id"] for x in local_split[1]]


@needs_data
def test_local_split_errors_when_test_ids_are_not_in_the_file():
    ids = set(list(official_test_ids())[:10]) | {"999999991", "999999992"}
    with pytest.raises(DataError, match=r"2 of the 12 test ids are not in the data"):
        load_pubmedqa_local(PQA, test_ids=ids)


def data_cfg(**over):
    return OmegaConf.create(data_spec("pubmedqa_local", **over))


@needs_data
def test_load_qa_with_the_local_data_config(local_split):
    train, test = D.load_qa(data_cfg())
    assert (len(train), len(test)) == (500, 500)
    train, test = D.load_qa(data_cfg(n_train=12, n_test=7))
    assert [x["id"] for x in train] == [x["id"] for x in local_split[0][:12]]
    assert [x["id"] for x in test] == [x["id"] for x in local_split[1][:7]]


@needs_data
def test_load_qa_reads_a_test_ids_file(tmp_path, local_split):
    ids = sorted(official_test_ids())
    (tmp_path / "ids.txt").write_text("# official ids\n" + "\n".join(f"  {i}  " for i in ids) + "\n\n")
    train, test = D.load_qa(data_cfg(test_ids=str(tmp_path / "ids.txt"), n_test=3))
    assert len(train) == 500
    assert [x["id"] for x in test] == [x["id"] for x in local_split[1][:3]]


def test_a_test_ids_file_with_a_bom_reads_and_one_not_utf8_is_named_with_its_line(tmp_path):
    rows = tmp_path / "qa.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Q{i}?", "response": "A."}) + "\n" for i in range(4)))
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"\xef\xbb\xbfq1\nq3\n")  # Windows Notepad's UTF-8 BOM: it hid q1 from the test set
    cfg = OmegaConf.create(data_spec("jsonl", **{"reader.path": str(rows), "test_ids": str(ids)}))
    train, test = D.load_qa(cfg)
    assert sorted(x["id"] for x in test) == ["q1", "q3"] and sorted(x["id"] for x in train) == ["q0", "q2"]
    ids.write_bytes(b"q1\nq3 \xe9t\xe9\n")  # Latin-1
    with pytest.raises(DataError, match=rf"data\.test_ids: {re.escape(str(ids))}:2: not valid UTF-8"):
        D.load_qa(cfg)


def test_skipping_every_test_row_as_bad_says_so_not_that_the_file_is_empty(tmp_path):
    """on_bad_rows=skip over a test file whose every row is bad said "the test set has no rows: add the questions"."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(json.dumps({"id": "a", "prompt": "Q?", "response": "A."}) + "\n")
    test.write_text("".join(json.dumps({"id": f"t{i}", "prompt": "Q?"}) + "\n" for i in range(3)))  # no response
    spec = {"reader.path": str(train), "reader.test_path": str(test)}
    with pytest.raises(
        DataError, match=r"no test question left after 3 bad rows were left out .*skip\), e\.g\. .*test\.jsonl:1"
    ):
        D.load_data(OmegaConf.create(data_spec("jsonl", **spec)), IO.BadRows("skip"))
    test.write_text("")
    with pytest.raises(DataError, match=r"test\.jsonl: the test set has no rows"):
        D.load_data(OmegaConf.create(data_spec("jsonl", **spec)), IO.BadRows("skip"))


def test_load_qa_world_items_are_mapped_like_any_rows():
    rows = [dict(record(i), id=f"w{i}", fact_id=f"f{i}") for i in range(9)]
    reader = GeneratedWorld()
    reader.world = type("W", (), {"train": rows[:5], "test": rows[5:]})()  # what generate_world would have made
    train, test = D.load_qa(OmegaConf.create(data_spec("world", n_train=2)), reader)
    assert [x["id"] for x in train] == ["w0", "w1"] and [x["id"] for x in test] == ["w5", "w6", "w7", "w8"]
    assert train[0] == {
        "id": "w0",
        "question": rows[0]["question"],
        "contexts": rows[0]["contexts"],
        "answer": "yes",
        "labels": rows[0]["labels"],
        "long_answer": "It works.",
        "fact_id": "f0",
    }


# ----------------------------------------------------------------------------- corpora
def corpus_cfg(path, limit=None, **over):
    return OmegaConf.create({"path": str(path), "text_field": "text", "id_field": "id", "limit": limit, **over})


@needs_data
def test_load_corpus_shared_abstracts():
    docs = D.load_corpus(corpus_cfg(ABSTRACTS))
    assert len(docs) == 4302
    assert all(list(d) == ["id", "text"] and d["id"].startswith("PMC") and d["text"].strip() for d in docs)
    assert len({d["id"] for d in docs}) == 4302
    assert [int(d["id"][3:]) for d in docs] == sorted(int(d["id"][3:]) for d in docs)


@needs_data
def test_load_corpus_shared_entertainment_and_limit():
    docs = D.load_corpus(corpus_cfg(ENTERTAINMENT))
    assert len(docs) == 4242
    works = Counter(d["id"].rsplit("-", 1)[0] for d in docs)
    assert works == {
        "austen-emma": 592,
        "austen-mansfieldpark": 579,
        "austen-prideprejudice": 458,
        "austen-sensesensibility": 442,
        "austen-persuasion": 310,
        "austen-northangerabbey": 290,
        "melville-mobydick": 762,
        "shakespeare-tiny": 809,
    }
    assert docs[0]["id"] == "austen-sensesensibility-0000"
    first = D.load_corpus(corpus_cfg(ENTERTAINMENT, limit=25))
    assert first == docs[:25]


def test_load_corpus_limit_text_field_and_missing_id(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl", [{"id": f"d{i}", "body": f"text {i}"} for i in range(6)] + [{"body": "no id here"}]
    )
    docs = D.load_corpus(corpus_cfg(path, text_field="body"))
    assert [d["id"] for d in docs[:6]] == [f"d{i}" for i in range(6)]
    assert docs[6] == {"id": f"{path}:7", "text": "no id here"}  # the location stands in for a missing id
    assert D.load_corpus(corpus_cfg(path, limit=3, text_field="body")) == docs[:3]


@pytest.mark.parametrize(
    "lines, match",
    [
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], r":2: duplicate id 'a'"),
        ([{"id": "a", "text": "x"}, {"id": "b", "text": "  \t "}], r":2: field 'text' is empty"),
        ([{"id": "a", "text": ["x"]}], r":1: field 'text' must be str, got list"),
        ([{"id": "a", "body": "x"}], r":1: missing field 'text'"),
    ],
)
def test_load_corpus_bad_documents(tmp_path, lines, match):
    path = write_lines(tmp_path / "c.jsonl", lines)
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + match):
        D.load_corpus(corpus_cfg(path))


def test_load_corpus_empty_file_and_no_source(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", ["", "   "])
    with pytest.raises(DataError, match="no documents"):
        D.load_corpus(corpus_cfg(path))
    with pytest.raises(DataError, match="give a path .*, a hub_id .* or a _target_"):
        D.load_corpus(OmegaConf.create({"text_field": "text"}))


def test_load_corpus_hub_streams_and_stops_at_limit(monkeypatch):
    consumed = []

    def stream():  # endless: load_corpus must stop at the limit
        for n in count():
            consumed.append(n)
            yield {"id": f"doc-{n}", "text": f"document number {n}", "url": "x"}

    calls = []
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(stream(), calls))
    cfg = OmegaConf.create(
        {
            "hub_id": "org/corpus",
            "hub_config": None,
            "split": "train",
            "text_field": "text",
            "id_field": "id",
            "limit": 5,
        }
    )
    docs = D.load_corpus(cfg)
    assert docs == [{"id": f"doc-{n}", "text": f"document number {n}"} for n in range(5)]
    assert len(consumed) <= 6
    assert calls == [("org/corpus", None, "train", {"streaming": True})]


def test_load_corpus_hub_bad_row_names_the_row(monkeypatch):
    rows = [{"id": "a", "text": "fine"}, {"id": "b", "text": ""}]
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(rows, []))
    cfg = OmegaConf.create(
        {"hub_id": "org/corpus", "split": "train", "text_field": "text", "id_field": "id", "limit": None}
    )
    with pytest.raises(DataError, match=r"org/corpus row 1: field 'text' is empty"):
        D.load_corpus(cfg)


def test_a_hub_revision_reaches_load_dataset_and_the_index_fingerprint(monkeypatch):
    """A pinned revision is what load_dataset reads and what a saved BM25 index is keyed by; left at null, no
    revision is passed (the hub's newest, the behaviour before the key)."""
    calls = []
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset([{"id": "a", "text": "one"}], calls))
    spec = {"hub_id": "org/corpus", "split": "train", "limit": None}
    pinned, floating = HubCorpus(**spec, revision="0a1b2c"), HubCorpus(**spec)
    assert pinned(IO.BadRows()) == floating(IO.BadRows()) == [{"id": "a", "text": "one"}]
    assert [c[3] for c in calls] == [{"streaming": True, "revision": "0a1b2c"}, {"streaming": True}]
    assert pinned.fingerprint() != floating.fingerprint() != HubCorpus(**spec, revision="v2").fingerprint()
    calls.clear()
    rows, _ = D.HubRows("org/qa", revision=7)(IO.BadRows())  # a commit YAML reads as a number is passed as a string
    next(rows)
    assert calls == [("org/qa", None, "train", {"revision": "7"})]


# ----------------------------------------------------------------------------- readers by _target_ (load_data)
SMALL_WORLD = dict(n_train=24, n_test=12, n_facts=30, n_medical_docs=100, n_entertainment_docs=40)


def world_data(**over):
    return OmegaConf.create(data_spec("world", **{f"world.{k}": v for k, v in {**SMALL_WORLD, **over}.items()}))


def test_load_data_of_the_world_reads_one_generated_world():
    cfg = world_data(seed=3)
    train, test, corpora, world = D.load_data(cfg)
    expected = generate_world(seed=3, **SMALL_WORLD)  # the world, made directly
    assert world.config == expected.config and world.provenance == expected.provenance
    assert corpora == {"medical": expected.medical_docs, "entertainment": expected.entertainment_docs}
    assert [x["id"] for x in train] == [x["id"] for x in expected.train] and len(test) == 12
    assert test[0] == {
        "id": expected.test[0]["id"],
        "question": expected.test[0]["question"],
        "contexts": expected.test[0]["contexts"],
        "answer": expected.test[0]["final_decision"],
        "labels": expected.test[0]["labels"],
        "long_answer": expected.test[0]["long_answer"],
        "fact_id": expected.test[0]["fact_id"],
    }


def test_a_bad_world_argument_names_its_key():
    with pytest.raises(ConfigError, match="data.world.n_train must be positive, got 0"):
        D.load_data(world_data(n_train=0))


def test_a_world_corpus_needs_the_world_as_reader(tmp_path):
    rows = write_lines(tmp_path / "qa.jsonl", [record(i, split="test" if i == 2 else "train") for i in range(3)])
    cfg = OmegaConf.create(data_spec("pubmedqa_local", **{"reader.path": rows}))
    cfg.corpora = {"medical": {"world": "medical_docs"}}
    with pytest.raises(ConfigError, match="needs the generated world as data.reader"):
        D.load_data(cfg)


def test_a_corpus_target_reads_as_its_shorthand(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"id": f"d{i}", "body": f"text {i}"} for i in range(5)])
    spec = {"path": str(path), "text_field": "body", "limit": 3}
    docs = [{"id": f"d{i}", "text": f"text {i}"} for i in range(3)]
    assert D.load_corpus(OmegaConf.create(spec)) == docs
    assert D.load_corpus(OmegaConf.create({"_target_": "lark.data.corpora.JsonlCorpus", **spec})) == docs
    assert isinstance(corpus_reader(spec), JsonlCorpus) and isinstance(corpus_reader({"hub_id": "a/b"}), HubCorpus)


class Echo:
    """A corpus reader of a user's own: one document per QA training row of the run's QA reader."""

    def __init__(self, prefix):
        self.prefix = prefix

    def __call__(self, bad, qa_reader=None):
        rows, _ = qa_reader(bad)
        return [{"id": f"{self.prefix}{n}", "text": r["question"]} for n, (_, r) in enumerate(rows)]


def test_a_corpus_reader_of_your_own_by_target(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [record(i) for i in range(3)])
    test = write_lines(tmp_path / "test.jsonl", [record(i) for i in range(3, 5)])
    cfg = OmegaConf.create(data_spec("pubmedqa_local", **{"reader.path": train, "reader.test_path": test}))
    cfg.corpora = {"echo": {"_target_": "test_data.Echo", "prefix": "e"}}
    _, _, corpora, world = D.load_data(cfg)
    assert corpora == {"echo": [{"id": f"e{i}", "text": f"Does drug {i} work?"} for i in range(3)]} and world is None


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"limit": 3}, "data.corpora.c: give exactly one of path .* got none"),
        ({"path": "PATH", "hub_id": "a/b"}, r"data.corpora.c: give exactly one of .* got \['path', 'hub_id'\]"),
        ({"path": "/no/such.jsonl"}, "data.corpora.c.path: /no/such.jsonl is not a file"),
        ({"path": "PATH", "split": "train"}, "data.corpora.c: .*JsonlCorpus.* unexpected keyword argument 'split'"),
        ({"world": "lyrics"}, "data.corpora.c: .*a world corpus is one of medical_docs, entertainment_docs"),
        ({"_target_": "lark.data.corpora.Nope"}, "data.corpora.c: Error locating target 'lark.data.corpora.Nope'"),
    ],
)
def test_check_corpora_names_the_key(tmp_path, spec, message):
    path = write_lines(tmp_path / "c.jsonl", [{"id": "a", "text": "x"}])
    spec = {k: str(path) if v == "PATH" else v for k, v in spec.items()}
    with pytest.raises(ConfigError, match=message):
        check_corpora(OmegaConf.create({"c": spec}))
    check_corpora(OmegaConf.create({"c": {"path": str(path)}, "w": {"world": "medical_docs"}}))  # good ones pass


def test_first_form_is_the_data_config_as_written_before_readers_were_targets():
    # the LDS retrains of earlier runs are keyed by a hash of this form (lark.validation.lds.recipe_key)
    today = OmegaConf.to_container(compose([]).data, resolve=False)
    before = {k: v for k, v in today.items() if k != "reader"}
    before["world"] = {k: v for k, v in today["world"].items() if k != "_target_"}
    before["corpora"] = {"medical": {"world": "medical_docs"}, "entertainment": {"world": "entertainment_docs"}}
    assert D.first_form(today) == before and today["reader"] == "${data.world}"
    saved = OmegaConf.load(ROOT / "tests/fixtures/legacy/embedded.yaml").data  # an embedded run's, as saved then
    assert D.first_form(today)["world"] == OmegaConf.to_container(saved.world)
    local = OmegaConf.to_container(compose(["data=pubmedqa_local"]).data, resolve=False)
    assert all("_target_" not in c and "path" in c for c in D.first_form(local)["corpora"].values())
    assert D.first_form(local)["reader"] == local["reader"]  # a QA reader of its own is kept
    mine = {"a": {"_target_": "my.Reader", "path": "x"}, "b": {"_target_": "lark.data.corpora.JsonlCorpus"}}
    assert D.first_form({"corpora": mine}) == {"corpora": mine}  # targets their keys do not name are kept


# ----------------------------------------------------------------------------- the hub PubMedQA loader
@needs_data
def test_hub_loader_splits_by_official_test_ids(monkeypatch, pqa_records, local_split):
    calls = []
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset([hub_row(r) for r in pqa_records], calls))
    train, test = load_pubmedqa_hub("qiaojin/PubMedQA", "pqa_labeled", "train")
    assert calls == [("qiaojin/PubMedQA", "pqa_labeled", "train", {})]
    assert (len(train), len(test)) == (500, 500)
    assert Counter(x["answer"] for x in test) == LABEL_COUNTS
    assert train == local_split[0] and test == local_split[1]  # int pubids become the same string ids


@needs_data
def test_load_qa_hub_config_with_monkeypatched_datasets(monkeypatch, pqa_records):
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset([hub_row(r) for r in pqa_records], []))
    cfg = OmegaConf.create(data_spec("pubmedqa"))
    train, test = D.load_qa(cfg)
    assert (len(train), len(test)) == (cfg.n_train, cfg.n_test) == (500, 500)
    assert {x["id"] for x in test} == official_test_ids()


def small_hub_rows():
    return [hub_row(record(i, final_decision=LABELS[i % 3])) for i in range(1, 7)]


def test_hub_loader_with_explicit_test_ids(monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(small_hub_rows(), []))
    train, test = load_pubmedqa_hub("h/pqa", "cfg", "train", test_ids={"2", "5"})
    assert [x["id"] for x in train] == ["1", "3", "4", "6"] and [x["id"] for x in test] == ["2", "5"]
    assert test[0] == {
        "id": "2",
        "question": "Does drug 2 work?",
        "contexts": ["Background text.", "Results text."],
        "answer": "maybe",
        "labels": ["BACKGROUND", "RESULTS"],
        "long_answer": "It works.",
    }


def test_hub_loader_errors_when_test_ids_are_missing(monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(small_hub_rows(), []))
    with pytest.raises(DataError, match=r"h/pqa/cfg: 2 of the 3 test ids are not in the data"):
        load_pubmedqa_hub("h/pqa", "cfg", "train", test_ids={"2", "77", "78"})
    # the official ids are not among these rows at all
    with pytest.raises(DataError, match=r"500 of the 500 test ids are not in the data"):
        load_pubmedqa_hub("h/pqa", "cfg", "train")


def test_hub_loader_bad_row_names_row_and_field(monkeypatch):
    rows = small_hub_rows()
    rows[3]["final_decision"] = "probably"
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(rows, []))
    with pytest.raises(DataError, match=r"h/pqa/cfg\[train\] row 3: field 'final_decision' is 'probably'"):
        load_pubmedqa_hub("h/pqa", "cfg", "train", test_ids={"2"})


def test_hub_loader_rejects_duplicate_ids(monkeypatch):
    rows = small_hub_rows()
    rows[2] = dict(rows[1])  # pubid 2 twice, pubid 3 gone
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(rows, []))
    with pytest.raises(DataError, match=r"row 2.*duplicate id '2'|test ids"):
        load_pubmedqa_hub("h/pqa", "cfg", "train", test_ids={"2", "3"})


def test_hub_loader_row_missing_question_is_a_data_error(monkeypatch):
    rows = small_hub_rows()
    del rows[1]["question"]
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset(rows, []))
    with pytest.raises(DataError, match=r"row 1: missing field 'question'"):
        load_pubmedqa_hub("h/pqa", "cfg", "train", test_ids={"1"})


# ----------------------------------------------------------------------------- bad input
def bad_file(tmp_path, bad_line):
    """A file whose line 3 is `bad_line` (line 1 valid, line 2 blank)."""
    return write_lines(tmp_path / "pqa.jsonl", [record(1), "", bad_line, record(4)])


def loc(path, line):
    return str(path).replace(".", r"\.") + f":{line}: "


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"pubid": "3", "question": ', r"invalid JSON \("),
        ('{"pubid": "3"} trailing', r"invalid JSON \(Extra data"),
        ("[1, 2, 3]", r"expected a JSON object, got list"),
        ('{"pubid": "3", "question": "hi \\ud83d?"}', r"an unpaired surrogate escape"),
        ("[" * 200_000, r"JSON nested too deeply"),
        ('"just a string"', r"expected a JSON object, got str"),
        (b'{"pubid": "3", "question": "caf\xe9?"}', r"not valid UTF-8"),
        (json.dumps({k: v for k, v in record(3).items() if k != "question"}), r"missing field 'question'"),
        (json.dumps({k: v for k, v in record(3).items() if k != "contexts"}), r"missing field 'contexts'"),
        (json.dumps({k: v for k, v in record(3).items() if k != "final_decision"}), r"missing field 'final_decision'"),
        (json.dumps({k: v for k, v in record(3).items() if k != "pubid"}), r"missing field 'pubid'"),
        (json.dumps(record(3, question=17)), r"field 'question' must be str, got int"),
        (json.dumps(record(3, contexts={"a": "b"})), r"field 'contexts' must be list, got dict"),
        (json.dumps(record(3, contexts=["ok", 5])), r"field 'contexts' must be a non-empty list of non-empty strings"),
        (json.dumps(record(3, contexts=[])), r"field 'contexts' must be a non-empty list"),
        (json.dumps(record(3, final_decision=1)), r"field 'final_decision' must be str, got int"),
        (
            json.dumps(record(3, final_decision="Yes")),
            r"field 'final_decision' is 'Yes', expected one of yes, no, maybe",
        ),
        (json.dumps(record(3, final_decision="unsure")), r"field 'final_decision' is 'unsure'"),
        (json.dumps(record(3, question="   \n\t")), r"field 'question' is empty"),
        (json.dumps(record(3, question="")), r"field 'question' is empty"),
        (json.dumps(record(3, contexts=["fine", "  "])), r"field 'contexts' must be a non-empty list of non-empty"),
        (json.dumps(record(3, split="dev")), r"field 'split' is 'dev', expected 'train' or 'test'"),
        (json.dumps(record(1)), r"duplicate id '1'"),
        (json.dumps(record(1) | {"pubid": 1}), r"duplicate id '1'"),  # int and str ids are the same id
    ],
    ids=[
        "truncated-json",
        "extra-data",
        "array",
        "lone-surrogate",
        "deep-nesting",
        "string",
        "latin1-bytes",
        "no-question",
        "no-contexts",
        "no-decision",
        "no-id",
        "question-int",
        "contexts-dict",
        "contexts-item-int",
        "contexts-empty",
        "decision-int",
        "decision-case",
        "decision-unknown",
        "question-blank",
        "question-empty",
        "context-blank",
        "split-unknown",
        "duplicate-id",
        "duplicate-int-id",
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, bad_line, match):
    path = bad_file(tmp_path, bad_line)
    with pytest.raises(DataError, match=loc(path, 3) + match):
        load_pubmedqa_local(path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("labels", "RESULTS"),
        ("long_answer", 42),
        ("pubid", ["3"]),
        ("pubid", "  "),
    ],
)
def test_unchecked_fields_of_wrong_type_are_rejected(tmp_path, field, value):
    path = bad_file(tmp_path, json.dumps({**record(3), field: value}))
    with pytest.raises(DataError, match=loc(path, 3) + f".*'{field}'"):
        load_pubmedqa_local(path)


def test_missing_file_empty_file_and_blank_lines(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=str(missing).replace(".", r"\.") + ": file not found"):
        load_pubmedqa_local(missing)
    with pytest.raises(DataError, match="file not found"):
        D.load_corpus(corpus_cfg(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=str(empty).replace(".", r"\.") + ": no records"):
        load_pubmedqa_local(empty)
    # blank lines are skipped but still counted in line numbers
    path = write_lines(tmp_path / "ok.jsonl", ["", record(1), "  ", record(2, split="test")])
    assert [n for n, _ in IO.read_jsonl(path)] == [2, 4]
    train, test = load_pubmedqa_local(path)
    assert [x["id"] for x in train] == ["1"] and [x["id"] for x in test] == ["2"]


def test_crlf_line_ends_and_missing_optional_fields(tmp_path):
    r = {k: v for k, v in record(5, split="test").items() if k not in ("labels", "long_answer")}
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(json.dumps(r).encode() + b"\r\n")
    train, test = load_pubmedqa_local(path)
    assert train == [] and test[0]["labels"] == [] and test[0]["long_answer"] == ""


def test_free_form_rows_with_a_string_context_a_test_file_and_no_ids(tmp_path):
    """data=jsonl's mapping: free-form answers, a string (or absent) context, the test rows from their own file,
    the row's file:line standing in for a missing id field; bad rows still name file, line and field."""
    train = write_lines(
        tmp_path / "train.jsonl",
        [
            {"prompt": "Capital of France?", "response": "Paris", "ctx": "Geography."},
            {"prompt": "2+2?", "response": "4"},
        ],
    )
    test = write_lines(tmp_path / "test.jsonl", [{"prompt": "Capital of Peru?", "response": "Lima", "ctx": "Maps."}])
    spec = data_spec("jsonl", **{"reader.path": train, "reader.test_path": test, "fields.id": "null"})
    tr, te = D.load_qa(OmegaConf.create(spec))
    assert tr[0] == {"id": f"{train}:1", "question": "Capital of France?", "contexts": [], "answer": "Paris"}
    assert te == [{"id": f"{test}:1", "question": "Capital of Peru?", "contexts": [], "answer": "Lima"}]
    spec["fields"]["context"] = "ctx"
    with pytest.raises(DataError, match=loc(train, 2) + "missing field 'ctx'"):
        D.load_qa(OmegaConf.create(spec))
    spec["fields"]["context"], spec["fields"]["id"] = None, "id"
    with pytest.raises(DataError, match=loc(train, 1) + "missing field 'id'"):
        D.load_qa(OmegaConf.create(spec))
    bad = write_lines(tmp_path / "bad.jsonl", [{"id": 1, "prompt": "Q?", "response": ""}])
    spec["reader"]["path"] = str(bad)
    with pytest.raises(DataError, match=loc(bad, 1) + "field 'response' is empty"):
        D.load_qa(OmegaConf.create(spec))


def test_string_context_is_one_context(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [record(1, contexts="One context.")])
    assert load_pubmedqa_local(path)[0][0]["contexts"] == ["One context."]


def test_hf_reader_reads_a_save_to_disk_folder_with_a_test_split(tmp_path):
    import datasets

    rows = {
        "train": [{"q": f"Q{i}?", "a": f"A{i}", "uid": i} for i in range(4)],
        "test": [{"q": "Q9?", "a": "A9", "uid": 9}],
    }
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(tmp_path / "ds")
    spec = data_spec(
        "hf",
        **{
            "reader.hub_id": tmp_path / "ds",
            "reader.test_split": "test",
            "fields.id": "uid",
            "fields.question": "q",
            "fields.answer": "a",
        },
    )
    train, test = D.load_qa(OmegaConf.create(spec))
    assert [x["id"] for x in train] == ["0", "1", "2", "3"] and test[0]["answer"] == "A9"
    rows["train"][2]["a"] = None
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(tmp_path / "b")
    spec["reader"]["hub_id"] = str(tmp_path / "b")
    with pytest.raises(DataError, match=r"\[train\] row 2: field 'a' must be str"):
        D.load_qa(OmegaConf.create(spec))


def test_line_number_of_non_utf8_bytes(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [record(1), b"\x80\x81 not utf-8"])
    with pytest.raises(DataError, match=r":2: not valid UTF-8 \(invalid start byte at byte 0\)"):
        list(IO.read_jsonl(path))


# ----------------------------------------------------------------------------- sample
def test_sample_is_deterministic_ordered_and_seed_dependent():
    items = [f"x{i}" for i in range(100)]
    a, b = D.sample(items, 10, seed=3), D.sample(items, 10, seed=3)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    assert a == sorted(a, key=items.index)  # original order kept
    others = [D.sample(items, 10, seed=s) for s in range(4, 8)]
    assert any(o != a for o in others)
    import random

    random.seed(123)
    assert D.sample(items, 10, seed=3) == a  # independent of the global random state


def test_sample_with_n_at_least_len_returns_a_copy_of_all():
    items = [3, 1, 2]
    out = D.sample(items, 3, seed=0)
    assert out == items and out is not items
    assert D.sample(items, 10, seed=0) == items


# ----------------------------------------------------------------------------- round trip (property)
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)
records = st.fixed_dictionaries(
    {
        "pubid": st.one_of(
            st.integers(min_value=0, max_value=10**9),
            st.text(string.ascii_letters + string.digits, min_size=1, max_size=12),
        ),
        "question": texts,
        "contexts": st.lists(texts, min_size=1, max_size=4),
        "labels": st.lists(st.sampled_from(["BACKGROUND", "METHODS", "RESULTS"]), max_size=4),
        "long_answer": texts,
        "final_decision": st.sampled_from(LABELS),
    }
)


@functools.cache
def pubmedqa_local_spec():
    """data=pubmedqa_local's mapping, composed once (a Hydra compose per record made the test below 27 s)."""
    return data_spec("pubmedqa_local")


@settings(max_examples=60, deadline=None)
@given(st.lists(records, min_size=1, max_size=5, unique_by=lambda r: str(r["pubid"])))
def test_write_read_qa_item_round_trip(recs):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.jsonl"
        IO.write_jsonl(recs, path)
        back = list(IO.read_jsonl(path))
    assert [n for n, _ in back] == list(range(1, len(recs) + 1))
    assert [r for _, r in back] == recs
    for (n, r), orig in zip(back, recs):
        item = D.qa_item(r, f"r.jsonl:{n}", pubmedqa_local_spec())
        assert item == {
            "id": str(orig["pubid"]),
            "question": orig["question"],
            "contexts": orig["contexts"],
            "answer": orig["final_decision"],
            "labels": orig["labels"],
            "long_answer": orig["long_answer"],
        }


PQA_SPEC = {
    "fields": {"id": "pubid", "question": "question", "context": "contexts", "answer": "final_decision"},
    "answers": list(LABELS),
}


@settings(max_examples=60, deadline=None)
@given(records, st.text(max_size=10).filter(lambda s: s not in LABELS))
def test_qa_item_rejects_any_other_label(rec, label):
    with pytest.raises(DataError, match=r"^r\.jsonl:7: field 'final_decision'"):
        D.qa_item({**rec, "final_decision": label}, "r.jsonl:7", PQA_SPEC)


@pytest.mark.parametrize("content", ["[]", '["a.bin"]', '"sha256:0"', "3"])
def test_a_checksums_json_that_is_not_an_object_is_a_corrupt_file_naming_it(tmp_path, content):
    """check_manifest read any JSON: a list raised AttributeError (which bm25.cached, catching CorruptFile, let
    through and the run stopped with a traceback)."""
    from lark.errors import CorruptFile

    (tmp_path / "a.bin").write_bytes(b"x")
    IO.write_manifest(tmp_path)
    assert IO.check_manifest(tmp_path)
    (tmp_path / IO.MANIFEST).write_text(content)
    with pytest.raises(CorruptFile, match=rf"{tmp_path / IO.MANIFEST}: expected a JSON object"):
        IO.check_manifest(tmp_path)


@pytest.mark.parametrize("stream", [False, True])
def test_exclude_medical_that_leaves_out_every_document_read_names_the_corpus(tmp_path, stream):
    """With a limit, exclude_medical could leave out every document read: the corpus came back empty and a source
    failed later with a ValueError naming no corpus."""
    path = write_lines(
        tmp_path / "mixed.jsonl", [{"id": i, "text": "patient trial" if i < 5 else "music"} for i in range(10)]
    )
    spec = corpus_cfg(path, limit=5, exclude_medical=True, stream=stream)
    with pytest.raises(DataError, match=r"^data\.corpora\.web \(.*mixed\.jsonl\): exclude_medical left out all 5 .*"):
        list(D.load_corpus(spec, name="web"))
    medical_only = corpus_cfg(write_lines(tmp_path / "med.jsonl", [{"text": "a dose"}]), exclude_medical=True)
    with pytest.raises(DataError, match=r"^data\.corpora\.web .*left out all 1 .*set exclude_medical: false"):
        D.load_corpus(medical_only, name="web")
    spec.limit = 7
    assert [d["text"] for d in D.load_corpus(spec, name="web")] == ["music", "music"]  # limit counts those read
    qa = [write_lines(tmp_path / f"{name}.jsonl", [{"prompt": "Q?", "response": "A"}]) for name in ("tr", "te")]
    data = data_spec("jsonl", **{"reader.path": qa[0], "reader.test_path": qa[1], "fields.id": "null"})
    data["corpora"] = {"web": {"path": str(path), "limit": 5, "exclude_medical": True}}
    with pytest.raises(DataError, match=r"^data\.corpora\.web \("):  # a run's load_data names its key
        D.load_data(OmegaConf.create(data))


def test_exclude_medical_takes_a_list_of_words(tmp_path):
    """The control group's word list was a hidden constant (MEDICAL_TERMS); a list replaces it, matched casefolded."""
    rows = [{"id": i, "text": t} for i, t in enumerate(["the Opera house", "a patient", "rock songs", "MUSIC video"])]
    path = write_lines(tmp_path / "mixed.jsonl", rows)
    own = D.load_corpus(corpus_cfg(path, exclude_medical=["opera", "Music"]), name="web")
    assert [d["text"] for d in own] == ["a patient", "rock songs"]
    assert len(D.load_corpus(corpus_cfg(path, exclude_medical=None), name="web")) == 4  # null: keep all, as false
    shipped = D.load_corpus(corpus_cfg(path, exclude_medical=True), name="web")
    assert [d["text"] for d in shipped] == ["the Opera house", "rock songs", "MUSIC video"]


def rewrite_keeping_size_and_time(path, text):
    """Rewrite a file with bytes of the same length and restore its modification time (cp -p, rsync -t, tar x)."""
    before = path.stat()
    assert len(text.encode()) == before.st_size
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_streamed_corpus_rewritten_with_its_size_and_time_gets_a_new_bm25_index(tmp_path):
    """The index key held the file's size and modification time: a same-size rewrite with its time restored reused
    the old index, whose positions then named other documents."""
    from lark.data.sources import bm25_retrieve

    path = tmp_path / "c.jsonl"

    def lines(*texts):
        return "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))

    path.write_text(lines("aspirin reduces pain", "music and dance", "movies tonight"))
    first = JsonlCorpus(str(path), stream=True)(IO.BadRows())
    assert bm25_retrieve(["aspirin"], first, 1, index_dir=tmp_path / "ix")[0]["text"] == "aspirin reduces pain"
    old_key = first.fingerprint()
    rewrite_keeping_size_and_time(path, lines("music reduces pain", "aspirin and dance", "movies tonight"))
    again = JsonlCorpus(str(path), stream=True)(IO.BadRows())
    assert again.fingerprint() != old_key
    assert bm25_retrieve(["aspirin"], again, 1, index_dir=tmp_path / "ix") == [
        {"id": "d1", "text": "aspirin and dance"}
    ]
    folder = tmp_path / "hub"  # a local datasets folder: its files' contents too
    folder.mkdir()
    (folder / "part.jsonl").write_text(lines("one"))
    before = HubCorpus(str(folder), stream=True).fingerprint()
    rewrite_keeping_size_and_time(folder / "part.jsonl", lines("two"))
    assert HubCorpus(str(folder), stream=True).fingerprint() != before


def test_an_unpinned_streamed_hub_corpus_says_once_that_its_index_is_reused_blind(capsys):
    """A hub corpus at no revision or at a branch cannot be seen to change: the run logs it once, naming the key."""
    floating = corpus_reader({"hub_id": "org/unpinned-corpus", "stream": True}, "web")
    floating.fingerprint()
    floating.fingerprint()
    out = capsys.readouterr().out
    assert out.count("org/unpinned-corpus") == 1 and "data.corpora.web.revision=<commit sha>" in out
    corpus_reader({"hub_id": "org/unpinned-corpus", "revision": "main", "stream": True}, "web").fingerprint()
    assert "revision 'main' (a branch or tag can move)" in capsys.readouterr().out
    corpus_reader({"hub_id": "org/unpinned-corpus", "revision": "0123abcd" * 5}, "web").fingerprint()
    assert capsys.readouterr().out == ""  # a commit is pinned


def test_hub_reader_errors_on_saved_folders_and_files_name_the_key_and_the_path(tmp_path):
    """A saved single Dataset with test_split used all its rows as both sets (then 'duplicate id'); a missing split
    was a bare KeyError; a single Parquet file failed in datasets with "Couldn't find any data file"."""
    import datasets

    table = datasets.Dataset.from_list([{"q": f"Q{i}?", "a": f"A{i}", "uid": i} for i in range(3)])
    table.save_to_disk(tmp_path / "one")
    with pytest.raises(ConfigError, match=rf"^data\.reader\.test_split: {tmp_path / 'one'} is a single table"):
        D.HubRows(str(tmp_path / "one"), test_split="test")(IO.BadRows())
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(tmp_path / "dict")
    for key, split in [("test_split", "tset"), ("split", "trian")]:
        reader = D.HubRows(str(tmp_path / "dict"), **{key: split})
        with pytest.raises(ConfigError, match=rf"^data\.reader\.{key}: .*dict has no split '{split}' \(it has: train"):
            reader(IO.BadRows())
    table.to_parquet(tmp_path / "qa.parquet")
    rows, test = D.HubRows(str(tmp_path / "qa.parquet"))(IO.BadRows())
    file = tmp_path / "qa.parquet"
    assert test is None and [(w, r["uid"]) for w, r in rows] == [(f"{file}[train] row {n}", n) for n in range(3)]
    with pytest.raises(ConfigError, match=r"^data\.reader\.test_split: .*qa\.parquet is a single table"):
        D.HubRows(str(tmp_path / "qa.parquet"), test_split="test")(IO.BadRows())
    not_parquet = write_lines(tmp_path / "qa.jsonl", [{"q": "Q?"}])
    with pytest.raises(ConfigError, match=rf"^data\.reader\.hub_id: {not_parquet} is a file that datasets cannot"):
        D.HubRows(str(not_parquet))(IO.BadRows())
    (tmp_path / "files").mkdir()  # a folder of data files (load_dataset): an unknown split names its key too
    table.to_parquet(tmp_path / "files" / "train.parquet")
    with pytest.raises(ConfigError, match=r"^data\.reader\.test_split: .*files has no split 'tset'"):
        D.HubRows(str(tmp_path / "files"), test_split="tset")(IO.BadRows())
