"""Reading and writing LARK's files: JSON Lines with file:line errors (and the `data.on_bad_rows` policy),
JSON and CSV, each written atomically (a temporary file renamed over the target); a write that finds the disk
full keeps nothing partial and says how many bytes it needed (DiskFull).

Checksums (sha256, streamed), written after the bytes they cover and verified on read, for every artifact LARK
reads back:
- a safetensors file (stores, shards, score matrices, AdamW moments) carries `checksum` in its header metadata:
  the sha256 of its header (without that key, keys sorted) and of its tensor bytes (`seal`, `check_safetensors`);
- a folder written whole and renamed into place (a checkpoint) carries checksums.json, {file: sha256}, written
  inside it before the rename (`write_manifest`, `check_manifest`);
- the Lightning resume state carries the sha256 of its own content (lark.resume).
A file written before LARK checksummed has none: it reads as unverified (check_* return False), as it always did.
A mismatch raises CorruptFile naming the file; the caller recomputes what it can and says what to do otherwise.
"""

import csv
import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

from lark import faults
from lark.errors import ConfigError, CorruptFile, DataError, DiskFull, RunDirError

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
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if LONE_SURROGATE.search(line):  # (rare: only then the record is encoded to find one left unpaired)
        try:
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: an unpaired surrogate escape (\\ud800-\\udfff) is not text") from None
    return record


LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate escape: paired (an emoji) or not


def read_jsonl(path, bad=None):
    """Yield (line_number, record) for each non-blank line of a JSON Lines file (a leading UTF-8 BOM is skipped).
    Bad lines raise DataError (file:line: what), or go to `bad` (a BadRows) when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    bad = bad or BadRows()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(read_lines(f), start=1):
            if line_no == 1 and raw:  # a UTF-8 byte order mark (Windows editors save one) is not data
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                record = parse_line(raw, f"{path}:{line_no}")
            except DataError as e:
                bad(e)
                continue
            if record is not None:
                yield line_no, record


def read_yaml(path, load=None):
    """What a YAML file of a run holds: yaml.safe_load's object, or `load(path)`'s (OmegaConf.load for a config).
    One that does not parse (torn, or edited by hand) is a RunDirError naming file:line, not PyYAML's traceback."""
    try:
        return load(path) if load else yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RunDirError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); restore the file") from None
    except UnicodeDecodeError as e:
        raise RunDirError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); restore the file") from None


def read_text_lines(path, key):
    """The lines of a UTF-8 text file (a leading BOM skipped); a missing or non-UTF-8 file is a DataError naming
    `key`, the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path}: file not found")
    blob = path.read_bytes()
    try:
        return blob.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise DataError(f"{key}: {path}:{line}: not valid UTF-8 ({e.reason}); save it as UTF-8 text") from None


@contextmanager
def replacing(path, size=None):
    """Yield a temporary path beside `path` and rename it into place on success: a reader never sees half a
    file (every file LARK writes goes through here). A full disk (ENOSPC) raises DiskFull naming the path and
    `size`, the bytes being written; the temporary file goes either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        faults.point("write")
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(path, size) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(path, size=None):
    """The DiskFull error of a write of `size` bytes (None: unknown) to `path` that found no space."""
    folder = Path(path).parent
    while not folder.exists():
        folder = folder.parent
    needed = "" if size is None else f"{size:,} bytes needed, "
    return DiskFull(
        f"{path}: no space left on the device ({needed}{shutil.disk_usage(folder).free:,} free); nothing "
        "partial was kept: free space, then run the same command again (train.py: with resume=true)"
    )


def write_jsonl(records, path):
    write_lines((json.dumps(r, ensure_ascii=False) for r in records), path)


def write_lines(lines, path):
    """Each of `lines` (text without its line break: a JSON object made by the caller, lark.kernel.tokens) as one
    line of `path`, replaced whole (nothing partial on a failure)."""
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def write_json(path, obj):
    text = json.dumps(obj, indent=2)
    with replacing(path, len(text.encode())) as tmp:
        tmp.write_text(text)


