"""Named points where the process can be made to kill itself with SIGKILL, for the kill-and-resume tests:
LARK_KILL_AT=<point>:<n> kills at the n-th time <point> is reached (n defaults to 1).

Points: pretrain_step and train_step (after an optimizer step's batch), write (inside every atomic write, after
the temporary file is complete and before it is renamed), checkpoint (the same, for Lightning's resume
checkpoint), shard (after an attribution shard or store is written)."""

import os
import signal
from collections import Counter

_seen = Counter()


def point(name):
    target = os.environ.get("LARK_KILL_AT")
    if not target:
        return
    want, _, n = target.partition(":")
    if want == name:
        _seen[name] += 1
        if _seen[name] == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)
