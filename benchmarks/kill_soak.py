"""Kill soak: SIGKILL `python train.py` and `python validate.py` at seeded random moments spread over a run's
phases, resume after each kill with the documented command, and check that the end equals an uninterrupted run.

    python benchmarks/kill_soak.py                              # 20 train.py kills + 5 validate.py kills
    python benchmarks/kill_soak.py --kills 2 --validate-kills 1 --small   # the test's size (minutes)

train.py: the embedded default (--small: a 2-epoch miniature), one uninterrupted reference run, then one chain
of kills in a second folder: each kill is followed by `python train.py <same overrides> hydra.run.dir=<run>
resume=true` (the README's command), which the next kill interrupts again, until a resume finishes. Both runs
pretrain the tiny model in fresh cache folders, so kills land in pretraining too. Each kill targets one phase
(round robin over the six, at a seeded random epoch, occurrence and delay); the phase it landed in is read from
what the killed process left (the `*.tmp<pid>` of the write in flight) and printed:
  pretraining   the tiny model is being pretrained (stdout: "pretraining the tiny model", no "pretrained in")
  training      optimizer steps between two epochs' attribution
  checkpoint    writing checkpoints/epoch_NNN or resume/last.ckpt (a .tmp file or folder there)
  store         projecting gradients into, or writing, attribution/epoch_NNN/stores|shards
  scoring       every store of an epoch written, its score matrices and metrics.json not all yet
  analysis      every epoch's metrics.json written: TracIn-CP, tables, figures, report
validate.py: `validate.py run_dir=<run> <--validate args>` on copies of the finished run, one uninterrupted, one
killed while the LDS retrains run (its whole process tree, as a lost node does, and last validate.py alone, as
`kill -9 <pid>` does: its retrain processes live on) and while Table V is scored, rerun with the same
command after each kill.

Compared (train.py): every file under the run folder byte for byte, except .hydra/ (the command line: resume=true),
*.log (times), wandb/ (run ids, times), report/ (timings), checkpoints' lark_config.yaml (holds resume=true); the
resume state resume/last.ckpt tensor for tensor and value for value (Lightning pickles it with its own version and
its ModelCheckpoint callback's paths: that callback's state is left out); the pretrained base model in the cache
byte for byte. validate.py: validation.json's rows without their seconds, every subset's query_losses.json and
final model.safetensors byte for byte; and no retrain process may be left running.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("pretraining", "training", "checkpoint", "store", "scoring", "analysis")
SMALL = [
    "data.world.n_train=24",
    "data.world.n_test=12",
    "data.world.n_facts=30",
    "data.world.n_medical_docs=100",
    "data.world.n_entertainment_docs=40",
    "model.tokenizer.vocab_size=512",
    "model.pretrain.steps=30",
    "model.pretrain.batch_size=8",
    "model.pretrain.max_length=64",
    "source.size=8",
    "max_length=128",
    "attribution.projector.k=512",
    "trainer.max_epochs=2",
]
VALIDATE = ["kernels=[cosine]", "lds.n_subsets=8", "lds.n_boot=200", "checkpoints=[0,5]"]
VALIDATE_SMALL = ["kernels=[cosine]", "lds.n_subsets=4", "lds.n_boot=100", "checkpoints=[0,2]"]
POLL_S = 0.005  # seconds between looks at the run folder (a small run's writes last tens of milliseconds)
THREADS = None  # --threads: OMP_NUM_THREADS of every killed script (None: torch's default)
TMP = re.compile(r"\.tmp\d+$")  # the temporaries of lark.data.io.replacing and lark.models.save_checkpoint


class Victim:
    """A LARK script as a subprocess: its stdout lines with their times (seconds in), read by a thread."""

    def __init__(self, argv, cache):
        env = {**os.environ, "LARK_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["PYTHONUNBUFFERED"] = "1"  # a pipe would hold the phase lines back until a buffer fills
        env.update({"OMP_NUM_THREADS": str(THREADS)} if THREADS else {})
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def seen(self, text):
        """Seconds in at which a line containing text was printed, or None."""
        return next((t for t, line in list(self.lines) if text in line), None)

    def elapsed(self):
        return time.monotonic() - self.start

    def kill(self):
        self.proc.kill()
        return self.finish()

    def finish(self):
        code = self.proc.wait()
        self.reader.join()
        return code

    def tail(self, n=25):
        return "\n".join(line for _, line in self.lines[-n:])


def tmp_files(folder, pid=None):
    """Temporaries of writes in flight under folder; pid: only that process's (not those an earlier kill left,
    which a resume deletes once it has started)."""
    if not Path(folder).is_dir():
        return []
    return [p for p in Path(folder).rglob("*") if TMP.search(p.name) and (pid is None or p.name.endswith(f"tmp{pid}"))]


# ------------------------------------------------------------------------------------------- train.py: phases
def epoch_state(run, epoch):
    """(stores written, metrics.json written) of one epoch's attribution."""
    folder = run / "attribution" / f"epoch_{epoch:03d}"
    return len(list((folder / "stores").glob("*.safetensors"))), (folder / "metrics.json").is_file()