def write_csv(path, rows, columns=None):
    """rows (dicts) as CSV; columns: the header (default: every key, in order of first appearance). None and
    missing values are written as empty cells."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)


# ------------------------------------------------------------------------------------------------ checksums
CHUNK = 2**20  # bytes read and hashed at a time
CHECKSUM = "checksum"  # a safetensors header's metadata key: '"sha256:<hex>"' (JSON, as LARK's other header
# fields) of the header and the tensor bytes
MANIFEST = "checksums.json"  # a folder's {relative path: "sha256:<hex>"} of every file in it


def sha256(*parts):
    """ "sha256:<hex>" of byte strings and of iterables of byte strings (chunks), in order."""
    h = hashlib.sha256()
    for part in parts:
        for chunk in [part] if isinstance(part, (bytes, bytearray, memoryview)) else part:
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def chunks(path, start=0):
    """The bytes of a file from `start` on, CHUNK at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            yield chunk


def canonical(header):
    """A safetensors header as its checksum covers it: keys sorted, without the checksum itself."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CHECKSUM}
    return json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode()


def seal(blob):
    """The parts (length, header, tensor bytes) of safetensors bytes `blob` with the checksum in its header
    metadata and the header's keys sorted (equal contents give byte-identical files)."""
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8 : 8 + n]), memoryview(blob)[8 + n :]
    header.setdefault("__metadata__", {})[CHECKSUM] = json.dumps(sha256(canonical(header), data))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the tensor bytes to 8
    return [len(text).to_bytes(8, "little"), text, data]


def check_safetensors(path):
    """True when a safetensors file matches the checksum in its header, False when it has none (written before
    LARK checksummed: unverified); CorruptFile when it does not match, is cut short or has an unreadable header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else size
        raw = f.read(n) if 8 + n <= size else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: unreadable or cut-short header (corrupted or truncated after it was written)")
    meta = header.get("__metadata__") or {}
    if CHECKSUM not in meta:
        if b"sha256:" in raw:  # it had one: a key on the way to it was hit
            raise CorruptFile(f"{path}: damaged header (corrupted after it was written)")
        return False
    if json.dumps(sha256(canonical(header), chunks(path, 8 + n))) != meta[CHECKSUM]:
        raise CorruptFile(f"{path}: checksum mismatch (corrupted or truncated after it was written)")
    return True


def write_manifest(folder, patterns=("*",)):
    """checksums.json in `folder`: the sha256 of every file in it whose path relative to it matches one of
    `patterns` (pathlib's match: "*" every file, "sources/*" those of sources/). Write it last, before the folder's
    rename, or once the files it lists are final."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and any(p.relative_to(folder).match(g) for g in patterns)
    )
    write_json(folder / MANIFEST, {p.relative_to(folder).as_posix(): sha256(chunks(p)) for p in files})


@contextmanager
def replacing_folder(folder):
    """Yield an empty temporary folder beside `folder` (<name>.tmp<pid>: unique per process, and a leftover
    lark.rundir recognises); once filled (the caller writes its checksums.json, write_manifest, over the files it
    lists) it replaces `folder` whole, so a reader sees the old folder or the new one, never part of one. Should
    another process have put a complete copy there meanwhile (parallel sweep jobs share a cache), theirs is kept.
    The temporary folder goes either way."""
    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(folder) from None
            if not (folder / MANIFEST).is_file():  # not another process's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_manifest(folder):
    """True when every file listed in `folder`/checksums.json matches, False when the folder has none (written
    before LARK checksummed: unverified); CorruptFile naming the first file that is missing or does not match."""
    folder, path = Path(folder), Path(folder) / MANIFEST
    if not path.is_file():
        return False
    try:
        listed = json.loads(path.read_text())
    except ValueError:
        raise CorruptFile(f"{path}: unreadable (corrupted after it was written)") from None
    if not isinstance(listed, dict):  # valid JSON but not the {file: checksum} object write_manifest writes
        raise CorruptFile(
            f"{path}: expected a JSON object of file checksums, got {type(listed).__name__} (corrupted or "
            "overwritten after it was written)"
        )
    for name, want in listed.items():
        if not (folder / name).is_file() or sha256(chunks(folder / name)) != want:
            raise CorruptFile(
                f"{folder / name}: checksum mismatch (corrupted, truncated or removed after it was written)"
            )
    return True
