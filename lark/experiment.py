"""The experiment, stage by stage: data -> base model -> sources -> fine-tuning with attribution -> analysis.
`train.py` and `attribute.py` are thin wrappers around `train` and `attribute` here.

Run directory layout:
  data/            train.jsonl, test.jsonl, sources/<source>.jsonl (the exact examples attributed),
                   world/ (the generated world with provenance.json, embedded default only)
  checkpoints/     epoch_000 (base model) ... epoch_NNN, HF safetensors + tokenizer + lark_config.yaml, lark_epoch.json
  attribution/     epoch_NNN/{stores, scores, top_influences.csv, metrics.json}
  tables/ figures/ Tables I-IV (.md, .csv) and Figures 1-3 (.png)
  wandb/           the offline W&B run
"""
import json
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lark import analysis, console, rundir
from lark.attribution import write_json
from lark.callbacks import AttributionCallback
from lark.canary import plant as plant_canary
from lark.checkpoint import evaluate_checkpoint, wanted
from lark.data import BadRows, load_corpus, load_qa, qa_record, read_examples, write_jsonl
from lark.errors import ConfigError, RunDirError
from lark.formats import encode, qa_fields
from lark.lds import train_subset
from lark.loggers import build_loggers, finish, log_images, log_report
from lark.models import load_base_model, load_pretrained
from lark.preflight import preflight
from lark.pretrain import pretrain_tiny
from lark.projector import KINDS, trainable
from lark.resume import AtomicCheckpointIO, check_same_run, last_checkpoint, resume_callbacks
from lark.sources import build_sources
from lark.stores import TIERS
from lark.training import CausalLMModule, make_loader

SOURCE_KINDS = ("finetune", "medical", "entertainment")


def validate(cfg):
    """Fail at start, naming the key, on values that would only break later (ConfigError)."""
    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    epochs, attr, projector = cfg.trainer.max_epochs, cfg.attribution, cfg.attribution.projector
    need(isinstance(epochs, int) and epochs >= 0, f"trainer.max_epochs must be an integer >= 0, got {epochs}")
    need(isinstance(projector.k, int) and projector.k > 0, f"attribution.projector.k must be a positive integer, "
                                                            f"got {projector.k}")
    need(projector.kind in KINDS, f"attribution.projector.kind: unknown '{projector.kind}' ({', '.join(KINDS)})")
    need(attr.store_dtype in TIERS, f"attribution.store_dtype: unknown '{attr.store_dtype}' ({', '.join(TIERS)})")
    need(isinstance(attr.get("shard_size", 1), int) and attr.get("shard_size", 1) > 0,
         f"attribution.shard_size must be a positive integer, got {attr.get('shard_size')}")
    need(attr.checkpoints == "all" or all(isinstance(e, int) and e >= 0 for e in attr.checkpoints),
         f"attribution.checkpoints must be 'all' or a list of epochs >= 0, got {attr.checkpoints}")
    need(isinstance(cfg.source.size, int) and cfg.source.size > 0,
         f"source.size must be a positive integer, got {cfg.source.size}")
    names = set(cfg.source.sources)
    for name, spec in cfg.source.sources.items():
        need(spec.kind in SOURCE_KINDS,
             f"source.sources.{name}.kind: unknown '{spec.kind}' ({', '.join(SOURCE_KINDS)})")
    for key in ("ft_source", "pt_source"):
        need(cfg.source[key] in names, f"source.{key}: '{cfg.source[key]}' is not one of source.sources "
                                       f"({', '.join(names)})")
    for content, pair in cfg.source.format_pairs.items():
        for name in pair:
            need(name in names, f"source.format_pairs.{content}: '{name}' is not one of source.sources")
    need(isinstance(cfg.model.get("trust_remote_code", False), bool), "model.trust_remote_code must be true or false")
    data = cfg.data
    need(data.kind in ("world", "local", "hub"), f"data.kind: unknown '{data.kind}' (world, local or hub)")
    BadRows(data.get("on_bad_rows", "error"))
    paths = {"data.path": data.get("path") if data.kind == "local" else None, "data.test_ids": data.get("test_ids")}
    for name, corpus in (data.get("corpus") or {}).items():
        need(corpus.kind in ("local", "hub"), f"data.corpus.{name}.kind: unknown '{corpus.kind}' (local or hub)")
        paths[f"data.corpus.{name}.path"] = corpus.get("path") if corpus.kind == "local" else None
    for key, path in paths.items():
        need(path is None or Path(path).is_file(), f"{key}: {path} is not a file")


