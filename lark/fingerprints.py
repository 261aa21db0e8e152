"""Fingerprints of what produced a result: the checkpoint's weights, the tokenizer, the format, the examples.
Stores and metrics.json record them, so that results of different inputs are never mixed or mistaken for
each other (a resumed run reuses only what matches)."""
import hashlib

import torch
from omegaconf import OmegaConf

from lark.models import content_hash

PROJECTOR_VERSION = 1   # bump when a projector gives other vectors for the same spec (stores of two versions never mix)


def model_fingerprint(model):
    """Hash of every tensor of the state dict (names, dtypes, shapes and bytes): equal iff the weights are equal."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer):
    """Hash of the tokenizer's full definition (vocabulary, merges, normaliser, specials) and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return content_hash(vocab, getattr(tokenizer, "chat_template", None), tokenizer.pad_token, tokenizer.eos_token)


def format_fingerprint(fmt):
    """The format's name and a hash of its whole config (templates, system prompt, answer template)."""
    return f"{fmt.name}:{content_hash(OmegaConf.to_container(fmt, resolve=True))}"


def fingerprints(model, tokenizer, fmt):
    return {"checkpoint": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "format": format_fingerprint(fmt)}
