"""Loading the QA items and the pretraining corpora: the generated world, PubMedQA (hub or local JSON Lines),
and text corpora (local JSON Lines or a streamed hub dataset).

Every loader returns plain dicts. A QA item: {id, question, contexts: [str], labels: [str], long_answer,
final_decision: yes|no|maybe}. A document: {id, text}. Bad input raises DataError naming the file, line and field.
"""
import json
import os
import random
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from lark import faults
from lark.errors import ConfigError, DataError

LABELS = ("yes", "no", "maybe")
MAX_LINE_BYTES = 16 * 2**20   # a longer JSON Lines row is an error (a 50 MB line is never one record we want)


class BadRows:
    """The `data.on_bad_rows` policy: error (raise the first DataError) or skip (leave the row out, count it)."""

    def __init__(self, mode="error"):
        if mode not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_rows: unknown '{mode}' (error or skip)")
        self.mode, self.messages = mode, []

    def __call__(self, error):
        """Handle a DataError: raise it, or record it and return None (the caller leaves the row out)."""
        if self.mode == "error":
            raise error
        self.messages.append(str(error))

    def report(self):
        return {"skipped": len(self.messages), "messages": self.messages[:100]}


def read_lines(f, limit=MAX_LINE_BYTES):
    """Yield the raw lines of a binary file; a line longer than `limit` bytes comes back as None (never read whole)."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            line = None
        yield line


def parse_line(raw, where):
    """The JSON object of one raw line (None for a blank line); DataError names what is wrong."""
    if raw is None:
        raise DataError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def read_jsonl(path, bad=None):
    """Yield (line_number, record) for each non-blank line of a JSON Lines file. Bad lines raise DataError
    (file:line: what), or go to `bad` (a BadRows) when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    bad = bad or BadRows()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(read_lines(f), start=1):
            try:
                record = parse_line(raw, f"{path}:{line_no}")
            except DataError as e:
                bad(e)
                continue
            if record is not None:
                yield line_no, record


