"""The experiment, stage by stage: data -> base model -> sources -> fine-tuning with attribution -> analysis.
`train.py` and `attribute.py` are thin wrappers around `train` and `attribute` here.

Run directory layout:
  data/            train.jsonl, test.jsonl, sources/<source>.jsonl (the exact examples attributed),
                   world/ (the generated world with provenance.json, embedded default only)
  checkpoints/     epoch_000 (base model) ... epoch_NNN, HF safetensors + tokenizer + lark_config.yaml
  attribution/     epoch_NNN/{stores, scores, top_influences.csv, metrics.json}
  tables/ figures/ Tables I-IV (.md, .csv) and Figures 1-3 (.png)
  wandb/           the offline W&B run
"""
import json
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lark import analysis
from lark.callbacks import AttributionCallback, evaluate_checkpoint, wanted
from lark.data import load_corpus, load_qa, read_jsonl, write_jsonl
from lark.formats import encode, qa_fields
from lark.loggers import build_loggers, finish, log_images
from lark.models import load_base_model, load_pretrained
from lark.pretrain import pretrain_tiny
from lark.projector import KINDS
from lark.sources import build_sources
from lark.training import CausalLMModule, make_loader


def validate(cfg):
    """Fail at start, naming the key, on values that would only break later."""
    if cfg.trainer.max_epochs is None or cfg.trainer.max_epochs < 0:
        raise ValueError(f"trainer.max_epochs must be >= 0, got {cfg.trainer.max_epochs}")
    if int(cfg.attribution.projector.k) <= 0:
        raise ValueError(f"attribution.projector.k must be positive, got {cfg.attribution.projector.k}")
    if cfg.attribution.projector.kind not in KINDS:
        raise ValueError(f"attribution.projector.kind: unknown '{cfg.attribution.projector.kind}'")
    names = set(cfg.source.sources)
    for key in ("ft_source", "pt_source"):
        if cfg.source[key] not in names:
            raise ValueError(f"source.{key}: '{cfg.source[key]}' is not one of source.sources ({', '.join(names)})")
    for content, pair in cfg.source.format_pairs.items():
        for name in pair:
            if name not in names:
                raise ValueError(f"source.format_pairs.{content}: '{name}' is not one of source.sources")


def prepare_data(cfg, run_dir, log=print):
    """(train items, test items, corpora) of the `data` config; the embedded world is generated and saved."""
    if cfg.data.kind == "world":
        from lark.world import generate_world, save_world

        world = generate_world(**cfg.data.world)
        save_world(world, run_dir / "data" / "world")
        train, test = load_qa(cfg.data, world)
        corpora = {"medical": world.medical_docs, "entertainment": world.entertainment_docs}
    else:
        train, test = load_qa(cfg.data)
        corpora = {"medical": load_corpus(cfg.data.corpus.medical),
                   "entertainment": load_corpus(cfg.data.corpus.entertainment),
                   "exclude_medical": cfg.data.corpus.entertainment.get("exclude_medical", False)}
    log(f"[lark] data: {len(train)} train / {len(test)} test questions, "
        f"{len(corpora['medical'])} medical and {len(corpora['entertainment'])} entertainment documents")
    write_jsonl(train, run_dir / "data" / "train.jsonl")
    write_jsonl(test, run_dir / "data" / "test.jsonl")
    return train, test, corpora


def prepare_model(cfg, corpora, log=print):
    """The base model (epoch 0): the tiny OLMo-3 pretrained here on the corpus, or a hub/local model."""
    if cfg.model.kind == "tiny":
        texts = [d["text"] for d in corpora["medical"] + corpora["entertainment"]]
        return load_pretrained(pretrain_tiny(cfg.model, texts, cfg.paths.cache_dir, log), cfg.model)
    return load_base_model(cfg.model)


def train(cfg, log=print):
    """Run the whole experiment into cfg.paths.output_dir; returns the run directory."""
    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    train_items, test_items, corpora = prepare_data(cfg, run_dir, log)
    model, tokenizer = prepare_model(cfg, corpora, log)
    sets = build_sources(cfg.source, cfg.format, train_items, test_items, corpora, cfg.seed)
    for name, examples in sets.items():
        write_jsonl(examples, run_dir / "data" / "sources" / f"{name}.jsonl")
    encoded = [encode(tokenizer, qa_fields(item, cfg.format.answer_template), cfg.format, cfg.max_length)
               for item in train_items]
    loader = make_loader(encoded, cfg.batch_size, tokenizer.pad_token_id, True, cfg.seed, cfg.num_workers)
    model.train()  # from_pretrained returns eval mode
    module = CausalLMModule(model, instantiate(cfg.optimizer), instantiate(cfg.scheduler.scheduler),
                            cfg.scheduler.interval)
    loggers = build_loggers(cfg.get("logger"))
    callback = AttributionCallback(cfg, tokenizer, test_items, sets, run_dir, log)
    trainer = instantiate(cfg.trainer, callbacks=[callback], logger=loggers or False)
    try:
        if cfg.trainer.max_epochs == 0:  # Lightning skips on_train_start then: attribute the base model alone
            evaluate_checkpoint(cfg, model, tokenizer, test_items, sets, run_dir, 0, None, log=log)
        else:
            trainer.fit(module, loader)
        if cfg.analysis.enabled and trainer.global_rank == 0:
            result = analysis.analyze(run_dir, table1_epoch=cfg.analysis.table1_epoch)
            log_images(loggers, "figures", result["figure_files"])
    finally:
        finish(loggers)
    return run_dir


def load_run_config(run_dir):
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run_dir must be a run directory written by train.py")
    return OmegaConf.load(path)


def attribute(run_dir, overrides=None, log=print):
    """(Re)attribute the saved checkpoints of a run, with its saved config and data (plus attribution overrides)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    with open_dict(cfg):
        cfg.attribution = OmegaConf.merge(cfg.attribution, overrides or {})
    validate(cfg)
    test_items = [r for _, r in read_jsonl(run_dir / "data" / "test.jsonl")]
    sets = {name: [r for _, r in read_jsonl(run_dir / "data" / "sources" / f"{name}.jsonl")]
            for name in cfg.source.sources}
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch_[0-9][0-9][0-9]"))
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no epoch_NNN checkpoints to attribute")
    with open_dict(cfg):
        cfg.attribution.save_checkpoints = False
    for folder in checkpoints:
        epoch = int(folder.name.split("_")[1])
        if not wanted(cfg.attribution, epoch):
            continue
        model, tokenizer = load_pretrained(folder, cfg.model)
        old = run_dir / "attribution" / folder.name / "metrics.json"
        lr = json.loads(old.read_text()).get("lr") if old.is_file() else None
        evaluate_checkpoint(cfg, model, tokenizer, test_items, sets, run_dir, epoch, lr, log=log)
    return run_dir
