"""Named points where the process can be made to kill itself with SIGKILL, for the kill-and-resume tests:
LARK_KILL_AT=<point>:<n> kills at the n-th time <point> is reached (n defaults to 1); LARK_DISK_FULL_AT=<point>:<n>
raises OSError(ENOSPC) there instead, as a full disk would (the full-disk tests).

Points: pretrain_step and train_step (after an optimizer step's batch), write (inside every atomic write, after
the temporary file is complete and before it is renamed), checkpoint (the same, for Lightning's resume
checkpoint), shard (after an attribution shard or store is written)."""

import errno
import os
import signal
from collections import Counter

_seen = Counter()


def point(name):
    for variable in ("LARK_KILL_AT", "LARK_DISK_FULL_AT"):
        want, _, n = os.environ.get(variable, "").partition(":")
        if want != name:
            continue
        _seen[variable, name] += 1
        if _seen[variable, name] != int(n or 1):
            continue
        if variable == "LARK_KILL_AT":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, f"No space left on device ({variable}={name}:{n or 1})")
