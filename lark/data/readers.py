"""Loading the QA items and the pretraining corpora: the generated world, any QA / instruction data (local JSON
Lines or a `datasets` dataset, mapped by the `data` config's fields; PubMedQA is one such mapping), and text
corpora (local JSON Lines or a streamed `datasets` dataset).

Every loader returns plain dicts. A QA item: {id, question, contexts: [str], answer: str, <data.extras>}.
A document: {id, text}. Bad input raises DataError naming the file, line and field.
"""

import itertools
import random
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.data.bm25 import tokens
from lark.data.io import BadRows, read_jsonl
from lark.errors import DataError


def _field(record, name, kind, where):
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def lookup(record, path, where):
    """(the record holding the last part of a dotted field path such as `context.contexts`, that part)."""
    *parents, last = path.split(".")
    for i, part in enumerate(parents):
        value = record.get(part)
        if not isinstance(value, dict):
            raise DataError(f"{where}: field '{'.'.join(parents[: i + 1])}' must be an object with '{last}'")
        record = value
    return record, last


def identifier(record, name, where):
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{where}: field '{name}' must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def qa_item(record, where, spec):
    """One QA row mapped by `spec` (a data config: fields {id, question, context, answer}, extras, answers) to a
    LARK QA item {id, question, contexts: [str], answer, <extras>}. DataError names the row and the row's field."""
    fields = spec["fields"]
    item_id = identifier(*lookup(record, fields["id"], where), where) if fields.get("id") else where
    question = _field(*lookup(record, fields["question"], where), str, where)
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
    answer = _field(holder, name, str, where)
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


def unique(item, seen, where, bad):
    """The item, unless its id was seen before (a duplicate goes to `bad`)."""
    if item["id"] in seen:
        return bad(DataError(f"{where}: duplicate id '{item['id']}'"))
    seen.add(item["id"])
    return item


def checked(rows, check, bad):
    """Yield check(where, record) for (where, record) rows; a DataError goes to `bad` (raised or counted)."""
    for where, record in rows:
        try:
            yield check(where, record)
        except DataError as e:
            bad(e)


class JsonlRows:
    """QA rows from local JSON Lines files: `path` (every row, or the training rows when `test_path` is set)."""

    def __init__(self, path, test_path=None):
        self.path, self.test_path, self.name = path, test_path, str(path)

    def __call__(self, bad):
        """(rows, test rows or None): iterables of (where, record)."""
        rows = ((f"{self.path}:{n}", r) for n, r in read_jsonl(self.path, bad))
        test = ((f"{self.test_path}:{n}", r) for n, r in read_jsonl(self.test_path, bad)) if self.test_path else None
        return rows, test


class HubRows:
    """QA rows of a Hugging Face `datasets` dataset: a hub name (load_dataset) or a local save_to_disk folder
    (load_from_disk); `split` holds the rows (the training rows when `test_split` is set)."""

    def __init__(self, hub_id, hub_config=None, split="train", test_split=None):
        self.hub_id, self.hub_config, self.split, self.test_split = hub_id, hub_config, split, test_split
        self.name = f"{hub_id}/{hub_config}" if hub_config else str(hub_id)

    def __call__(self, bad):
        import datasets

        folder = Path(str(self.hub_id))
        saved = folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file())

        def split_rows(split):
            if saved:
                data = datasets.load_from_disk(str(folder))
                rows = data[split] if isinstance(data, datasets.DatasetDict) else data
            else:
                rows = datasets.load_dataset(self.hub_id, self.hub_config, split=split)
            return ((f"{self.name}[{split}] row {n}", row) for n, row in enumerate(rows))

        return split_rows(self.split), (split_rows(self.test_split) if self.test_split else None)


def load_qa(cfg, world=None, bad=None):
    """(train, test) QA items of the `data` config, truncated to data.n_train / data.n_test. The rows come from
    the generated world or from `data.reader` (a `_target_`: JsonlRows, HubRows or your own), mapped by
    data.fields (split_qa)."""
    bad = bad or BadRows()
    test_ids = None
    if cfg.get("test_ids"):
        if not Path(cfg.test_ids).is_file():
            raise DataError(f"data.test_ids: {cfg.test_ids}: file not found")
        test_ids = read_ids(Path(cfg.test_ids).read_text().splitlines())
    if world is not None:
        rows = [(f"world train {n}", r) for n, r in enumerate(world.train)]
        test_rows, name = [(f"world test {n}", r) for n, r in enumerate(world.test)], "world"
    else:
        reader = instantiate(cfg.reader)
        (rows, test_rows), name = reader(bad), reader.name
    spec = OmegaConf.to_container(cfg, resolve=True)
    train, test = split_qa(rows, test_rows, spec, test_ids, bad, name)
    n_train, n_test = cfg.get("n_train"), cfg.get("n_test")
    return (train if n_train is None else train[:n_train]), (test if n_test is None else test[:n_test])


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


def document(record, where, text_field="text", id_field="id"):
    """A corpus record {id, text} validated: non-empty text, a string or integer id (the location when absent)."""
    text = _field(record, text_field, str, where)
    doc_id = record.get(id_field, where)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
        raise DataError(f"{where}: field '{id_field}' must be a non-empty string or integer, got {doc_id!r}")
    return {"id": str(doc_id), "text": text}


# Words whose presence marks a document as medical when sampling a non-medical control group from a mixed corpus.
MEDICAL_TERMS = frozenset(
    "patient patients clinical disease diseases treatment therapy drug drugs trial trials hospital cancer tumor "
    "symptoms diagnosis medical medicine physician surgery infection vaccine dose doses randomized placebo".split()
)


def non_medical(docs):
    return [d for d in docs if not MEDICAL_TERMS.intersection(tokens(d["text"]))]


def load_corpus(cfg, seed=0, bad=None):
    """Documents {id, text} of one `data.corpora` entry: `path` (local JSON Lines) or `hub_id` (a streamed
    `datasets` dataset, a hub name or a local folder), at most cfg.limit; with `exclude_medical`, documents with
    medical vocabulary are left out (a non-medical control group from a mixed corpus)."""
    bad = bad or BadRows()
    limit = cfg.get("limit")
    if cfg.get("path"):
        records = ((f"{cfg.path}:{n}", r) for n, r in read_jsonl(cfg.path, bad))
    elif cfg.get("hub_id"):
        import datasets

        rows = datasets.load_dataset(cfg.hub_id, cfg.get("hub_config"), split=cfg.get("split", "train"), streaming=True)
        records = ((f"{cfg.hub_id} row {n}", r) for n, r in enumerate(rows))
    else:
        raise DataError("corpus: give a path (JSON Lines) or a hub_id (a datasets name or folder)")
    docs, seen = [], set()
    text_field, id_field = cfg.get("text_field", "text"), cfg.get("id_field", "id")
    for where, doc in checked(records, lambda w, r: (w, document(r, w, text_field, id_field)), bad):
        if unique(doc, seen, where, bad):
            docs.append(doc)
        if limit and len(docs) >= limit:
            break
    if not docs:
        raise DataError(f"{cfg.get('path') or cfg.get('hub_id')}: no documents")
    if cfg.get("exclude_medical"):
        docs = non_medical(docs)
    return docs


def example(record, where):
    """A saved attribution example (a run's data/sources/*.jsonl): QA fields {id, question, context, answer}
    or a raw document {id, text}."""
    fields = ("question", "context", "answer") if "question" in record else ("text",)
    for name in ("id",) + fields:
        if name != "context" or record.get(name) != "":  # a QA example may have an empty context
            _field(record, name, str, where)
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
