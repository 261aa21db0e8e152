"""Loading the `data` config's data (load_data): the QA items of data.reader, a `_target_` (JsonlRows: local JSON
Lines; HubRows: a `datasets` dataset; lark.data.world.GeneratedWorld: the generated world; or your own), mapped
by data.fields (PubMedQA is one such mapping), and the documents of each data.corpora entry (lark.data.corpora).

A QA reader is called with the bad-row policy (lark.data.io.BadRows) and returns (rows, test rows or None),
iterables of (where, record); its `name` names the data in errors. A reader that generates its data (the
world) exposes it as `world`, which the run saves with its provenance.

Every loader returns plain dicts. A QA item: {id, question, contexts: [str], answer: str, <data.extras>}.
A document: {id, text}. Bad input raises DataError naming the file, line and field.
"""

import itertools
import random
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.data.corpora import SHORTHAND, corpus_reader
from lark.data.io import BadRows, read_jsonl, read_text_lines
from lark.data.records import checked, identifier, lookup, required, unique
from lark.errors import ConfigError, DataError


def qa_item(record, where, spec):
    """One QA row mapped by `spec` (a data config: fields {id, question, context, answer}, extras, answers) to a
    LARK QA item {id, question, contexts: [str], answer, <extras>}. DataError names the row and the row's field."""
    fields = spec["fields"]
    item_id = identifier(*lookup(record, fields["id"], where), where) if fields.get("id") else where
    question = required(*lookup(record, fields["question"], where), str, where)
    contexts = []
    if fields.get("context"):
        holder, name = lookup(record, fields["context"], where)
        contexts = holder.get(name)
        if name not in holder:
            raise DataError(f"{where}: missing field '{name}'")
        if isinstance(contexts, str):
            contexts = [contexts]
        if not isinstance(contexts, list):
            raise DataError(f"{where}: field '{name}' must be list, got {type(contexts).__name__}")
        if not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
            raise DataError(
                f"{where}: field '{name}' must be a non-empty list of non-empty strings (or a non-empty string)"
            )
    holder, name = lookup(record, fields["answer"], where)
    answer = required(holder, name, str, where)
    answers = spec.get("answers")
    if answers and answer not in answers:
        raise DataError(f"{where}: field '{name}' is '{answer}', expected one of {', '.join(answers)}")
    item = {"id": item_id, "question": question, "contexts": contexts, "answer": answer}
    for key, extra in (spec.get("extras") or {}).items():
        holder, name = lookup(record, extra["field"], where)
        value, default = holder.get(name), extra.get("default")
        value = default if value is None else value
        if isinstance(default, list) and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise DataError(f"{where}: field '{name}' must be a list of strings")
        if default is not None and not isinstance(default, list) and not isinstance(value, type(default)):
            raise DataError(f"{where}: field '{name}' must be {type(default).__name__}, got {type(value).__name__}")
        item[key] = value
    return item


def read_ids(lines):
    return {s.strip() for s in lines if s.strip() and not s.startswith("#")}


class JsonlRows:
    """QA rows from local JSON Lines files: `path` (every row, or the training rows when `test_path` is set)."""

    def __init__(self, path, test_path=None):
        self.path, self.test_path, self.name = path, test_path, str(path)
        self.test_name = f"data.reader.test_path: {test_path}" if test_path else None

    def __call__(self, bad):
        """(rows, test rows or None): iterables of (where, record)."""
        rows = ((f"{self.path}:{n}", r) for n, r in read_jsonl(self.path, bad))
        test = ((f"{self.test_path}:{n}", r) for n, r in read_jsonl(self.test_path, bad)) if self.test_path else None
        return rows, test


