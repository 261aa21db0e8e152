"""What Table V reads from a run directory, in one object (ValidationRun): the run's config, its fine-tuning items
and test questions, the checkpoints to validate, and the answers each check is scored against: the provenance
of each question (the embedded world's data/world/provenance.json) and the planted canary's items.

    vcfg = load_config({"kernels": ["cosine"]})   # conf/validate.yaml with overrides, as analyze.py's validate
    run = load_run(run_dir, vcfg)                 # -> ValidationRun
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from lark.data import bm25
from lark.data.formats import document_fields, qa_fields
from lark.data.readers import qa_record, read_examples, sample
from lark.data.sources import query_examples
from lark.data.world import load_world
from lark.errors import ConfigError, RunDirError
from lark.legacy import CONF
from lark.legacy import load as load_run_config
from lark.rundir import check_data, saved_checkpoints
from lark.validation import recall as R


@dataclass
class ValidationRun:
    """A run directory as validation sees it. Row/column lists index the test questions (rows) and the candidates
    (columns) of the score matrices [n_test, n_train] and [n_test, n_pool]."""

    run_dir: Path
    cfg: DictConfig  # the run's config in today's form (lark.legacy)
    vcfg: DictConfig  # conf/validate.yaml
    test: list  # data/test.jsonl: the queries' items (with the triggered canary queries)
    train: list  # data/train.jsonl: every fine-tuning item
    epochs: dict  # {epoch: checkpoint folder} to validate
    train_fields: list  # the fine-tuning items as they were trained (qa_fields)
    queries: list  # the test items as they are attributed (query_examples)
    log: Callable = print
    pool: list = field(default_factory=list)  # the pretraining candidates (pool_examples); [] without a world
    pool_relevant: list | None = None  # per provenance row: its pretraining documents' pool columns
    ft_relevant: list | None = None  # per provenance row: its fine-tuning items' train columns
    prov_rows: list = field(default_factory=list)  # test rows that have a provenance
    only_pretraining: float | None = None  # share of provenance rows without a fine-tuning item
    canary_rows: list = field(default_factory=list)  # triggered test rows ([] when no item was planted)
    canary_cols: list = field(default_factory=list)  # planted train columns


def load_run(run_dir, vcfg, log=print):
    """Everything validation needs from a run directory (its config, data, provenance, checkpoints)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    bm25.configure(cfg.source.get("bm25"))  # Table V's BM25 row uses the run's BM25 settings
    check_data(run_dir)  # data/checksums.json: no corrupted text is scored
    test = read_examples(run_dir / "data" / "test.jsonl", qa_record)
    train = read_examples(run_dir / "data" / "train.jsonl", qa_record)
    epochs = saved_checkpoints(run_dir)
    if vcfg.checkpoints != "all":
        epochs = {e: f for e, f in epochs.items() if e in list(vcfg.checkpoints)}
    if not epochs:
        raise RunDirError(
            f"{run_dir / 'checkpoints'}: no epoch_NNN checkpoints (validate.checkpoints={vcfg.checkpoints})"
        )
    train_fields = [qa_fields(x, cfg.format.answer_template) for x in train]
    run = ValidationRun(run_dir, cfg, vcfg, test, train, epochs, train_fields, query_examples(test, cfg.format), log)
    if (run_dir / "data" / "world" / "provenance.json").is_file():
        add_provenance(run, run_dir / "data" / "world")
    run.canary_rows = [i for i, t in enumerate(test) if t.get("canary")]
    run.canary_cols = [j for j, x in enumerate(train) if x.get("canary")]
    if run.canary_rows and not run.canary_cols:
        run.canary_rows = []
    return run


def add_provenance(run, world_dir):
    """The candidate pool and, per test question with a provenance, its relevant pool and train columns."""
    world = load_world(world_dir)
    docs = pool_documents(world, run.vcfg.pool)
    run.pool = pool_examples(docs, run.vcfg.pool.format)
    rows = [i for i, t in enumerate(run.test) if t["id"] in world.provenance]
    prov = [world.provenance[run.test[i]["id"]] for i in rows]
    run.prov_rows = rows
    run.pool_relevant = R.columns([d["id"] for d in docs], [p["pretrain_docs"] for p in prov])
    train_ids = [x["id"] for x in run.train]
    run.ft_relevant = R.columns(train_ids, [[i for i in p["finetune_items"] if i in set(train_ids)] for p in prov])
    run.only_pretraining = sum(not r for r in run.ft_relevant) / max(1, len(prov))


def pool_documents(world, pool_cfg):
    """The pretraining candidates of provenance recall, built without any scoring method: every abstract of the
    world (kind all), or the provenance abstracts plus `size` others drawn with `seed` (kind sample)."""
    docs = world.medical_docs
    if pool_cfg.kind == "all":
        return list(docs)
    if pool_cfg.kind != "sample":
        raise ConfigError(f"validate.pool.kind: unknown '{pool_cfg.kind}' (all or sample)")
    needed = {d for p in world.provenance.values() for d in p["pretrain_docs"]}
    others = sample([d for d in docs if d["id"] not in needed], int(pool_cfg.size), int(pool_cfg.seed))
    keep = needed | {d["id"] for d in others}
    return [d for d in docs if d["id"] in keep]


def pool_examples(docs, how):
    if how not in ("noformat", "format"):
        raise ConfigError(f"validate.pool.format: unknown '{how}' (noformat or format)")
    return [document_fields(d) if how == "format" else {"id": d["id"], "text": d["text"]} for d in docs]


def lds_enabled(vcfg, cfg):
    """validate's lds.enabled: auto (on for the embedded world), true or false; anything else is refused (a
    misspelt `fals` once started 32 retrains)."""
    flag = vcfg.lds.enabled
    if flag == "auto":
        return "world" in cfg.data
    if not isinstance(flag, bool):
        raise ConfigError(f"lds.enabled must be auto, true or false, got {flag!r}")
    return flag


def load_config(overrides=None):
    """conf/validate.yaml (without its hydra block) merged with overrides: what analyze.py's validate uses."""
    cfg = OmegaConf.load(CONF / "validate.yaml")
    overrides = dict(overrides or {})
    kernels = overrides.pop("kernels", None)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if kernels is not None:  # the kernel list is replaced, not merged into the default one
            cfg.kernels = kernels
    return OmegaConf.merge(cfg, overrides)
