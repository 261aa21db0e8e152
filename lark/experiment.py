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

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lark import console, legacy, notices, rundir
from lark.analysis import analyze as analysis
from lark.callbacks import AttributionCallback
from lark.checkpoint import Checkpoint, evaluate_checkpoint, wanted
from lark.config_checks import check_config
from lark.config_files import apply_config_files
from lark.data import bm25
from lark.data.datamodule import LarkDataModule
from lark.data.formats import encode, qa_fields
from lark.data.io import BadRows, write_json, write_jsonl, write_manifest
from lark.data.readers import load_data, qa_record, read_examples
from lark.data.sources import build_sources
from lark.data.world import save_world
from lark.errors import ConfigError, RunDirError
from lark.kernel.factory import make_kernel, upgrade
from lark.kernel.optimizer import MOMENTS_FILE, Moments, checkpoint_moments
from lark.kernel.projectors import trainable
from lark.kernel.selfcheck import check_sketch, compared, uses_sketch
from lark.kernel.stores import store_bytes
from lark.loggers import build_loggers, finish, log_images, log_metrics, log_report
from lark.models import load_base_model, load_pretrained, weights_dtype
from lark.preflight import preflight
from lark.resume import (
    AtomicCheckpointIO,
    check_resumable,
    check_same_run,
    flat,
    keep_hydra_files,
    last_checkpoint,
    resume_callbacks,
    save_run_config,
)
from lark.tracin import write_tracin_cp
from lark.training import CausalLMModule
from lark.validation.canary import plant as plant_canary
from lark.validation.lds import train_subset


def prepare_data(cfg, run_dir, log=print):
    """(train items, test items, corpora {name: documents}) of the `data` config (lark.data.readers.load_data); a
    generated world is saved with its provenance in data/world. Bad rows stop the run (data.on_bad_rows=error) or
    are left out and counted in data/bad_rows.json (skip)."""
    bad = BadRows(cfg.data.get("on_bad_rows", "error"))
    train, test, corpora, world = load_data(cfg.data, bad)
    if world is not None:
        save_world(world, run_dir / "data" / "world")
    train, test = plant_canary(train, test, cfg.data.get("canary"))  # off unless data.canary (+experiment=canary)
    train = train_subset(train, cfg.data.get("train_subset"))  # a mini-LDS retrain's subset (validate.py)
    log(
        f"[lark] data: {len(train)} train / {len(test)} test questions; corpora: "
        + (", ".join(f"{name} {len(docs)} documents" for name, docs in corpora.items()) or "none")
    )
    if bad.messages:
        log(
            f"[lark] data: {len(bad.messages)} bad rows left out (data.on_bad_rows=skip), e.g. {bad.messages[0]}; "
            "all in data/bad_rows.json"
        )
        write_json(run_dir / "data" / "bad_rows.json", bad.report())
    write_jsonl(train, run_dir / "data" / "train.jsonl")
    write_jsonl(test, run_dir / "data" / "test.jsonl")
    return train, test, corpora


def prepare_model(cfg, corpora, log=print):
    """The base model (epoch 0) of the `model` config's loader (model.load): the tiny OLMo-3 pretrained here on
    the corpora, a hub/local model (model=hub), a GGUF file."""
    return load_base_model(cfg.model, corpora=corpora, cache_dir=cfg.paths.cache_dir, log=log)


def check_attribution(cfg, run_dir, model, sets, n_queries, epochs):
    """Before any attribution: k must fit the model, and the disk must hold the stores (and score matrices)."""
    attr = cfg.attribution
    n_params = sum(p.numel() for _, p in trainable(model))
    k = attr.projector.get("k") or n_params  # exact: no k, the full gradient
    if k > n_params:
        raise ConfigError(
            f"attribution.projector.k={k:,} is larger than the {n_params:,} trainable parameters it projects"
        )
    n_checkpoints = sum(wanted(attr, e) for e in epochs)
    n_docs = sum(len(v) for v in sets.values())
    per = store_bytes(n_docs + n_queries, n_queries, n_docs, k, attr.store_dtype, attr.save_scores)
    done = sum(f.stat().st_size for f in (run_dir / "attribution").rglob("*") if f.is_file())
    rundir.require_space(
        run_dir,
        n_checkpoints * per - done,
        f"{n_checkpoints} checkpoints x {n_docs + n_queries} examples x k={k:,} in {attr.store_dtype}",
    )


