"""The benchmark scripts run end to end on the tiny model and print what docs/benchmarks.md quotes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(?:[-0-9.]+|nan)"


def run(script, *args):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_attribution_speed_prints_paired_rows_with_fidelity_and_the_jl_reference():
    out = run(
        "attribution_speed.py",
        "--models",
        "tiny-olmo3",
        "--ks",
        "1024",
        "--repeats",
        "2",
        "--fidelity-examples",
        "6",
        "--no-peers",
    )
    rows = {
        m.group(1).strip(): [float(x) for x in m.group(2).split()]
        for m in re.finditer(rf"^tiny-olmo3\s+(\S[\w ()]*?)\s+(?:-|1024)\s+((?:{NUMBER}\s*){{8}})$", out, re.M)
    }
    assert {"train step", "floor (no weight GEMMs)", "sketch", "rapidin"} <= set(rows), out  # more rows may come
    sketch, rapidin = rows["sketch"], rows["rapidin"]
    for label, (examples, speed, peak, peak_ratio, pearson, jl, error, _) in (("sketch", sketch), ("rapidin", rapidin)):
        assert examples > 0 and peak > 0 and 0 < jl < 1, label
        # what docs/benchmarks.md claims: a count sketch is about as faithful as a dense JL projection to the
        # same k (0.74-0.78 on the tiny model at k=1,024; few pairs here, hence the margin), never far off
        assert pearson > jl - 0.25 and pearson > 0.4 and error < 0.35, (label, pearson, jl, error)
        assert peak_ratio < 1.6, (label, peak_ratio)  # peak memory near a training step's
    # (no speed comparison here: timings are the benchmark's table, and a loaded CI machine inverted one, 0.49x
    # against 8.47x; a timed assertion is a flaky test)
    assert "sketch per_tensor" in rows, out
    examples, speed, peak, peak_ratio, pearson, jl, error, _ = rows["sketch per_tensor"]
    assert examples > 0 and peak > 0 and 0 < jl < 1 and jl != sketch[5]  # its own exact (per-tensor) reference
    assert pearson > jl - 0.25 and pearson > 0.4 and error < 0.35, (pearson, jl, error)
    ratio = re.search(
        r"^# tiny-olmo3: sketch per_tensor at k = 1024: ([0-9.]+) x the time of sketch without "
        r"normalisation \(median of 2 paired ratios\)$",
        out,
        re.M,
    )
    assert ratio and 0.2 < float(ratio.group(1)) < 5, out


def test_projection_noise_prints_the_jl_expectation_the_gaussian_and_the_sketch():
    out = run(
        "projection_noise.py",
        "--models",
        "tiny-olmo3",
        "--ks",
        "256",
        "1024",
        "--seeds",
        "1",
        "--fidelity-examples",
        "6",
        "--gaussian-budget",
        "1e9",
    )
    rows = re.findall(rf"^tiny-olmo3\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER}) \[", out, re.M)
    assert [int(r[0]) for r in rows] == [256, 1024], out
    expected = [float(r[2]) for r in rows]
    assert 0 < expected[0] < expected[1] < 1  # more dimensions, less noise
    # at k = 1,024 the measured Pearson of the dense Gaussian and of the sketch agree with the JL expectation printed
    # beside them (8 pairs only, hence the margin; at k = 256 the pairs' noise alone is larger than that)
    _, _, jl, gaussian, sketch = rows[1]
    assert abs(float(gaussian) - float(jl)) < 0.2 and abs(float(sketch) - float(jl)) < 0.2, rows
    assert re.search(r"# tiny-olmo3: [\d,]+ parameters; Pearson 0.99 needs k >= [\d,]+", out)