@contextmanager
def replacing(path):
    """Yield a temporary path beside `path` and rename it into place on success: a reader never sees half a
    file (every file LARK writes goes through here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        faults.point("write")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(records, path):
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _field(record, name, kind, where):
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def qa_item(record, where, id_field="pubid"):
    """Validate one PubMedQA-schema record and return it as a LARK QA item."""
    name = id_field if id_field in record else "id"
    item_id = record.get(name)
    if item_id is None:
        raise DataError(f"{where}: missing field '{id_field}'")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise DataError(f"{where}: field '{name}' must be a non-empty string or integer, got {item_id!r}")
    contexts = _field(record, "contexts", list, where)
    if not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
        raise DataError(f"{where}: field 'contexts' must be a non-empty list of non-empty strings")
    labels = record.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{where}: field 'labels' must be a list of strings")
    long_answer = record.get("long_answer") or ""
    if not isinstance(long_answer, str):
        raise DataError(f"{where}: field 'long_answer' must be str, got {type(long_answer).__name__}")
    decision = _field(record, "final_decision", str, where)
    if decision not in LABELS:
        raise DataError(f"{where}: field 'final_decision' is '{decision}', expected one of {', '.join(LABELS)}")
    return {
        "id": str(item_id).strip(),
        "question": _field(record, "question", str, where),
        "contexts": contexts,
        "labels": labels,
        "long_answer": long_answer,
        "final_decision": decision,
    }


def official_test_ids():
    """The 500 PMIDs of the official PubMedQA (PQA-L) test split, shipped with LARK."""
    text = resources.files("lark").joinpath("resources/pubmedqa_test_pmids.txt").read_text()
    return read_ids(text.splitlines())


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


def load_pubmedqa_local(path, test_ids=None, bad=None):
    """PubMedQA records from a JSON Lines file (../shared/data schema). Without test_ids, each record's
    `split` field (train|test) decides."""
    bad = bad or BadRows()

    def check(where, record):
        item = qa_item(record, where)
        split = ("test" if item["id"] in test_ids else "train") if test_ids is not None else record.get("split")
        if split not in ("train", "test"):
            raise DataError(f"{where}: field 'split' is {split!r}, expected 'train' or 'test' (or set data.test_ids)")
        return where, split, item

    train, test, seen = [], [], set()
    rows = ((f"{path}:{n}", r) for n, r in read_jsonl(path, bad))
    for where, split, item in checked(rows, check, bad):
        if unique(item, seen, where, bad):
            (test if split == "test" else train).append(item)
    if not train and not test:
        raise DataError(f"{path}: no records")
    if test_ids is not None and len(test) != len(test_ids):
        raise DataError(f"{path}: {len(test_ids) - len(test)} of the {len(test_ids)} test ids are not in the file")
    return train, test


def hub_record(where, row):
    """A PubMedQA hub row (context = {contexts, labels}) validated as a QA item."""
    context = row.get("context") or {}
    if not isinstance(context, dict):
        raise DataError(f"{where}: field 'context' must be an object with 'contexts' and 'labels'")
    record = {"pubid": row.get("pubid"), "question": row.get("question"), "contexts": context.get("contexts"),
              "labels": context.get("labels"), "long_answer": row.get("long_answer"),
              "final_decision": row.get("final_decision")}
    return where, qa_item({k: v for k, v in record.items() if v is not None}, where)


def load_pubmedqa_hub(hub_id, hub_config, hub_split="train", test_ids=None, bad=None):
    """PubMedQA PQA-L from the Hugging Face hub, split by the official test PMIDs."""
    import datasets

    bad = bad or BadRows()
    test_ids = official_test_ids() if test_ids is None else test_ids
    rows = datasets.load_dataset(hub_id, hub_config, split=hub_split)
    train, test, seen = [], [], set()
    named = ((f"{hub_id}/{hub_config}[{hub_split}] row {n}", row) for n, row in enumerate(rows))
    for where, item in checked(named, hub_record, bad):
        if unique(item, seen, where, bad):
            (test if item["id"] in test_ids else train).append(item)
    missing = set(test_ids) - seen
    if missing:
        raise DataError(f"{hub_id}/{hub_config}: {len(missing)} of the {len(test_ids)} test ids are not in the "
                        f"data, e.g. {sorted(missing)[:3]}")
    return train, test


def load_qa(cfg, world=None, bad=None):
    """(train, test) QA items for the `data` config group, truncated to data.n_train / data.n_test."""
    if cfg.kind == "world":
        train, test = world.train, world.test
    else:
        test_ids = None
        if cfg.get("test_ids"):
            if not Path(cfg.test_ids).is_file():
                raise DataError(f"data.test_ids: {cfg.test_ids}: file not found")
            test_ids = read_ids(Path(cfg.test_ids).read_text().splitlines())
        if cfg.kind == "local":
            train, test = load_pubmedqa_local(cfg.path, test_ids, bad)
        elif cfg.kind == "hub":
            train, test = load_pubmedqa_hub(cfg.hub_id, cfg.hub_config, cfg.hub_split, test_ids, bad)
        else:
            raise DataError(f"data.kind: unknown kind '{cfg.kind}' (world, local or hub)")
    n_train, n_test = cfg.get("n_train"), cfg.get("n_test")
    return (train if n_train is None else train[:n_train]), (test if n_test is None else test[:n_test])


def document(record, where, text_field="text", id_field="id"):
    """A corpus record {id, text} validated: non-empty text, a string or integer id (the location when absent)."""
    text = _field(record, text_field, str, where)
    doc_id = record.get(id_field, where)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
        raise DataError(f"{where}: field '{id_field}' must be a non-empty string or integer, got {doc_id!r}")
    return {"id": str(doc_id), "text": text}


def load_corpus(cfg, seed=0, bad=None):
    """Documents {id, text} of a corpus config (local JSON Lines or a streamed hub dataset), at most cfg.limit."""
    bad = bad or BadRows()
    limit = cfg.get("limit")
    if cfg.kind == "local":
        records = ((f"{cfg.path}:{n}", r) for n, r in read_jsonl(cfg.path, bad))
    elif cfg.kind == "hub":
        import datasets

        rows = datasets.load_dataset(cfg.hub_id, cfg.get("hub_config"), split=cfg.split, streaming=True)
        records = ((f"{cfg.hub_id} row {n}", r) for n, r in enumerate(rows))
    else:
        raise DataError(f"corpus kind: unknown kind '{cfg.kind}' (local or hub)")
    docs, seen = [], set()
    for where, doc in checked(records, lambda w, r: (w, document(r, w, cfg.text_field, cfg.id_field)), bad):
        if unique(doc, seen, where, bad):
            docs.append(doc)
        if limit and len(docs) >= limit:
            break
    if not docs:
        raise DataError(f"{cfg.get('path', cfg.get('hub_id'))}: no documents")
    return docs


def example(record, where):
    """A saved attribution example (a run's data/sources/*.jsonl): QA fields {id, question, context, answer}
    or a raw document {id, text}."""
    fields = ("question", "context", "answer") if "question" in record else ("text",)
    for name in ("id",) + fields:
        if name != "context" or record.get(name) != "":   # a QA example may have an empty context
            _field(record, name, str, where)
    return record


def qa_record(record, where):
    """A saved QA item (a run's data/test.jsonl, the world's files), validated and kept as it is."""
    qa_item(record, where, "id")
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