def self_check(cfg, model, tokenizer, sets, log=print):
    """With the sketch projector: check on two real examples (the first of the FT and PT sources) that it
    reproduces this architecture's per-example gradients (lark.kernel.selfcheck; SelfCheckError names the modules),
    on the device the trainer will use (`trainer_device`), in the model's dtype; the model is put back where it was
    afterwards (Lightning moves it itself)."""
    attr = cfg.attribution
    if not (attr.enabled and uses_sketch(attr.projector)):
        return
    examples = [sets[cfg.source.ft_source][0], sets[cfg.source.pt_source][0]]
    encoded = [encode(tokenizer, e, cfg.format, cfg.max_length) for e in examples]
    home = next(model.parameters()).device
    device = trainer_device(cfg.trainer) or home
    try:
        n = check_sketch(
            model.to(device),
            encoded,
            tokenizer.pad_token_id,
            k=min(1024, attr.projector.k),
            seed=attr.projector.seed,
            normalize=make_kernel(attr).normalizer,
        )
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the check's work arrays: free for the trainer
    log(
        f"[lark] sketch self-check on {device}: the hooks reach all {n} parameter tensors and reproduce the "
        f"per-example gradients of the {len(compared(model))} of one layer of each kind"
    )


def trainer_device(trainer_cfg):
    """The torch device the Lightning trainer of `trainer_cfg` will put the model on (this process's: a DDP
    rank's LOCAL_RANK picks its device, and trainer.devices given as a list of indices maps ranks to them):
    accelerator cpu -> cpu; cuda -> cuda; gpu -> cuda, else mps; auto -> cuda, else mps, else cpu. None for an
    accelerator named otherwise (tpu, an object): the check then runs where the model is."""
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    if accelerator in ("gpu", "auto", "cuda") and (torch.cuda.is_available() or accelerator == "cuda"):
        rank = int(os.environ.get("LOCAL_RANK", 0))
        devices = trainer_cfg.get("devices")
        index = devices[rank] if isinstance(devices, Sequence) and not isinstance(devices, str) else rank
        return torch.device("cuda", int(index))
    if accelerator in ("gpu", "auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu") if accelerator in ("cpu", "auto") else None


