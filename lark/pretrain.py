"""The embedded default's base model: a tokenizer and a tiny OLMo-3 trained here on the generated pretraining
corpus, so that the "pretraining data" of the experiment really is the model's pretraining data.
The result (= epoch 0 of fine-tuning) is cached by a hash of the corpus and the configs; the cache folder is
written under a temporary name and renamed when complete, so a killed pretraining leaves nothing that is trusted."""

import functools
import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from lark.console import progress
from lark.data.datamodule import make_loader
from lark.fingerprints import content_hash
from lark.models import build_tiny, load_pretrained, save_checkpoint, train_tokenizer
from lark.training import CausalLMModule


def pack(tokenizer, texts, block):
    """Concatenate the documents (each closed by the end token) and cut them into blocks of `block` tokens."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def corpus_hash(texts):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pretrain_tiny(model_cfg, texts, cache_dir, log=print):
    """Folder of the pretrained tiny model for this corpus and config, training it if not cached."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(model_cfg, resolve=True)
    key = content_hash(spec["config"], spec["tokenizer"], spec["pretrain"], corpus_hash(texts))
    folder = Path(cache_dir) / f"tiny-olmo3-{key}"
    if (folder / "config.json").is_file():
        log(f"[lark] base model from cache: {folder}")
        return folder
    log(f"[lark] pretraining the tiny model on {len(texts)} documents ({spec['pretrain']['steps']} steps)")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # fine-tuning's RNG state does not depend on a cache hit
        loss = pretrain(model_cfg, texts, folder)
    log(f"[lark] pretrained in {time.perf_counter() - start:.0f} s, last loss {loss:.3f}; cached: {folder}")
    return folder


class StepProgress(L.Callback):
    """Pretraining progress by optimizer step with an ETA (lark.console.progress; a terminal only): pretraining
    is bounded by steps, so Lightning's epoch bar (`Epoch 5/-2` with max_epochs=-1) would mislead."""

    def __init__(self, steps):
        self.steps, self.bar, self.loss = steps, None, float("nan")

    def on_train_start(self, trainer, pl_module):
        self.bar = progress(None, "pretraining", total=self.steps, unit="step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {self.loss:.3f}")

    def on_train_end(self, trainer, pl_module):
        self.bar.close()


@contextmanager
def quiet_trainer():
    """Lightning's per-Trainer notices (devices found, why fit stopped) at WARNING for the internal pretraining
    Trainer: the fine-tuning Trainer prints the same lines, once."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def pretrain(model_cfg, texts, folder):
    p = model_cfg.pretrain
    tokenizer = train_tokenizer(texts, model_cfg.tokenizer.vocab_size)
    torch.manual_seed(p.seed)
    model = build_tiny(model_cfg, tokenizer)
    blocks = pack(tokenizer, texts, p.max_length)
    loader = make_loader(blocks, p.batch_size, tokenizer.pad_token_id, shuffle=True, seed=p.seed)
    module = CausalLMModule(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=p.lr, weight_decay=p.get("weight_decay", 0.0)),
        scheduler=functools.partial(
            torch.optim.lr_scheduler.CosineAnnealingLR, T_max=p.steps, eta_min=p.lr * p.get("min_lr_ratio", 0.1)
        ),
        scheduler_interval="step",
        stage="pretrain",
    )
    steps = StepProgress(p.steps)
    with quiet_trainer():
        trainer = L.Trainer(
            accelerator="cpu",  # always: the same weights on every machine for the same cache key
            devices=1,
            max_steps=p.steps,
            max_epochs=-1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            deterministic=True,
            gradient_clip_val=p.get("gradient_clip_val", 1.0),
            log_every_n_steps=50,
            enable_progress_bar=False,
            callbacks=[steps],
        )
        trainer.fit(module, loader)
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tokenizer, folder)
    return steps.loss


def tiny_model(model_cfg, corpora, cache_dir, log=print, **_):
    """The embedded default's base model (model=tiny's `load`): pretrained here on every corpus's documents, in
    data.corpora's order (cached), then loaded like any checkpoint."""
    texts = [d["text"] for docs in corpora.values() for d in docs]
    return load_pretrained(pretrain_tiny(model_cfg, texts, cache_dir, log), model_cfg)
