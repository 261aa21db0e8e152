"""Fingerprints of what produced a result: the checkpoint's weights, the tokenizer, the format, the examples.
Stores and metrics.json record them, so that results of different inputs are never mixed or mistaken for
each other (a resumed run reuses only what matches)."""

import hashlib
import json

import torch
from omegaconf import OmegaConf

# Where configs' `_target_`s moved when lark/ became wings (0.2). Hashes of configs name a target by its first
# name, so that a run, a cached base model or an LDS retrain computed before a move still matches its
# fingerprint; lark.legacy maps a saved config's old names to today's.
MOVED = {
    "lark.data.JsonlRows": "lark.data.readers.JsonlRows",
    "lark.data.HubRows": "lark.data.readers.HubRows",
    "lark.projector.CountSketch": "lark.kernel.projectors.CountSketch",
    "lark.projector.GaussianProjector": "lark.kernel.projectors.GaussianProjector",
    "lark.projector.ExactProjector": "lark.kernel.projectors.ExactProjector",
    "lark.world": "lark.data.world",
    "lark.sources": "lark.data.sources",
    "lark.formats": "lark.data.formats",
    "lark.datamodule": "lark.data.datamodule",
    "lark.canary": "lark.validation.canary",
    "lark.lds": "lark.validation.lds",
    "lark.validation": "lark.validation.table5",
    "lark.retrieval": "lark.validation.recall",
    "lark.analysis": "lark.analysis.analyze",
    "lark.report": "lark.analysis.report",
    "lark.browser": "lark.analysis.browser",
    "lark.metrics_schema": "lark.analysis.schema",
    "lark.sketch": "lark.kernel.sketch",
    "lark.kernels": "lark.kernel.kernels",
    "lark.stores": "lark.kernel.stores",
    "lark.fidelity": "lark.kernel.fidelity",
    "lark.selfcheck": "lark.kernel.selfcheck",
}
FIRST_NAME = {new: old for old, new in MOVED.items()}


def renamed(target, names):
    """A dotted `_target_` with its longest prefix found in `names` replaced (unchanged when none is)."""
    parts = target.split(".")
    for i in range(len(parts), 1, -1):
        prefix = ".".join(parts[:i])
        if prefix in names:
            return ".".join([names[prefix]] + parts[i:])
    return target


def first_names(obj):
    """obj (JSON-like) with every `_target_` under its first name (see MOVED)."""
    if isinstance(obj, dict):
        return {
            k: renamed(v, FIRST_NAME) if k == "_target_" and isinstance(v, str) else first_names(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [first_names(v) for v in obj]
    return obj


PROJECTOR_VERSION = 1  # bump when a projector gives other vectors for the same spec (stores of two versions never mix)


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
    return {
        "checkpoint": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": format_fingerprint(fmt),
    }


def content_hash(*parts):
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    blob = json.dumps(first_names(parts), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def without_locations(node):
    """A config node as a container without its `index_dir` keys: where a BM25 index is cached changes no result
    (a run resumed with another cache folder must reuse its epochs)."""

    def drop(obj):
        if isinstance(obj, dict):
            return {k: drop(v) for k, v in obj.items() if k != "index_dir"}
        return [drop(v) for v in obj] if isinstance(obj, list) else obj

    return drop(OmegaConf.to_container(node, resolve=True))