def prepare_data(cfg, run_dir, log=print):
    """(train items, test items, corpora) of the `data` config; the embedded world is generated and saved.
    Bad rows stop the run (data.on_bad_rows=error) or are left out and counted in data/bad_rows.json (skip)."""
    bad = BadRows(cfg.data.get("on_bad_rows", "error"))
    if cfg.data.kind == "world":
        from lark.world import generate_world, save_world

        try:
            world = generate_world(**cfg.data.world)
        except ValueError as e:  # the world's parameter checks name the parameter
            raise ConfigError(f"data.world.{e}") from None
        save_world(world, run_dir / "data" / "world")
        train, test = load_qa(cfg.data, world)
        corpora = {"medical": world.medical_docs, "entertainment": world.entertainment_docs}
    else:
        train, test = load_qa(cfg.data, bad=bad)
        corpora = {"medical": load_corpus(cfg.data.corpus.medical, bad=bad),
                   "entertainment": load_corpus(cfg.data.corpus.entertainment, bad=bad),
                   "exclude_medical": cfg.data.corpus.entertainment.get("exclude_medical", False)}
    train, test = plant_canary(train, test, cfg.data.get("canary"))   # off unless data.canary (+experiment=canary)
    train = train_subset(train, cfg.data.get("train_subset"))           # a mini-LDS retrain's subset (validate.py)
    log(f"[lark] data: {len(train)} train / {len(test)} test questions, "
        f"{len(corpora['medical'])} medical and {len(corpora['entertainment'])} entertainment documents")
    if bad.messages:
        log(f"[lark] data: {len(bad.messages)} bad rows left out (data.on_bad_rows=skip), e.g. {bad.messages[0]}; "
            "all in data/bad_rows.json")
        write_json(run_dir / "data" / "bad_rows.json", bad.report())
    write_jsonl(train, run_dir / "data" / "train.jsonl")
    write_jsonl(test, run_dir / "data" / "test.jsonl")
    return train, test, corpora


def prepare_model(cfg, corpora, log=print):
    """The base model (epoch 0): the tiny OLMo-3 pretrained here on the corpus, or a hub/local model."""
    if cfg.model.kind == "tiny":
        texts = [d["text"] for d in corpora["medical"] + corpora["entertainment"]]
        return load_pretrained(pretrain_tiny(cfg.model, texts, cfg.paths.cache_dir, log), cfg.model)
    return load_base_model(cfg.model)


def check_attribution(cfg, run_dir, model, sets, n_queries, epochs):
    """Before any attribution: k must fit the model, and the disk must hold the stores (and score matrices)."""
    attr = cfg.attribution
    n_params = sum(p.numel() for _, p in trainable(model))
    k = n_params if attr.projector.kind == "exact" else attr.projector.k
    if k > n_params:
        raise ConfigError(f"attribution.projector.k={k:,} is larger than the {n_params:,} trainable parameters it "
                          "projects")
    n_checkpoints = sum(wanted(attr, e) for e in epochs)
    n_docs = sum(len(v) for v in sets.values())
    per = rundir.store_bytes(n_docs + n_queries, n_queries, n_docs, k, attr.store_dtype, attr.save_scores)
    done = sum(f.stat().st_size for f in (run_dir / "attribution").rglob("*") if f.is_file())
    rundir.require_space(run_dir, n_checkpoints * per - done, f"{n_checkpoints} checkpoints x "
                         f"{n_docs + n_queries} examples x k={k:,} in {attr.store_dtype}")