def landed(run, cache, victim, n_epochs, n_sets):
    """The phase a killed train.py was in: the temporary its write in flight left, else its files and stdout."""
    for path in tmp_files(cache, victim.proc.pid):
        return "pretraining"
    for path in tmp_files(run, victim.proc.pid):
        top = path.relative_to(run).parts
        if top[0] in ("checkpoints", "resume"):
            return "checkpoint"
        if top[0] == "attribution":
            return "store" if {"stores", "shards"} & set(top) else "scoring"
        return "analysis" if top[0] in ("tables", "figures", "report") else f"writing {top[0]}"
    if victim.seen("pretraining the tiny model") is not None and victim.seen("pretrained in") is None:
        return "pretraining"
    if victim.seen("sketch self-check") is None:  # data, model and config checks before the trainer starts
        return "startup"
    states = [epoch_state(run, e) for e in range(n_epochs + 1)]
    if all(done for _, done in states):
        return "analysis"
    for e, (stores, done) in enumerate(states):
        if not done and (run / "checkpoints" / f"epoch_{e:03d}").is_dir():
            return "scoring" if stores == n_sets else "store"
    return "training" if (run / "checkpoints" / "epoch_000").is_dir() else "startup"


def plan(n, n_epochs, with_pretraining, rng):
    """n kills (phase, epoch, kind, u) in the order a run meets them (the shorter delay first): phases round robin,
    the rest seeded."""
    phases = [p for p in PHASES if with_pretraining or p != "pretraining"]
    kills = []
    for i in range(n):
        phase = phases[i % len(phases)]
        epoch = {"pretraining": -1, "analysis": n_epochs + 1, "training": rng.randint(1, n_epochs)}.get(
            phase, rng.randint(0, n_epochs)
        )
        kind = rng.choice(["folder", "last.ckpt"]) if phase == "checkpoint" and epoch >= 1 else "folder"
        kills.append((phase, epoch, kind, round(rng.random(), 3)))
    order = {"training": 0, "checkpoint": 1, "store": 2, "scoring": 3}
    return sorted(kills, key=lambda k: (k[1], order.get(k[0], 0) + (3.5 if k[2] == "last.ckpt" else 0), k[3]))


def triggered(kill, run, victim, state, windows):
    """Whether to kill now: kill's trigger seen (state["t0"]: when) and its random delay u * window past.
    state["before"]: the epochs complete when this process started."""
    phase, epoch, kind, u = kill
    done, resumed = epoch_state(run, epoch)[1], victim.seen("[lark] resum") is not None
    if (
        phase in ("checkpoint", "store", "scoring")
        and kind == "folder"
        and done
        and (resumed or epoch not in state["before"])
    ):
        return True  # its moment passed unseen (a write faster than POLL_S): kill now, the landed phase says where
    if phase == "checkpoint" and kind == "last.ckpt" and resumed and done and written_after(run, epoch):
        return True  # this epoch's last.ckpt was written before this process: the same
    if phase == "checkpoint":
        if kind == "last.ckpt":
            return epoch_state(run, epoch)[1] and any(
                p.name.startswith("last.ckpt") for p in tmp_files(run / "resume", victim.proc.pid)
            )
        return any(p.name.startswith(f"epoch_{epoch:03d}") for p in tmp_files(run / "checkpoints", victim.proc.pid))
    if phase == "store" and tmp_files(run / "attribution" / f"epoch_{epoch:03d}" / "stores", victim.proc.pid):
        return True
    if state.get("t0") is None:
        if phase == "pretraining":
            fired = victim.seen("pretraining the tiny model") is not None
        elif phase == "training":  # resumed: "resuming from" / "resume: no last.ckpt" (the trainer started)
            fired = epoch_state(run, epoch - 1)[1] and (resumed or epoch - 1 not in state["before"])
        elif victim.seen("sketch self-check") is None:  # stores reused from before: not this process's work
            fired = False
        elif phase == "store":  # projecting gradients between two stores' writes
            fired = 0 < epoch_state(run, epoch)[0] < state["n_sets"]
        elif phase == "scoring":
            fired = epoch_state(run, epoch)[0] == state["n_sets"] and not done
        else:
            fired = victim.seen("`Trainer.fit` stopped") is not None
        state["t0"] = victim.elapsed() if fired else None
    share = {"pretraining": 0.7, "analysis": 0.5}.get(phase, 0.9)  # rounded; the reference's exit included
    return state.get("t0") is not None and victim.elapsed() >= state["t0"] + u * share * windows[phase]


