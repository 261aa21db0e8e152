"""Checking one record: typed fields, dotted field paths, identifiers, documents, duplicate ids. Every reader of
QA items (lark.data.readers) and of corpora (lark.data.corpora) checks its rows with these, so that a bad row
raises the same DataError naming its file, line (or row) and field wherever it comes from."""

from lark.errors import DataError


def required(record, name, kind, where):
    """record[name], which must be present, of type `kind` and, for a string, not blank."""
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


def document(record, where, text_field="text", id_field="id"):
    """A corpus record {id, text} validated: non-empty text, a string or integer id (the location when absent)."""
    text = required(record, text_field, str, where)
    doc_id = record.get(id_field, where)
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or not str(doc_id).strip():
        raise DataError(f"{where}: field '{id_field}' must be a non-empty string or integer, got {doc_id!r}")
    return {"id": str(doc_id), "text": text}


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