def train(cfg, log=print):
    """Run the whole experiment into cfg.paths.output_dir; returns the run directory. With cfg.resume, continue
    a killed run in that directory from its last complete state."""
    preflight(cfg, log)
    console.setup()
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    resume = bool(cfg.get("resume"))
    if resume:
        check_same_run(cfg, run_dir)
        rundir.clean(run_dir, log)
    else:
        rundir.require_new(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    train_items, test_items, corpora = prepare_data(cfg, run_dir, log)
    sets = build_sources(cfg.source, cfg.format, train_items, test_items, corpora, cfg.seed)
    for name, examples in sets.items():
        write_jsonl(examples, run_dir / "data" / "sources" / f"{name}.jsonl")
    model, tokenizer = prepare_model(cfg, corpora, log)
    check_attribution(cfg, run_dir, model, sets, len(test_items), range(cfg.trainer.max_epochs + 1))
    encoded = [encode(tokenizer, qa_fields(item, cfg.format.answer_template), cfg.format, cfg.max_length)
               for item in train_items]
    loader = make_loader(encoded, cfg.batch_size, tokenizer.pad_token_id, True, cfg.seed, cfg.num_workers)
    model.train()  # from_pretrained returns eval mode
    module = CausalLMModule(model, instantiate(cfg.optimizer), instantiate(cfg.scheduler.scheduler),
                            cfg.scheduler.interval)
    loggers = build_loggers(cfg.get("logger"))
    callbacks = [AttributionCallback(cfg, tokenizer, test_items, sets, run_dir, log)]
    if cfg.trainer.enable_checkpointing:
        callbacks += resume_callbacks(run_dir, loader.generator)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                          enable_progress_bar=console.progress_enabled(cfg.trainer.enable_progress_bar))
    try:
        if cfg.trainer.max_epochs == 0:  # Lightning skips on_train_start then: attribute the base model alone
            evaluate_checkpoint(cfg, model, tokenizer, test_items, sets, run_dir, 0, None, log=log, reuse=resume)
        else:
            trainer.fit(module, loader, ckpt_path=last_checkpoint(run_dir, log) if resume else None,
                        weights_only=True)
        if cfg.analysis.enabled and trainer.global_rank == 0:
            result = analysis.analyze(run_dir, table1_epoch=cfg.analysis.table1_epoch,
                                      report=cfg.analysis.report, snippet_chars=cfg.analysis.report_snippet_chars)
            log_images(loggers, "figures", result["figure_files"])
            if result["report"]:
                log_report(loggers, result["report"])
            console.summary(run_dir, result, loggers, log)
    finally:
        finish(loggers)
    return run_dir


def load_run_config(run_dir):
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path}: not found; run_dir must be a run directory written by train.py")
    return OmegaConf.load(path)


def epoch_lr(checkpoint, metrics):
    """The learning rate of a checkpoint's epoch as training recorded it (runs before lark_epoch.json: metrics)."""
    for path in (checkpoint / "lark_epoch.json", metrics):
        try:
            return json.loads(path.read_text()).get("lr")
        except (OSError, ValueError):
            continue
    return None


def saved_checkpoints(run_dir):
    """{epoch: folder} of a run's complete checkpoints/epoch_NNN folders."""
    return {int(f.name.split("_")[1]): f for f in sorted((Path(run_dir) / "checkpoints").glob("epoch_[0-9][0-9][0-9]"))
            if not rundir.TMP.search(f.name)}


def attribute(run_dir, overrides=None, log=print, resume=True):
    """(Re)attribute the saved checkpoints of a run, with its saved config and data (plus attribution overrides).
    resume: epochs whose metrics.json matches are not redone, and complete stores and shards are reused."""
    run_dir = Path(run_dir)
    console.setup()
    cfg = load_run_config(run_dir)
    with open_dict(cfg):
        if "plan_tokens" not in cfg.attribution.projector:   # a run saved before the key existed
            cfg.attribution.projector.plan_tokens = cfg.max_length
        cfg.attribution = OmegaConf.merge(cfg.attribution, overrides or {})
        cfg.attribution.save_checkpoints = False
    validate(cfg)
    rundir.clean(run_dir, log)
    test_items = read_examples(run_dir / "data" / "test.jsonl", qa_record)
    sets = {name: read_examples(run_dir / "data" / "sources" / f"{name}.jsonl") for name in cfg.source.sources}
    epochs = {e: f for e, f in saved_checkpoints(run_dir).items() if wanted(cfg.attribution, e)}
    if not epochs:
        raise RunDirError(f"{run_dir / 'checkpoints'}: no epoch_NNN checkpoints to attribute")
    for epoch, folder in epochs.items():
        model, tokenizer = load_pretrained(rundir.require_safetensors(folder), cfg.model)
        if epoch == min(epochs):
            check_attribution(cfg, run_dir, model, sets, len(test_items), epochs)
        lr = epoch_lr(folder, run_dir / "attribution" / folder.name / "metrics.json")
        evaluate_checkpoint(cfg, model, tokenizer, test_items, sets, run_dir, epoch, lr, log=log, reuse=resume)
    return run_dir
