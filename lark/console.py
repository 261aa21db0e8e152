"""The console of a run: each line once, progress with an ETA only on a terminal, third-party notices that do
not concern the user silenced at their source, and a closing summary (Table II and where everything is).

    tee_to_log()                             # first thing in train.py / attribute.py / validate.py
    setup()                                  # once, at the start of experiment.train / attribute
    for batch in progress(batches, "projecting finetune"): ...
    summary(run_dir, analysis_result, loggers, log)
"""

import logging
import sys
import warnings
from pathlib import Path


class DropNotice(logging.Filter):
    """Rejects the records of a third-party logger that contain `text` (an advertisement, not a message)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


class Tee:
    """A console stream that also writes each complete line to a log file handler, as a timestamped record of the
    logger `lark.console` (Hydra's <task>.log then holds the whole console: the `[lark]` lines, prints, warnings).
    Progress-bar redraws (lines with a carriage return) stay on the console only."""

    def __init__(self, stream, handler):
        self.stream, self.handler, self.pending, self.busy = stream, handler, "", False

    def write(self, text):
        n = self.stream.write(text)
        if self.busy:  # the handler reporting its own error: never loop
            return n
        self.busy = True
        try:
            *lines, self.pending = (self.pending + text).split("\n")
            for line in lines:
                if line.strip() and "\r" not in line:
                    record = logging.makeLogRecord({"name": "lark.console", "levelno": 20, "levelname": "INFO"})
                    record.msg = line
                    self.handler.handle(record)
        finally:
            self.busy = False
        return n

    def __getattr__(self, name):  # flush, isatty, fileno, encoding, ...: the console stream's
        return getattr(self.stream, name)


def tee_to_log():
    """Idempotent: sys.stdout and sys.stderr also go, line by line, to the root logger's file handler (Hydra's
    <task>.log) when there is one; the handlers' own records are not doubled (they hold the original streams).
    Called again by the next job of a sweep, it moves the streams to that job's log."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, Tee):
            stream.handler = files[0]
        else:
            setattr(sys, name, Tee(stream, files[0]))


HYDRA_FLAGS = ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "-p", "--package", "-sc", "--shell")


def require_run_dir(argv=None, sweep=False):
    """Before Hydra starts attribute.py, analyze.py or validate.py (whose Hydra log goes into run_dir): a run_dir=
    argument that is not a directory stops with one line and exit code 2, where Hydra would create that folder
    for its log and the script would then report it empty; so does a sweep's folder (multirun.yaml) unless the
    script takes one (`sweep`: analyze.py), naming its jobs' folders. A run_dir left out or empty stops likewise
    (Hydra printed a traceback about its ??? value; an empty one analysed the current folder)."""
    args = sys.argv[1:] if argv is None else argv
    given = [arg.partition("=")[2] for arg in args if arg.partition("=")[0].lstrip("+~") == "run_dir"]
    asks_hydra = any(arg.startswith(HYDRA_FLAGS) for arg in args)  # --help, --cfg job: no run needed
    if not asks_hydra and (not given or not all(v.strip() for v in given)):
        print("[lark] error: run_dir=<run folder> is required: a folder written by train.py", file=sys.stderr)
        sys.exit(2)
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") != "run_dir" or not value or "," in value:
            continue
        if not Path(value).is_dir():
            print(f"[lark] error: run_dir={value}: not a directory (a run folder written by train.py)", file=sys.stderr)
            sys.exit(2)
        if not sweep and (Path(value) / "multirun.yaml").is_file():
            jobs = sorted(p.name for p in Path(value).iterdir() if (p / ".hydra").is_dir())
            print(
                f"[lark] error: run_dir={value}: a sweep's folder; give one job's run folder, e.g. "
                f"run_dir={Path(value) / (jobs[0] if jobs else '<n>')} (jobs: {', '.join(jobs) or 'none'})",
                file=sys.stderr,
            )
            sys.exit(2)


def sweeping():
    """Whether this process runs a job of a Hydra sweep (-m)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def run_dir_chosen():
    """Whether this process's run folder was chosen rather than made by Hydra for this start: hydra.run.dir given
    (a sweep's job: hydra.sweep.dir), or not under Hydra at all (a caller composing the config chose
    paths.output_dir)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    key = "hydra.sweep.dir=" if sweeping() else "hydra.run.dir="
    return any(o.lstrip("+").startswith(key) for o in HydraConfig.get().overrides.hydra)


def tty():
    return sys.stderr.isatty()


def setup():
    """Idempotent. The console is teed into the run's log file (tee_to_log). Lightning's own stream handler goes
    when the root logger has handlers (Hydra's console and file handlers print its records then; Lightning
    itself only adds the handler because it cannot know); its litlogger advertisement is dropped at its logger;
    transformers' per-file progress bars (writing shards, loading weights) and the hub's download bars are off
    when the console is not a terminal; Lightning's own deprecation notice about torch's pytree API (not ours to
    fix) is ignored, and so is its notice that <run>/resume is not empty (a resume=true reads it: no news)."""
    tee_to_log()
    if logging.getLogger().handlers:
        package = logging.getLogger("lightning")
        for handler in list(package.handlers):
            if type(handler) is logging.StreamHandler:
                package.removeHandler(handler)
        logging.getLogger("lightning.pytorch").propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropNotice) for f in rank_zero.filters):
        rank_zero.addFilter(DropNotice("litlogger"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .*resume exists and is not empty")  # a resume
    if not tty():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        disable_progress_bars()


def progress_enabled(setting=None):
    """trainer.enable_progress_bar: null = on when the console is a terminal."""
    return tty() if setting is None else bool(setting)


class NoBar:
    """What progress() gives for a manual bar when the console is not a terminal."""

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def progress(iterable, desc, total=None, unit="it"):
    """`iterable` with a progress bar and ETA on a terminal (tqdm on stderr, cleared when done); unchanged otherwise.
    iterable=None: a manual bar (update(n), set_postfix_str, close), a no-op off a terminal."""
    if not tty():
        return NoBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def wandb_runs(loggers):
    """The local folders of the W&B runs among the loggers."""
    folders = []
    for lg in loggers:
        experiment = getattr(lg, "_experiment", None)
        folder = getattr(experiment, "dir", None)
        if folder:
            folders.append(Path(folder).parent)  # .../wandb/offline-run-*/files -> the run folder
    return folders


def summary(run_dir, result, loggers=(), log=print):
    """Table II and the paths of the tables, figures, report and W&B runs, after a run."""
    run_dir = Path(run_dir)
    table2 = run_dir / "tables" / "table2.md"
    lines = [""] + (table2.read_text().rstrip().splitlines() if table2.is_file() else []) + [""]
    if result:
        lines.append(f"[lark] tables:  {run_dir / 'tables'} ({', '.join(p.name for p in result['table_files'])})")
        lines.append(f"[lark] figures: {run_dir / 'figures'} ({', '.join(p.name for p in result['figure_files'])})")
        if result.get("report"):
            lines.append(f"[lark] report:  {result['report']}  (open it in a browser; offline)")
    for folder in wandb_runs(loggers):
        lines.append(
            f"[lark] W&B run: {folder}"
            + ("  (offline: `wandb sync " + str(folder) + "`)" if "offline-run" in folder.name else "")
        )
    for line in lines:
        log(line)