def train(cfg, log=print):
    """Run the whole experiment into cfg.paths.output_dir; returns the run directory. With cfg.resume, continue
    a killed run in that directory from its last complete state."""
    apply_config_files(cfg)  # data.corpora_file, source.file
    run_dir, resume = open_run(cfg, log)
    train_items, test_items, corpora = prepare_data(cfg, run_dir, log)
    sets = build_sources(cfg.source, cfg.format, train_items, test_items, corpora, cfg.seed)
    for name, examples in sets.items():
        write_jsonl(examples, run_dir / "data" / "sources" / f"{name}.jsonl")
    write_manifest(run_dir / "data", rundir.DATA_FILES)  # what attribute.py and validate.py read back (check_data)
    notices.report_shortfalls(cfg, sets, len(train_items), run_dir, log)
    notices.warn_precision(cfg, run_dir, log)
    model, tokenizer = prepare_model(cfg, corpora, log)
    check_attribution(cfg, run_dir, model, sets, len(test_items), range(cfg.trainer.max_epochs + 1))
    self_check(cfg, model, tokenizer, sets, log)
    items = {"fine-tuning items": train_items, "test questions": test_items}
    items = {name: [qa_fields(i, cfg.format.answer_template) for i in rows] for name, rows in items.items()}
    notices.warn_cut(cfg, tokenizer, items | sets, log, run_dir)
    data = LarkDataModule(tokenizer, cfg.format, cfg.max_length, train_items, cfg.batch_size, cfg.seed, cfg.num_workers)
    model.train()  # from_pretrained returns eval mode
    module = CausalLMModule(
        model, instantiate(cfg.optimizer), instantiate(cfg.scheduler.scheduler), cfg.scheduler.interval
    )
    loggers = build_loggers(cfg.get("logger"))
    callbacks = [AttributionCallback(cfg, tokenizer, test_items, sets, run_dir, log, data.encoder)]
    trainer = make_trainer(cfg, run_dir, data, callbacks, loggers)
    try:
        if cfg.trainer.max_epochs == 0:  # Lightning skips on_train_start then: attribute the base model alone
            model.to(device=trainer_device(cfg.trainer) or model.device, dtype=weights_dtype(cfg))  # as fit() would
            moments = checkpoint_moments(
                cfg.attribution, model, 0, loader=data.train_dataloader(), clip=cfg.get("gradient_clip_val")
            )
            ck = Checkpoint(
                cfg, model, tokenizer, run_dir, 0, moments=moments, encoder=data.encoder, reuse=resume, log=log
            )
            logged, rows = evaluate_checkpoint(ck, test_items, sets)
            log_metrics(trainer, logged, step=0)  # as the callback logs each epoch's
            if rows:
                callbacks[0].log_tables(trainer, ck.name, logged, rows)
        else:
            trainer.fit(
                module, datamodule=data, ckpt_path=last_checkpoint(run_dir, log) if resume else None, weights_only=True
            )
        if trainer.global_rank == 0:
            close_run(cfg, run_dir, loggers, log)
    except BaseException:
        finish(loggers, failed=True)
        raise
    finish(loggers)
    return run_dir


def open_run(cfg, log=print):
    """(run directory, resume) of a run about to start: its config checked, the folder new or (resume=true) the
    same run's, cleaned of half-written files; the seed set."""
    keep_hydra_files(cfg.paths.output_dir)  # before any refusal: Hydra has just rewritten them for this command
    preflight(cfg, log)
    console.setup()
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    resume = bool(cfg.get("resume"))
    if resume:
        check_resumable(run_dir, console.run_dir_chosen())
        check_same_run(cfg, run_dir)
        rundir.clean(run_dir, log)
    else:
        rundir.require_new(run_dir)
    save_run_config(cfg, run_dir, resume)
    L.seed_everything(cfg.seed, workers=True)
    return run_dir, resume


def make_trainer(cfg, run_dir, data, callbacks, loggers):
    """The Lightning trainer of the `trainer` config: the given callbacks, then (trainer.enable_checkpointing) the
    ones that make the run resumable, then those of the `callbacks` config; atomic Lightning checkpoints."""
    if cfg.trainer.enable_checkpointing:
        callbacks = callbacks + resume_callbacks(run_dir, data.generator)
    callbacks = callbacks + [instantiate(spec) for spec in (cfg.get("callbacks") or {}).values()]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=console.progress_enabled(cfg.trainer.enable_progress_bar),
    )


def close_run(cfg, run_dir, loggers, log=print):
    """After the last epoch (rank 0): the run-level scores (TracIn-CP), then the tables, figures and report."""
    if not cfg.attribution.enabled:  # evaluation only: no influence to tabulate (the run succeeded)
        log(f"[lark] attribution.enabled=false: no influence tables; attribute.py run_dir={run_dir} attributes the")
        log("[lark] saved checkpoints later (attribution.save_checkpoints=true keeps them)")
        return
    if make_kernel(cfg.attribution).run_level:
        write_tracin_cp(run_dir, cfg, log)
    if not cfg.analysis.enabled:
        return
    result = analysis.analyze(
        run_dir,
        table1_epoch=cfg.analysis.table1_epoch,
        report=cfg.analysis.report,
        snippet_chars=cfg.analysis.report_snippet_chars,
    )
    log_images(loggers, "figures", result["figure_files"])
    if result["report"]:
        log_report(loggers, result["report"])
    console.summary(run_dir, result, loggers, log)