def written_after(run, epoch):
    """Whether resume/last.ckpt was written after epoch's metrics.json (that epoch's resume state is saved)."""
    last, metrics = run / "resume" / "last.ckpt", run / "attribution" / f"epoch_{epoch:03d}" / "metrics.json"
    return last.is_file() and metrics.is_file() and last.stat().st_mtime >= metrics.stat().st_mtime


def reference_windows(victim, run, n_epochs):
    """Watch an uninterrupted train.py: ({phase: seconds it lasts, per epoch}, number of stores per epoch)."""
    seen = {}
    while victim.proc.poll() is None:
        for e in range(n_epochs + 1):
            stores, done = epoch_state(run, e)
            marks = {("ckpt", e): (run / "checkpoints" / f"epoch_{e:03d}").is_dir(), ("metrics", e): done}
            marks.update({("stores", e, stores): stores > 0})
            for key, hit in marks.items():
                if hit:
                    seen.setdefault(key, victim.elapsed())
        time.sleep(POLL_S)
    end, code = victim.elapsed(), victim.finish()
    if code != 0:
        raise SystemExit(f"the reference run failed (exit {code}):\n{victim.tail()}")
    n_sets = max(k[2] for k in seen if k[0] == "stores" and k[1] == 0)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    epochs = range(n_epochs + 1)
    pre = re.search(r"pretrained in (\d+) s", "\n".join(line for _, line in victim.lines))
    return {
        "pretraining": float(pre.group(1)) if pre else 1.0,
        "training": mean([seen[("ckpt", e)] - seen[("metrics", e - 1)] for e in epochs if e]),
        "store": mean([seen[("stores", e, n_sets)] - seen[("stores", e, 1)] for e in epochs]),
        "scoring": mean([seen[("metrics", e)] - seen[("stores", e, n_sets)] for e in epochs]),
        "analysis": end - (victim.seen("`Trainer.fit` stopped") or end),
    }, n_sets


def train_chain(argv, run, cache, kills, windows, n_epochs, n_sets):
    """Kill train.py at each of kills in turn, resuming after each; rows of what happened and the last exit."""
    rows, pending, resume = [], list(kills), False
    while True:
        victim = Victim(argv + (["resume=true"] if resume else []), cache)
        if rows:
            rows[-1]["resumed ok"] = True  # set False below if this process fails
        state = {"before": {e for e in range(n_epochs + 1) if epoch_state(run, e)[1]}, "n_sets": n_sets}
        while victim.proc.poll() is None and pending and not triggered(pending[0], run, victim, state, windows):
            if pending[0][0] == "pretraining" and victim.seen("base model from cache") is not None:
                rows.append({"script": "train.py", "target": "pretraining", "landed": "(skipped: model cached)"})
                pending.pop(0)  # an earlier kill let pretraining finish: this one cannot happen any more
                continue
            time.sleep(POLL_S)
        if victim.proc.poll() is not None or not pending:
            code = victim.finish()
            if rows and code != 0:
                rows[-1]["resumed ok"] = False
            rows += [{"script": "train.py", "target": k[0], "landed": "(run ended first)"} for k in pending]
            return rows, code, victim
        seconds = victim.elapsed()
        victim.kill()
        phase, epoch, kind, _ = pending.pop(0)
        where = f"{phase} ({kind})" if kind != "folder" else phase
        target = where + (f", epoch {epoch}" if 0 <= epoch <= n_epochs else "")
        rows.append(
            {
                "script": "train.py",
                "target": target,
                "landed": landed(run, cache, victim, n_epochs, n_sets),
                "seconds in": f"{seconds:.1f}",
                "resumed ok": False,
            }
        )
        print(f"[soak] kill {len(rows)}: train.py, {rows[-1]['target']}: landed in {rows[-1]['landed']}", flush=True)
        resume = True