class HubRows:
    """QA rows of a Hugging Face `datasets` dataset: a hub name or a folder of data files (load_dataset), a local
    save_to_disk folder (load_from_disk) or a single Parquet file; `split` holds the rows (the training rows when
    `test_split` is set; a saved single Dataset or a Parquet file has no splits: all its rows, and no test_split);
    `revision` pins the hub dataset to a branch, tag or commit (null: its newest; ignored for a local folder)."""

    def __init__(self, hub_id, hub_config=None, split="train", test_split=None, revision=None):
        self.hub_id, self.hub_config, self.split, self.test_split = hub_id, hub_config, split, test_split
        self.revision = revision
        self.name = f"{hub_id}/{hub_config}" if hub_config else str(hub_id)
        self.test_name = f"data.reader.test_split: {self.name}[{test_split}]" if test_split else None

    def __call__(self, bad):
        import datasets

        path = Path(str(self.hub_id))
        saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
        if not (saved or path.is_file()):
            return self.hub_split(datasets, self.split, "split"), (
                self.hub_split(datasets, self.test_split, "test_split") if self.test_split else None
            )
        data = datasets.load_from_disk(str(path)) if saved else parquet_file(datasets, path)
        if not isinstance(data, datasets.DatasetDict):  # one table: its rows are all the rows
            if self.test_split:
                raise ConfigError(
                    f"data.reader.test_split: {path} is a single table (a saved Dataset or a Parquet file), not "
                    f"splits: its rows are all the rows; drop test_split={self.test_split} and give the test set by "
                    "data.test_ids or data.fields.split, or save a DatasetDict with that split"
                )
            return self.rows(data, self.split), None
        return self.rows(saved_split(data, self.split, "split", path), self.split), (
            self.rows(saved_split(data, self.test_split, "test_split", path), self.test_split)
            if self.test_split
            else None
        )

    def rows(self, rows, split):
        return ((f"{self.name}[{split}] row {n}", row) for n, row in enumerate(rows))

    def hub_split(self, datasets, split, key):
        """The rows of one split of a hub dataset or a folder of data files; an unknown split names its key."""
        pinned = {"revision": str(self.revision)} if self.revision else {}
        try:
            rows = datasets.load_dataset(self.hub_id, self.hub_config, split=split, **pinned)
        except ValueError as e:
            if not str(e).startswith("Unknown split"):
                raise
            raise ConfigError(f"data.reader.{key}: {self.name} has no split '{split}' ({e})") from None
        return self.rows(rows, split)


def saved_split(data, split, key, path):
    """One split of a saved DatasetDict; a missing one names its config key, the folder and the splits there are."""
    if split not in data:
        raise ConfigError(f"data.reader.{key}: {path} has no split '{split}' (it has: {', '.join(data)})")
    return data[split]


def parquet_file(datasets, path):
    """The rows of a single Parquet file (data.reader.hub_id), as `datasets` reads parquet data_files."""
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 -- pyarrow and datasets raise errors of many kinds on a bad file
        raise ConfigError(
            f"data.reader.hub_id: {path} is a file that datasets cannot read as Parquet ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); give a Parquet file, a save_to_disk folder, a folder of "
            "data files or a hub name (JSON Lines: data=jsonl)"
        ) from None


def load_data(cfg, bad=None):
    """(train, test, corpora {name: documents}, world or None) of the `data` config: the QA items of data.reader
    (load_qa) and the documents of each data.corpora entry (load_corpus), the one reader shared by both (the
    world's corpora are parts of the world it generated); no test question at all is a DataError naming the file.
    world: the reader's generated world, when it has one
    (the run saves it with its provenance)."""
    bad = bad or BadRows()
    reader = instantiate(cfg.reader)
    train, test = load_qa(cfg, reader, bad)
    if not test:  # nothing to attribute: name the file (or the split rule) that gave no test question
        split = (cfg.get("fields") or {}).get("split")
        if bad.messages:  # data.on_bad_rows=skip may have left every test row out: the rows are there, but bad
            raise DataError(
                f"no test question left after {len(bad.messages)} bad rows were left out (data.on_bad_rows=skip), "
                f"e.g. {bad.messages[0]}; set data.on_bad_rows=error to stop at the first"
            )
        raise DataError(
            f"{reader.test_name}: the test set has no rows: add the questions to attribute, one JSON object per line"
            if getattr(reader, "test_name", None)
            else f"{reader.name}: no test questions: no row's '{split}' field says 'test' (or set data.test_ids)"
            if split
            else f"{reader.name}: no test questions (data.test_ids, data.n_test or the reader's test split)"
        )
    corpora = {name: load_corpus(spec, bad, reader, name) for name, spec in (cfg.get("corpora") or {}).items()}
    return train, test, corpora, getattr(reader, "world", None)


def load_qa(cfg, reader=None, bad=None):
    """(train, test) QA items of the `data` config, truncated to data.n_train / data.n_test: the rows of `reader`
    (data.reader's `_target_` when None) mapped by data.fields (split_qa)."""
    bad = bad or BadRows()
    test_ids = None
    if cfg.get("test_ids"):
        test_ids = read_ids(read_text_lines(cfg.test_ids, "data.test_ids"))
    reader = instantiate(cfg.reader) if reader is None else reader
    rows, test_rows = reader(bad)
    spec = OmegaConf.to_container(cfg, resolve=True)
    train, test = split_qa(rows, test_rows, spec, test_ids, bad, reader.name)
    n_train, n_test = cfg.get("n_train"), cfg.get("n_test")
    return (train if n_train is None else train[:n_train]), (test if n_test is None else test[:n_test])


