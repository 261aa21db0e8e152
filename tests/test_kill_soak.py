"""benchmarks/kill_soak.py end to end at its smallest: a 2-epoch miniature run killed twice (once while the tiny model
pretrains, once in training) and its validation killed once during the LDS retrains; every kill resumed, the
results equal the uninterrupted run's, and the table and SUMMARY say so."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_kill_soak_kills_resumes_and_finds_the_runs_identical(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/kill_soak.py",
            "--small",
            "--threads",
            "1",
            "--kills",
            "2",
            "--validate-kills",
            "1",
        ]
        + ["--work", str(tmp_path / "soak")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "kill #" not in line][
        2:
    ]  # the last table
    assert len(rows) == 3, out.stdout
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[1] for c in cells] == ["train.py", "train.py", "validate.py"]
    assert cells[0][2] == "pretraining" and cells[0][3] == "pretraining"  # the kill landed where it was aimed
    assert cells[1][2].startswith("training")
    assert cells[2][3].startswith("retraining")
    assert all(c[5] == "yes" and c[6] == "yes" for c in cells)  # resumed ok, identical
    assert "SUMMARY: PASS" in out.stdout and "final run identical" in out.stdout