def attribute(run_dir, overrides=None, log=print, resume=True):
    """(Re)attribute the saved checkpoints of a run, with its saved config and data (plus attribution overrides).
    resume: epochs whose metrics.json matches are not redone, and complete stores and shards are reused."""
    run_dir = Path(run_dir)
    console.setup()
    cfg = attribution_config(legacy.load(run_dir), overrides)
    check_config(cfg)
    bm25.configure(cfg.source.get("bm25"))  # Table IV's BM25 baseline with the run's settings, not the defaults
    rundir.clean(run_dir, log)
    rundir.check_data(run_dir)
    test_items = read_examples(run_dir / "data" / "test.jsonl", qa_record)
    sets = {name: read_examples(run_dir / "data" / "sources" / f"{name}.jsonl") for name in cfg.source.sources}
    epochs = {e: f for e, f in rundir.saved_checkpoints(run_dir).items() if wanted(cfg.attribution, e)}
    if not epochs:
        raise RunDirError(f"{run_dir / 'checkpoints'}: no epoch_NNN checkpoints to attribute")
    for folder in epochs.values():  # every epoch's moments before the first epoch is touched, not at its turn
        saved_moments(cfg, folder, load=False)
    for epoch, folder in epochs.items():
        # in the trainer's dtype (bf16-true: bf16, whatever model.dtype says) and on its device, as trained
        model, tokenizer = load_pretrained(rundir.require_safetensors(folder), cfg.model, dtype=weights_dtype(cfg))
        model.to(trainer_device(cfg.trainer) or model.device)
        if epoch == min(epochs):
            check_attribution(cfg, run_dir, model, sets, len(test_items), epochs)
            self_check(cfg, model, tokenizer, sets, log)
        lr = rundir.epoch_lr(folder, run_dir / "attribution" / folder.name / "metrics.json")
        moments = saved_moments(cfg, folder)
        ck = Checkpoint(cfg, model, tokenizer, run_dir, epoch, lr=lr, moments=moments, reuse=resume, log=log)
        evaluate_checkpoint(ck, test_items, sets)
    if make_kernel(cfg.attribution).run_level:
        write_tracin_cp(run_dir, cfg, log)
    return run_dir


ABSENT = object()  # OmegaConf.select's answer for a key the config does not have (a null-valued key is there)


def attribution_config(cfg, overrides):
    """A saved run's config with attribution overrides: another projector or kernel (a `_target_`) replaces the
    run's, other keys merge; checkpoints are not saved again; attribution is on (a run trained with it off)."""
    overrides = OmegaConf.create(overrides or {})
    with open_dict(cfg):
        if uses_sketch(cfg.attribution.projector) and "plan_tokens" not in cfg.attribution.projector:
            cfg.attribution.projector.plan_tokens = cfg.max_length  # a run saved before the key existed
        for key in ("projector", "kernel"):  # another projector or kernel (a _target_): replaced, not merged
            if "_target_" in (overrides.get(key) or {}):
                cfg.attribution[key] = overrides.pop(key)
        for key in flat(OmegaConf.to_container(overrides)):
            if OmegaConf.select(cfg.attribution, key, default=ABSENT) is ABSENT:  # a misspelt key merged silently
                raise ConfigError(f"attribution.{key}: the run's attribution config has no such key (misspelt?)")
        cfg.attribution = upgrade(OmegaConf.merge(cfg.attribution, overrides))
        cfg.attribution.save_checkpoints = False
        cfg.attribution.enabled = True  # attributing is what attribute.py is for, whatever the training run said
    return cfg


def saved_moments(cfg, folder, load=True):
    """The AdamW moments saved beside a checkpoint, or None; RunDirError when the kernel needs them (load=False:
    only that check)."""
    present = (folder / MOMENTS_FILE).is_file()
    moments = Moments.load(folder / MOMENTS_FILE) if present and load else None
    if not present and make_kernel(cfg.attribution).uses_optimizer:
        raise RunDirError(
            f"{folder / MOMENTS_FILE}: not found; attribution.kernel="
            f"{make_kernel(cfg.attribution).name} needs the run's AdamW moments at each checkpoint "
            "(written by train.py with attribution.save_moments=true)"
        )
    return moments
