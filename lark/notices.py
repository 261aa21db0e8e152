"""Warnings a user must not miss (a shortfall, a cut, an evaluation that scores nothing): one `[lark] warning:` line
each on the console, and kept in the run's data/warnings.json so that every metrics.json carries them too
(`warnings`, {key: {message, counts...}}).

    warn(run_dir, "cut", "3 of 60 fine-tuning items longer than max_length=512 ...", log, cut=3, total=60)
    read(run_dir)   # -> {"cut": {"message": ..., "cut": 3, "total": 60}}
"""

import json
from pathlib import Path

from lark.data.io import write_json

FILE = Path("data") / "warnings.json"


def read(run_dir):
    """The run's warnings so far ({} when none)."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def warn(run_dir, key, message, log=print, **counts):
    """Print one `[lark] warning:` line and record it under `key` (a rerun replaces it: resumes do not pile up)."""
    log(f"[lark] warning: {message}")
    if run_dir is not None:
        write_json(Path(run_dir) / FILE, read(run_dir) | {key: {"message": message, **counts}})
