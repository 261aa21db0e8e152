"""The benchmark scripts run end to end on the tiny model and print what docs/benchmarks.md quotes."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(?:[-0-9.]+|nan)"


def run(script, *args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_attribution_speed_prints_paired_rows_with_fidelity_and_the_jl_reference():
    out = run("attribution_speed.py", "--models", "tiny-olmo3", "--ks", "1024", "--repeats", "2",
              "--fidelity-examples", "6", "--no-peers")
    rows = {m.group(1).strip(): [float(x) for x in m.group(2).split()]
            for m in re.finditer(rf"^tiny-olmo3\s+(\S[\w ()]*?)\s+(?:-|1024)\s+((?:{NUMBER}\s*){{7}})$", out, re.M)}
    assert set(rows) == {"train step", "floor (no weight GEMMs)", "sketch", "sketch per_tensor", "rapidin"}, out
    for label in ("sketch", "sketch per_tensor", "rapidin"):
        examples, speed, peak, peak_ratio, pearson, jl, error = rows[label]
        assert examples > 0 and 0.05 < speed < 5 and peak > 0 and 0.5 < peak_ratio < 3
        assert 0 < jl < 1 and -1 <= pearson <= 1 and 0 <= error < 1
    assert rows["sketch per_tensor"][5] != rows["sketch"][5]     # its own exact (per-tensor) reference
    ratio = re.search(r"^# tiny-olmo3: sketch per_tensor at k = 1024: ([0-9.]+) x the time of sketch without "
                      r"normalisation \(median of 2 paired ratios\)$", out, re.M)
    assert ratio and 0.2 < float(ratio.group(1)) < 5, out


def test_projection_noise_prints_the_jl_expectation_the_gaussian_and_the_sketch():
    out = run("projection_noise.py", "--models", "tiny-olmo3", "--ks", "256", "1024", "--seeds", "1",
              "--fidelity-examples", "6", "--gaussian-budget", "1e9")
    rows = re.findall(rf"^tiny-olmo3\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER}) \[", out, re.M)
    assert [int(r[0]) for r in rows] == [256, 1024], out
    expected = [float(r[2]) for r in rows]
    assert 0 < expected[0] < expected[1] < 1                    # more dimensions, less noise
    assert all(-1 <= float(r[3]) <= 1 for r in rows)           # the dense Gaussian was measured (P * k <= 1e9)
    assert re.search(r"# tiny-olmo3: [\d,]+ parameters; Pearson 0.99 needs k >= [\d,]+", out)
