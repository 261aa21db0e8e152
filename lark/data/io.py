"""Reading and writing LARK's files: JSON Lines with file:line errors (and the `data.on_bad_rows` policy),
JSON and CSV, each written atomically (a temporary file renamed over the target)."""

import csv
import json
import os
from contextlib import contextmanager
from pathlib import Path

from lark import faults
from lark.errors import ConfigError, DataError

MAX_LINE_BYTES = 16 * 2**20  # a longer JSON Lines row is an error (a 50 MB line is never one record we want)


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


def write_json(path, obj):
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def write_csv(path, rows, columns=None):
    """rows (dicts) as CSV; columns: the header (default: every key, in order of first appearance). None and
    missing values are written as empty cells."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
