"""The embedded default's base model: a tokenizer and a tiny OLMo-3 trained here on the generated pretraining
corpus, so that the "pretraining data" of the experiment really is the model's pretraining data.
The result (= epoch 0 of fine-tuning) is cached by a hash of the corpus and the configs; the cache folder is
written under a temporary name and renamed when complete, so a killed pretraining leaves nothing that is trusted."""
import functools
import hashlib
from pathlib import Path

import lightning as L
import torch

from lark.models import build_tiny, content_hash, load_pretrained, save_checkpoint, train_tokenizer
from lark.training import CausalLMModule, make_loader


def pack(tokenizer, texts, block):
    """Concatenate the documents (each closed by the end token) and cut them into blocks of `block` tokens."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
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
    with torch.random.fork_rng(devices=[]):  # fine-tuning's RNG state does not depend on a cache hit
        pretrain(model_cfg, texts, folder)
    return folder


def pretrain(model_cfg, texts, folder):
    p = model_cfg.pretrain
    tokenizer = train_tokenizer(texts, model_cfg.tokenizer.vocab_size)
    torch.manual_seed(p.seed)
    model = build_tiny(model_cfg, tokenizer)
    blocks = pack(tokenizer, texts, p.max_length)
    loader = make_loader(blocks, p.batch_size, tokenizer.pad_token_id, shuffle=True, seed=p.seed)
    module = CausalLMModule(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=p.lr, weight_decay=0.0),
        scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=p.steps, eta_min=p.lr * 0.1),
        scheduler_interval="step",
        stage="pretrain",
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=p.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, deterministic=True,
                        gradient_clip_val=1.0, log_every_n_steps=50)
    trainer.fit(module, loader)
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tokenizer, folder)


def tiny_model(model_cfg, corpora, cache_dir, log=print, **_):
    """The embedded default's base model (model=tiny's `load`): pretrained here on every corpus's documents, in
    data.corpora's order (cached), then loaded like any checkpoint."""
    texts = [d["text"] for docs in corpora.values() for d in docs]
    return load_pretrained(pretrain_tiny(model_cfg, texts, cache_dir, log), model_cfg)
