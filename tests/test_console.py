"""The console of `python train.py` (lark.console): a tiny run, pretraining included, printed through Hydra's
logging as a user sees it: no line twice, none of the third-party notices, no progress bars off a terminal,
and a closing summary with Table II and the paths of tables, figures, report and W&B run."""

import collections
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL

pytestmark = pytest.mark.slow
NOTICES = [
    "litlogger",
    "Tip:",
    "anonymous setting",
    "Images sizes do not match",
    "/-",
    "LeafSpec",
    "Writing model shards",
    "Loading weights",
    "Traceback",
    "\r",
]


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    """(stdout + stderr, run dir) of train.py with W&B (offline) and a fresh model cache, so pretraining runs."""
    tmp = tmp_path_factory.mktemp("console")
    overrides = [o for o in SMALL if not o.startswith(("trainer.max_epochs", "trainer.enable_progress_bar"))]
    env = dict(os.environ, LARK_CACHE=str(tmp / "cache"), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            *overrides,
            "trainer.max_epochs=1",
            "logger=wandb",
            "attribution.tokens=topk",  # the W&B table's top_tokens column (off by default)
            "attribution.tokens_top_k=1",
            f"hydra.run.dir={tmp / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, tmp / "run"


def test_no_line_twice_and_no_notices(console):
    out, _ = console
    lines = [line for line in out.splitlines() if line.strip() and not re.fullmatch(r"\|[-|]+\|", line)]
    twice = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert not twice, out
    assert [notice for notice in NOTICES if notice in out] == [], out
    assert "[lark] pretraining the tiny model" in out and "[lark] pretrained in" in out  # pretraining did run
    assert "INFO: GPU available: False, used: False" in lines  # Lightning's lines, once each


def test_summary_prints_table2_and_the_paths(console):
    out, run = console
    table2 = (run / "tables" / "table2.md").read_text().strip()
    assert table2 in out and out.index(table2) > out.index("[lark] epoch_001: test accuracy")
    paths = dict(re.findall(r"^\[lark\] (tables|figures|report|W&B run): +(\S+)", out, re.M))
    assert Path(paths["tables"]) == run / "tables" and Path(paths["figures"]) == run / "figures"
    assert Path(paths["report"]) == run / "report" / "index.html" and Path(paths["report"]).is_file()
    assert Path(paths["W&B run"]).parent == run / "wandb" and Path(paths["W&B run"]).is_dir()
    assert out.rstrip().endswith(f"[lark] outputs: {run}")


def test_wandb_tables_carry_document_text_and_the_report_is_an_artifact(console):
    _, run = console
    table = json.loads(
        Path(
            glob.glob(str(run / "wandb/offline-run-*/files/media/table/influence/epoch_001/top_k_*.table.json"))[0]
        ).read_text()
    )
    assert table["columns"] == ["query_id", "question", "source", "rank", "doc_id", "score", "text", "top_tokens"]
    docs = {}
    for path in (run / "data" / "sources").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            docs[(path.stem, row["id"])] = row
    for query, question, source, rank, doc, score, text, top_tokens in table["data"]:
        row = docs[(source, doc)]
        assert text and text.split()[0] in (row.get("text") or row["question"]) and question.endswith("?")
        assert (top_tokens is not None) == (rank <= 1)  # attribution.tokens_top_k: "piece (+0.012), ..."
    figures = sorted(
        Path(p).name.rsplit("_", 2)[0]
        for p in glob.glob(str(run / "wandb/offline-run-*/files/media/images/figures/*.png"))
    )
    assert figures == ["fig1_influence", "fig2_pt_wins", "fig3_method"]  # one key per figure
    record = Path(glob.glob(str(run / "wandb/offline-run-*/run-*.wandb"))[0]).read_bytes()
    assert b"index.html" in record and b"report" in record  # the artifact entry of the page


def test_train_log_holds_the_whole_console(console):
    """train.log (Hydra's file handler) holds every console line, the `[lark]` lines and Lightning's, each once and
    timestamped; progress-bar redraws stay on the console."""
    out, run = console
    log = (run / "train.log").read_text()
    stamped = re.findall(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\]\[[\w.]+\]\[\w+\] - (.*)$", log, re.M)
    assert len(stamped) == len(log.strip().splitlines()), log  # every line timestamped
    console_lines = [line for line in out.splitlines() if line.strip()]
    body = [re.sub(r"^(INFO|WARNING|ERROR): ", "", line) for line in console_lines]
    assert [line for line in body if line not in stamped] == [], log
    assert "[lark] pretraining the tiny model" in log and f"[lark] outputs: {run}" in log
    twice = [line for line, n in collections.Counter(stamped).items() if n > 1 and not re.fullmatch(r"\|[-|]+\|", line)]
    assert twice == [], log  # no record doubled (a table's separator rows repeat)


def test_each_sweep_job_logs_its_console_to_its_own_file(tmp_path, monkeypatch):
    """Hydra gives each job of a sweep its own <task>.log handler; the console's lines went on into the first
    job's file (the Tee kept its handler)."""
    import logging
    import sys

    from lark.console import Tee, tee_to_log

    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    root = logging.getLogger()
    for job in ("0", "1"):
        handler = logging.FileHandler(tmp_path / f"{job}.log")
        monkeypatch.setattr(root, "handlers", [handler])
        tee_to_log()
        print(f"[lark] job {job} says hello")
        handler.flush()
    assert isinstance(sys.stdout, Tee)
    assert "job 0" in (tmp_path / "0.log").read_text() and "job 1" not in (tmp_path / "0.log").read_text()
    assert "job 1" in (tmp_path / "1.log").read_text()


def test_a_resumes_checkpoint_folder_notice_is_dropped():
    """Every resume=true printed Lightning's `Checkpoint directory <run>/resume exists and is not empty.`: the folder
    a resume reads is expected to hold its checkpoint; the notice stays for any other folder."""
    import warnings

    from lark import console

    console.setup()
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("Checkpoint directory /r/resume exists and is not empty.", UserWarning, stacklevel=1)
        warnings.warn("Checkpoint directory /r/mine exists and is not empty.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["Checkpoint directory /r/mine exists and is not empty."]
