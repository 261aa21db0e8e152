"""One batch of mini-LDS retrains as a child process that can be found again: a validate.py killed with -9 cannot
stop the `train.py -m` it launched (nor that one's joblib workers, which go on training and writing into the
subset folders), so every process of a batch carries a token in its environment, recorded in
<lds dir>/retrains.json; the next validate.py stops whatever still carries it before touching the folders."""

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from lark.data.io import write_json

STATE = "retrains.json"  # the running batch: {token, pid}
LOG = "retrains.log"  # the batches' stdout and stderr, appended
ENV = "LARK_LDS_BATCH"  # the environment variable that marks a batch's processes


def members(token, proc=Path("/proc")):
    """pids of the live processes whose environment carries ENV=token (Linux /proc; [] where there is none)."""
    marker = f"{ENV}={token}".encode()
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def stop_stale(base, log=print, wait_s=30.0):
    """Stop the processes of a batch that an earlier, killed validate.py left running in `base`; returns their
    pids. Waits (up to wait_s) until they are gone, so that nothing writes into the subset folders afterwards."""
    state = Path(base) / STATE
    try:
        token = json.loads(state.read_text())["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    pids = [p for p in members(token) if p != os.getpid()]
    if pids:
        log(f"[lark] mini-LDS: stopping {len(pids)} retrain processes left running by an interrupted validation")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while members(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = members(token)
    if left:
        raise RuntimeError(f"mini-LDS: retrain processes {left} of an earlier validation in {base} did not stop")
    state.unlink(missing_ok=True)
    return pids


def launch(command, base):
    """Popen of `command` (its own session, output appended to base/retrains.log), recorded in base/retrains.json."""
    base = Path(base)
    token = uuid.uuid4().hex
    with open(base / LOG, "ab") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, ENV: token}, start_new_session=True
        )
    write_json(base / STATE, {"token": token, "pid": proc.pid})
    return proc


def watch(proc, pending, on_poll, poll_s=1.0):
    """Call on_poll(seed) -> bool for each pending seed every poll_s until proc ends (a last round after it ended);
    returns the seeds on_poll never accepted. on_poll records a finished retrain as soon as it is there."""
    pending = list(pending)
    while pending:
        ended = proc.poll() is not None
        pending = [seed for seed in pending if not on_poll(seed)]
        if ended:
            break
        time.sleep(poll_s)
    proc.wait()
    return pending


def log_tail(base, chars=3000):
    """The end of base/retrains.log (for an error message)."""
    try:
        return (Path(base) / LOG).read_text(errors="replace")[-chars:]
    except OSError:
        return ""