# ------------------------------------------------------------------------------------------- train.py: compare
def artifacts(run):
    """The files compared byte for byte (see the module docstring for what is left out and why)."""
    return sorted(
        p.relative_to(run)
        for p in run.rglob("*")
        if p.is_file()
        and not {".hydra", "wandb", "report"} & set(p.relative_to(run).parts)
        and p.suffix != ".log"
        and p.name not in ("lark_config.yaml", "last.ckpt")
    )


def same(a, b):
    """Exact equality of nested containers of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def differences(a, b, cache_a, cache_b):
    """What differs between two finished runs (and their pretrained base models); [] when they are identical."""
    files = artifacts(a)
    out = [f"file sets differ: {sorted(set(map(str, files)) ^ set(map(str, artifacts(b))))[:5]}"]
    out = out if files != artifacts(b) else []
    out += [f"{f} differs" for f in files if (b / f).is_file() and (a / f).read_bytes() != (b / f).read_bytes()]
    last_a, last_b = (torch.load(d / "resume" / "last.ckpt", weights_only=True) for d in (a, b))
    keys = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops")
    out += [f"resume/last.ckpt: {k} differs" for k in keys if not same(last_a.get(k), last_b.get(k))]
    shuffle = [d["callbacks"].get("ShuffleState") for d in (last_a, last_b)]  # ModelCheckpoint's holds run paths
    out += [] if shuffle[0] is not None and same(*shuffle) else ["resume/last.ckpt: the shuffle state differs"]
    base_a, base_b = sorted(cache_a.glob("tiny-olmo3-*")), sorted(cache_b.glob("tiny-olmo3-*"))
    out += [] if [p.name for p in base_a] == [p.name for p in base_b] else ["the pretrained base models differ"]
    for pa, pb in zip(base_a, base_b):
        out += [f"cache {f.name} differs" for f in pa.iterdir() if f.read_bytes() != (pb / f.name).read_bytes()]
    return out, len(files)


# ------------------------------------------------------------------------------------------- validate.py
def measured(run):
    """The subsets whose LDS retrain is measured (query_losses.json written)."""
    return list(run.glob("validation/lds/*/subset_*/query_losses.json"))


def validate_reference(argv, run, cache, n_subsets):
    """Watch an uninterrupted validate.py: {phase: seconds}: "gaps": for each count c, the seconds from the c-th
    measured subset to the next (for c = 0 from the retrain launch: the batch's start-up and first retrains), and
    "scoring" after the last. Retrains run n_jobs at a time, so
    subsets land in bunches: the gap after the first of a pair is a fraction of a second."""
    victim, times = Victim(argv, cache), []
    while victim.proc.poll() is None:
        times += [victim.elapsed()] * (len(measured(run)) - len(times))
        time.sleep(POLL_S)
    end, code = victim.elapsed(), victim.finish()
    if code != 0 or len(measured(run)) != n_subsets:
        raise SystemExit(f"the reference validation failed (exit {code}):\n{victim.tail()}")
    start = victim.seen("mini-LDS: retraining") or 0.0
    gaps = [b - a for a, b in zip([start, *times], times)]
    return {"gaps": gaps, "scoring": end - times[-1]}


def descendants(pid):
    """pid and every process below it (Linux /proc)."""
    children = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def validate_plan(n_kills, windows, rng):
    """(phase, after this many measured subsets, how: "alone" | "tree", u): the retrain kills kill validate.py's
    whole process tree (a lost node or a cancelled job: the retrains in flight die too), the last one validate.py
    alone (`kill -9 <pid>`: its retrains live on and finish); with two kills or more the last one is made while
    Table V is scored. A retrain kill aims after a count whose gap to the next measured subset is long (a quarter of
    the longest or more): after the first of a pair that lands together there is no moment to hit."""
    gaps = windows["gaps"]
    n_subsets, scoring = len(gaps), n_kills >= 2
    counts = [c for c, gap in enumerate(gaps) if gap >= 0.25 * max(gaps)]
    kills = sorted((rng.choice(counts), rng.random()) for _ in range(n_kills - scoring))
    last = len(kills) - 1  # killed alone, the retrains in flight finish: nothing may be left for a later kill
    kills = [("retraining", c, "alone" if i == last else "tree", u) for i, (c, u) in enumerate(kills)]
    return kills + ([("scoring", n_subsets, "alone", rng.random())] if scoring else [])


def validate_trigger(kill, run, victim, state, windows):
    """Whether to kill validate.py now (state["t0"]: when kill's trigger was seen)."""
    phase, count, _, u = kill
    if state.get("t0") is None and victim.seen("[lark] validate") is None:
        if phase == "scoring":
            state["t0"] = victim.elapsed() if len(measured(run)) == count else None
        elif victim.seen("mini-LDS: retraining") is not None:
            already = len(measured(run)) >= count and state["at_start"] >= count  # measured before this process
            state["window"] = windows["gaps"][0 if already else count]
            state["t0"] = victim.elapsed() if len(measured(run)) >= count else None
        state.setdefault("window", windows["scoring"])
    return state.get("t0") is not None and victim.elapsed() >= state["t0"] + u * 0.5 * state["window"]


def validate_chain(argv, run, cache, kills, n_subsets, windows):
    """Kill validate.py at each of kills (validate_plan) in turn, rerunning the same command after each."""
    rows = []
    while True:
        victim, state = Victim(argv, cache), {"at_start": len(measured(run))}
        if rows:
            rows[-1]["resumed ok"] = True
        while victim.proc.poll() is None and kills and not validate_trigger(kills[0], run, victim, state, windows):
            if kills[0][0] == "retraining" and victim.seen("[lark] validate") is not None:
                rows.append({"script": "validate.py", "target": "retraining", "landed": "(skipped: none left)"})
                kills.pop(0)  # an earlier kill let every retrain finish: this one cannot happen any more
                state = {"at_start": state["at_start"]}
                continue
            time.sleep(POLL_S)
        if victim.proc.poll() is not None or not kills:
            code = victim.finish()
            if rows and code != 0:
                rows[-1]["resumed ok"] = False
            rows += [{"script": "validate.py", "target": k[0], "landed": "(run ended first)"} for k in kills]
            return rows, code, victim
        seconds, done, (phase, count, how, _) = victim.elapsed(), len(measured(run)), kills.pop(0)
        pids = descendants(victim.proc.pid) if how == "tree" else [victim.proc.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        victim.finish()
        where = "scoring" if done == n_subsets else f"retraining ({done} of {n_subsets} measured)"
        what = "validate.py alone" if how == "alone" else f"its tree ({len(pids)} processes)"
        target = f"retraining (after {count} measured), {what}" if phase == "retraining" else f"scoring, {what}"
        rows.append({"script": "validate.py", "target": target, "landed": where, "seconds in": f"{seconds:.1f}"})
        rows[-1]["resumed ok"] = False
        print(f"[soak] kill {len(rows)}: validate.py, {target}: landed in {where}", flush=True)


def validation_differences(a, b):
    """What differs between two validations of the same run: Table V's values (not its seconds), each subset's
    measured losses and final weights; [] when identical."""

    def rows(run):
        data = json.loads((run / "validation" / "validation.json").read_text())["rows"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in data]

    out = [] if rows(a) == rows(b) else ["Table V (validation.json rows) differs"]
    files = sorted(
        p.relative_to(a)
        for p in a.glob("validation/lds/*/subset_*/**/*")
        if p.is_file() and (p.name == "query_losses.json" or p.name == "model.safetensors")
    )
    out += [f"{f} differs" for f in files if not (b / f).is_file() or (a / f).read_bytes() != (b / f).read_bytes()]
    return out, len(files)


def stray_retrains():
    """pids of processes still marked as mini-LDS retrains (lark.validation.batch's environment token)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if b"LARK_LDS_BATCH=" in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ------------------------------------------------------------------------------------------- main
def print_table(rows):
    columns = ["kill #", "script", "target", "landed", "seconds in", "resumed ok", "identical"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for i, row in enumerate(rows, 1):
        cells = [str(i)] + [str(row.get(c, "-")) for c in columns[1:]]
        print("| " + " | ".join(cells).replace("True", "yes").replace("False", "no") + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="train.py kills")
    ap.add_argument("--validate-kills", type=int, default=5, help="validate.py kills (0: no validation soak)")
    ap.add_argument("--seed", type=int, default=0, help="the kill plan")
    ap.add_argument("--small", action="store_true", help="a 2-epoch miniature run (the test)")
    ap.add_argument("--work", default=None, help="folder for the runs and caches (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the scripts (a shared machine: 1)")
    ap.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    work = Path(args.work or tempfile.mkdtemp(prefix="kill_soak_"))
    shutil.rmtree(work, ignore_errors=True)
    rng = random.Random(args.seed)
    overrides = (SMALL if args.small else []) + ["trainer.enable_progress_bar=false", *args.overrides]
    n_epochs = int(next((o.split("=")[1] for o in overrides[::-1] if o.startswith("trainer.max_epochs=")), 5))
    start = time.monotonic()
    ref, chain = work / "reference", work / "chain"
    argv = lambda d: ["train.py", *overrides, f"hydra.run.dir={d / 'run'}"]  # noqa: E731
    print(f"[soak] reference: python train.py {' '.join(overrides)} (fresh cache {ref / 'cache'})", flush=True)
    windows, n_sets = reference_windows(Victim(argv(ref), ref / "cache"), ref / "run", n_epochs)
    print(
        f"[soak] reference took {time.monotonic() - start:.0f} s; phase windows (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in windows.items()),
        flush=True,
    )
    kills = plan(args.kills, n_epochs, True, rng)
    rows, code, victim = train_chain(argv(chain), chain / "run", chain / "cache", kills, windows, n_epochs, n_sets)
    diff, n_files = (
        differences(ref / "run", chain / "run", ref / "cache", chain / "cache")
        if code == 0
        else ([f"the last resume failed (exit {code}):\n{victim.tail()}"], 0)
    )
    for row in rows:
        row["identical"] = not diff
    print(f"[soak] train.py: {len(rows)} kills, {n_files} files compared: {'; '.join(diff) or 'identical'}", flush=True)
    print_table(rows)  # now: the validation part takes as long again
    vrows, vdiff, vfiles = validate_soak(args, ref, chain, rng)
    print_table(rows + vrows)
    killed = [r for r in rows + vrows if not r["landed"].startswith("(")]
    missed = [r for r in rows + vrows if r["landed"] == "(run ended first)"]
    ok = not diff and not vdiff and not missed and all(r.get("resumed ok") for r in killed)
    landed_in = sorted({r["landed"].split(" (")[0] for r in killed})
    print(
        f"SUMMARY: {'PASS' if ok else 'FAIL'}: {len(killed)} kills of {len(rows + vrows)} planned "
        f"({len(rows + vrows) - len(killed)} not made: {len(missed)} because the run ended first), landed in "
        f"{', '.join(landed_in)}, every one resumed: {all(r.get('resumed ok') for r in killed)}; train.py final run "
        f"{'identical' if not diff else 'DIFFERENT'} ({n_files} files + resume state + base model); validate.py "
        f"Table V and {vfiles} retrain files {'identical' if not vdiff else 'DIFFERENT'}; "
        f"{time.monotonic() - start:.0f} s; work folder {work}"
    )
    return 0 if ok else 1


def validate_soak(args, ref, chain, rng):
    """The validate.py part on copies of the two finished runs: (rows, differences, files compared)."""
    if not args.validate_kills:
        return [], [], 0
    vargs = VALIDATE_SMALL if args.small else VALIDATE
    n_subsets = int(next(a.split("=")[1] for a in vargs if a.startswith("lds.n_subsets=")))
    for name in ("reference", "chain"):
        shutil.copytree((ref if name == "reference" else chain) / "run", ref.parent / f"validate_{name}")
    argv = lambda d: ["validate.py", f"run_dir={d}", *vargs]  # noqa: E731
    print(f"[soak] validate.py: python validate.py run_dir=<run> {' '.join(vargs)}", flush=True)
    windows = validate_reference(
        argv(ref.parent / "validate_reference"), ref.parent / "validate_reference", ref / "cache", n_subsets
    )
    rows, code, victim = validate_chain(
        argv(ref.parent / "validate_chain"),
        ref.parent / "validate_chain",
        chain / "cache",
        validate_plan(args.validate_kills, windows, rng),
        n_subsets,
        windows,
    )
    diff, n_files = (
        validation_differences(ref.parent / "validate_reference", ref.parent / "validate_chain")
        if (code == 0)
        else ([f"the last rerun failed (exit {code}):\n{victim.tail()}"], 0)
    )
    stray = stray_retrains()
    diff += [f"retrain processes left running: {stray}"] if stray else []
    for row in rows:
        row["identical"] = not diff
    print(f"[soak] validate.py: {len(rows)} kills, {n_files} files compared: {'; '.join(diff) or 'identical'}")
    return rows, diff, n_files


if __name__ == "__main__":
    sys.exit(main())
