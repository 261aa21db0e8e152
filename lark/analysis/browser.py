"""Headless Chromium for the report's checks (tests, benchmarks/report_scale.py, docs screenshots): the DOM
after the page's scripts ran, and a screenshot. Debian's `chromium` package; `.ci/run` installs it when absent."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find():
    """The Chromium executable on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def run(url, *flags, timeout=120):
    """(stdout, seconds) of one headless Chromium process on `url` with its own empty profile."""
    exe = find()
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="lark-chromium-") as profile:
        start = time.perf_counter()
        done = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *flags, url], capture_output=True, text=True, timeout=timeout
        )
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout, seconds


def file_url(path, query=""):
    return Path(path).resolve().as_uri() + (f"?{query}" if query else "")


def dump_dom(path, query="", timeout=120):
    """(serialised DOM after load, seconds of the Chromium process) of a local HTML file."""
    return run(file_url(path, query), "--dump-dom", timeout=timeout)


def screenshot(path, png, query="", size=(1280, 1400), timeout=120):
    """A PNG screenshot of a local HTML file at `size` (width, height); returns the Chromium process seconds."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _, seconds = run(
        file_url(path, query), f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", timeout=timeout
    )
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot {png}")
    return seconds