def load_corpus(spec, bad=None, qa_reader=None, name=None):
    """Documents {id, text} of one data.corpora entry (`name`: its key, named in errors), read by its reader
    (lark.data.corpora.corpus_reader)."""
    return corpus_reader(spec, name)(bad or BadRows(), qa_reader)


def split_qa(rows, test_rows, spec, test_ids=None, bad=None, name="data"):
    """(train, test) QA items of (where, record) rows mapped by `spec` (qa_item). The test set is test_rows when
    given, else the rows whose id is in test_ids, else the rows whose spec.fields.split field says test."""
    bad = bad or BadRows()
    split_field = spec["fields"].get("split")

    def check(where, record, forced=None):
        item = qa_item(record, where, spec)
        split = forced or (
            ("test" if item["id"] in test_ids else "train")
            if test_ids is not None
            else record.get(split_field)
            if split_field
            else None
        )
        if split not in ("train", "test"):
            raise DataError(
                f"{where}: field '{split_field}' is {split!r}, expected 'train' or 'test' (or set "
                "data.test_ids, or give the reader a test set)"
            )
        return where, split, item

    train, test, seen = [], [], set()
    labelled = checked(rows, lambda w, r: check(w, r, "train" if test_rows is not None else None), bad)
    if test_rows is not None:
        labelled = itertools.chain(labelled, checked(test_rows, lambda w, r: check(w, r, "test"), bad))
    for where, split, item in labelled:
        if unique(item, seen, where, bad):
            (test if split == "test" else train).append(item)
    if not train and not test:
        raise DataError(f"{name}: no records")
    if test_ids is not None and len(test) != len(test_ids):
        missing = sorted(set(test_ids) - {x["id"] for x in test})
        raise DataError(
            f"{name}: {len(missing)} of the {len(test_ids)} test ids are not in the data, e.g. {missing[:3]}"
        )
    return train, test


def example(record, where):
    """A saved attribution example (a run's data/sources/*.jsonl): QA fields {id, question, context, answer}
    or a raw document {id, text}."""
    fields = ("question", "context", "answer") if "question" in record else ("text",)
    for name in ("id",) + fields:
        if name != "context" or record.get(name) != "":  # a QA example may have an empty context
            required(record, name, str, where)
    return record


SAVED_ITEM = {"fields": {"id": "id", "question": "question", "context": None, "answer": "answer"}}


def qa_record(record, where):
    """A saved QA item (a run's data/test.jsonl), validated and kept as it is."""
    qa_item(record, where, SAVED_ITEM)
    if not isinstance(record.get("contexts"), list) or not all(isinstance(c, str) for c in record["contexts"]):
        raise DataError(f"{where}: field 'contexts' must be a list of strings")
    return record


def read_examples(path, check=example):
    """Validated records of a run's own JSON Lines file (unique ids); any bad row is an error."""
    seen = set()
    items = [unique(check(r, f"{path}:{n}"), seen, f"{path}:{n}", BadRows()) for n, r in read_jsonl(path)]
    if not items:
        raise DataError(f"{path}: no records")
    return items


def sample(items, n, seed):
    """n items drawn without replacement, deterministic in seed, in their original order."""
    if n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def first_form(data):
    """A data config (a plain container, unresolved) in the form LARK wrote before the world and the corpora were
    reader `_target_`s: no data.reader naming the world, no `_target_` on the world, no `_target_` on a corpus
    that its location key already names (corpora.SHORTHAND). Hashes that runs of earlier versions keep (the LDS
    retrains' recipe) are taken of this form, so that those runs still find what they computed."""
    data = dict(data)
    if data.get("reader") == "${data.world}":
        del data["reader"]
    if isinstance(data.get("world"), dict) and data["world"].get("_target_") == "lark.data.world.GeneratedWorld":
        data["world"] = {k: v for k, v in data["world"].items() if k != "_target_"}
    if isinstance(data.get("corpora"), dict):
        data["corpora"] = {name: shorthand(spec) for name, spec in data["corpora"].items()}
    return data


def shorthand(spec):
    """A corpus spec without its `_target_` when its location key names that reader anyway."""
    if not isinstance(spec, dict):
        return spec
    if [SHORTHAND[key] for key in SHORTHAND if spec.get(key)] == [spec.get("_target_")]:
        return {k: v for k, v in spec.items() if k != "_target_"}
    return spec
