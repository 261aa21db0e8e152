"""Warnings a user must not miss (a source short of documents, examples cut at max_length, an evaluation that
scores nothing): one `[lark] warning:` line each on the console, and kept in the run's data/warnings.json so
that every metrics.json carries them too (`warnings`, {key: {message, counts...}}).

    warn(run_dir, "cut", "3 of 60 fine-tuning items longer than max_length=512 ...", log, cut=3, total=60)
    read(run_dir)   # -> {"cut": {"message": ..., "cut": 3, "total": 60}}
"""

import json
from pathlib import Path

from lark.data.formats import n_cut
from lark.data.io import write_json
from lark.data.sources import shortfalls

FILE = Path("data") / "warnings.json"


def read(run_dir):
    """The run's warnings so far ({} when none)."""
    path = Path(run_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def warn(run_dir, key, message, log=print, **counts):
    """Print one `[lark] warning:` line and record it under `key` (a rerun replaces it: resumes do not pile up)."""
    log(f"[lark] warning: {message}")
    if run_dir is not None:
        write_json(Path(run_dir) / FILE, read(run_dir) | {key: {"message": message, **counts}})


def warn_cut(cfg, tokenizer, named_sets, log=print, run_dir=None):
    """One `[lark] warning:` line counting the examples longer than max_length (cut, never silently; recorded in
    data/warnings.json, lark.notices); returns {name: [cut, total]} of the sets with a cut example."""
    cut = {
        name: [n_cut(tokenizer, items, cfg.format, cfg.max_length), len(items)] for name, items in named_sets.items()
    }
    cut = {name: counts for name, counts in cut.items() if counts[0]}
    if cut:
        message = (
            f"longer than max_length={cfg.max_length} tokens, so cut (a prompt in the middle of its context, keeping "
            "the question and the generation prompt, at least its last 64 tokens; an answer beyond max_length/2 at "
            "its end, without its end-of-turn token; a document at its end): "
            + ", ".join(f"{n} of {total} {name}" for name, (n, total) in cut.items())
        )
        warn(run_dir, "max_length", message, log, counts=cut)
    return cut


def report_shortfalls(cfg, sets, n_train, run_dir, log=print):
    """A finetune source that cuts the fine-tuning items is printed; any other source holding fewer documents than
    it asked for is a warning (lark.notices: console and metrics.json) -- never silent."""
    for name, got, asked, kind in shortfalls(cfg.source, sets, n_train):
        if kind == "finetune":
            log(f"[lark] source {name}: {got} of the {asked} fine-tuning items (source.sources.{name}.size={got})")
        else:
            why = (
                "BM25 candidates: source.bm25_per_query per test question, or the corpus"
                if kind == "retrieve"
                else "the corpus"
            )
            message = f"source {name} holds {got} of the {asked} documents asked ({why} ran out)"
            warn(run_dir, f"shortfall_{name}", message, log, got=got, asked=asked)


def warn_precision(cfg, run_dir, log=print):
    """trainer.precision=bf16-true fine-tunes bf16 weights with no float32 master copy: small updates round away
    (README, "the paper exactly"). Said once per run, never silent."""
    if cfg.trainer.get("precision") == "bf16-true" and cfg.trainer.max_epochs > 0:
        message = (
            "trainer.precision=bf16-true: weights and AdamW state in bf16, no float32 master copy, so an update "
            "below ~0.4% of its weight rounds away (the embedded model: 3% of weights changed per epoch at lr 2e-5, "
            "35-40% at 2e-4); trainer.precision=bf16-mixed model.dtype=float32 keeps float32 weights, at about "
            "twice the memory"
        )
        warn(run_dir, "bf16_true", message, log)
