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

LABELS = ("yes", "no", "maybe")


class DataError(ValueError):
    """Invalid input data; the message names the file, the line and the field."""


def read_jsonl(path):
    """Yield (line_number, record) for each non-blank line of a JSON Lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
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


def load_pubmedqa_local(path, test_ids=None):
    """PubMedQA records from a JSON Lines file (../shared/data schema). Without test_ids, each record's
    `split` field (train|test) decides."""
    train, test, seen = [], [], set()
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        item = qa_item(record, where)
        if item["id"] in seen:
            raise DataError(f"{where}: duplicate id '{item['id']}'")
        seen.add(item["id"])
        if test_ids is not None:
            split = "test" if item["id"] in test_ids else "train"
        else:
            split = record.get("split")
            if split not in ("train", "test"):
                raise DataError(f"{where}: field 'split' is {split!r}, expected 'train' or 'test' (or set data.test_ids)")
        (test if split == "test" else train).append(item)
    if not train and not test:
        raise DataError(f"{path}: no records")
    if test_ids is not None and len(test) != len(test_ids):
        raise DataError(f"{path}: {len(test_ids) - len(test)} of the {len(test_ids)} test ids are not in the file")
    return train, test


def load_pubmedqa_hub(hub_id, hub_config, hub_split="train", test_ids=None):
    """PubMedQA PQA-L from the Hugging Face hub, split by the official test PMIDs."""
    import datasets

    test_ids = official_test_ids() if test_ids is None else test_ids
    rows = datasets.load_dataset(hub_id, hub_config, split=hub_split)
    train, test, seen = [], [], set()
    for n, row in enumerate(rows):
        where = f"{hub_id}/{hub_config}[{hub_split}] row {n}"
        context = row.get("context") or {}
        if not isinstance(context, dict):
            raise DataError(f"{where}: field 'context' must be an object with 'contexts' and 'labels'")
        record = {"pubid": row.get("pubid"), "question": row.get("question"), "contexts": context.get("contexts"),
                  "labels": context.get("labels"), "long_answer": row.get("long_answer"),
                  "final_decision": row.get("final_decision")}
        record = {k: v for k, v in record.items() if v is not None}
        item = qa_item(record, where)
        if item["id"] in seen:
            raise DataError(f"{where}: duplicate id '{item['id']}'")
        seen.add(item["id"])
        (test if item["id"] in test_ids else train).append(item)
    missing = set(test_ids) - seen
    if missing:
        raise DataError(f"{hub_id}/{hub_config}: {len(missing)} of the {len(test_ids)} test ids are not in the "
                        f"data, e.g. {sorted(missing)[:3]}")
    return train, test


def load_qa(cfg, world=None):
    """(train, test) QA items for the `data` config group, truncated to data.n_train / data.n_test."""
    if cfg.kind == "world":
        train, test = world.train, world.test
    else:
        test_ids = read_ids(Path(cfg.test_ids).read_text().splitlines()) if cfg.get("test_ids") else None
        if cfg.kind == "local":
            train, test = load_pubmedqa_local(cfg.path, test_ids)
        elif cfg.kind == "hub":
            train, test = load_pubmedqa_hub(cfg.hub_id, cfg.hub_config, cfg.hub_split, test_ids)
        else:
            raise DataError(f"data.kind: unknown kind '{cfg.kind}' (world, local or hub)")
    n_train, n_test = cfg.get("n_train"), cfg.get("n_test")
    return (train if n_train is None else train[:n_train]), (test if n_test is None else test[:n_test])


def load_corpus(cfg, seed=0):
    """Documents {id, text} of a corpus config (local JSON Lines or a streamed hub dataset), at most cfg.limit."""
    limit = cfg.get("limit")
    if cfg.kind == "local":
        records = ((f"{cfg.path}:{n}", r) for n, r in read_jsonl(cfg.path))
    elif cfg.kind == "hub":
        import datasets

        rows = datasets.load_dataset(cfg.hub_id, cfg.get("hub_config"), split=cfg.split, streaming=True)
        records = ((f"{cfg.hub_id} row {n}", r) for n, r in enumerate(rows))
    else:
        raise DataError(f"corpus kind: unknown kind '{cfg.kind}' (local or hub)")
    docs, seen = [], set()
    for where, record in records:
        if limit and len(docs) >= limit:
            break
        text = _field(record, cfg.text_field, str, where)
        doc_id = str(record.get(cfg.id_field, where))
        if doc_id in seen:
            raise DataError(f"{where}: duplicate id '{doc_id}'")
        seen.add(doc_id)
        docs.append({"id": doc_id, "text": text})
    if not docs:
        raise DataError(f"{cfg.get('path', cfg.get('hub_id'))}: no documents")
    return docs


def sample(items, n, seed):
    """n items drawn without replacement, deterministic in seed, in their original order."""
    if n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]
