"""The score matrices Table V measures: each kernel's at one checkpoint, and the baselines' (BM25, random).

A kernel's scores come from projecting every query, every fine-tuning item and every pool candidate here (the
run's own stores hold only `source.size` fine-tuning items), cached under <run>/validation/scores/<kernel>/epoch_NNN
and keyed by content (the kernel's config, the model's fingerprints, max_length, the examples and their token ids);
with another projector than the run's (validate.projectors), in
<run>/validation/scores/<kernel>/<projector>/epoch_NNN.

    scores = kernel_scores(run, "cosine", kernel_config(run.cfg, "cosine"), model, tokenizer, folder)
    # -> {"train": [Q, N] cosine, "pool": [Q, P] cosine, "q_norm": [Q], "t_norm": [N], "k": [] the vectors' k}
    attr = with_projector(kernel_config(run.cfg, "cosine"), run.cfg, "factored")
"""

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open

from lark.data.bm25 import BM25
from lark.data.formats import encode
from lark.data.io import check_safetensors
from lark.data.sources import example_text
from lark.errors import ConfigError, CorruptFile, RunDirError
from lark.fingerprints import PROJECTOR_VERSION, content_hash, fingerprints
from lark.kernel.build import examples_fingerprint, project_examples
from lark.kernel.factory import make_kernel, make_projector, upgrade
from lark.kernel.optimizer import MOMENTS_FILE, Moments, adam_eps
from lark.kernel.stores import atomic_save, unit_rows
from lark.validation.load import CONF

KERNELS = CONF / "attribution" / "kernel"
PROJECTORS = CONF / "attribution" / "projector"


def kernel_file(name):
    """conf/attribution/kernel/<name>.yaml, or a ConfigError naming validate.kernels and the known names."""
    path = KERNELS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in KERNELS.glob("*.yaml")))
        raise ConfigError(f"validate.kernels: unknown kernel '{name}' ({known})")
    return path


def kernel_config(run_cfg, name):
    """The run's attribution config with kernel `name` of the attribution/kernel group (conf/attribution/kernel):
    the run's own kernel config when it is that kernel (its mix, damping, normalize as trained), else the group's
    file with its `eps` set to the run's optimizer.eps (torch's AdamW default when the run sets none)."""
    attr = OmegaConf.create(OmegaConf.to_container(upgrade(run_cfg.attribution), resolve=True))
    node = OmegaConf.load(kernel_file(name))
    if attr.kernel.get("_target_") == node.get("_target_"):
        return attr
    if "eps" in node:
        node.eps = adam_eps(run_cfg)
    attr.kernel = node
    return attr


def own_projector(run_attr):
    """The name of the attribution/projector config (conf/attribution/projector/<name>.yaml) whose _target_ the
    run's projector has (a run saved before the groups existed is read through upgrade), or None."""
    target = upgrade(run_attr).projector.get("_target_")
    names = [p.stem for p in sorted(PROJECTORS.glob("*.yaml")) if OmegaConf.load(p).get("_target_") == target]
    return names[0] if names else None


def projector_file(name):
    """conf/attribution/projector/<name>.yaml, or a ConfigError naming validate.projectors and the known names."""
    path = PROJECTORS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROJECTORS.glob("*.yaml")))
        raise ConfigError(f"validate.projectors: unknown projector '{name}' ({known})")
    return path


def with_projector(attr, run_cfg, name):
    """attr (kernel_config's) with projector `name` of the attribution/projector group: the run's own projector
    config when `name` is the run's projector, else conf/attribution/projector/<name>.yaml with the run's k (where
    both have a k; `factored` derives its ranks from it) and its interpolations resolved in the run's config."""
    path = projector_file(name)
    if name == own_projector(run_cfg.attribution):
        return attr
    node, own_k = OmegaConf.load(path), attr.projector.get("k")
    if "k" in node and own_k is not None:
        node.k = own_k
    root = OmegaConf.create(OmegaConf.to_container(run_cfg))  # ${max_length} and the like resolve against the run
    root.attribution.projector = node
    attr = OmegaConf.create(OmegaConf.to_container(attr))
    attr.projector = OmegaConf.to_container(root.attribution.projector, resolve=True)
    return attr


def read_cached(path, key, log=print):
    """The cached tensors at `path` when it was written for `key` and passes its checksum, else None (computed
    again; a corrupted cache is logged)."""
    try:
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except CorruptFile as error:
        log(f"[lark] {error}: recomputed")
        return None
    except (OSError, ValueError, SafetensorError):
        return None


def kernel_scores(run, name, attr, model, tokenizer, checkpoint):
    """{train, pool: cosine [Q, N]; q_norm [Q], t_norm [N]; k []: the vectors' dimension} of kernel `name` (config
    attr) at one checkpoint (cached in <run>/validation/scores/<name>/<checkpoint folder>/scores.safetensors; name
    may hold a slash: "cosine/factored")."""
    sets = {"queries": run.queries, "train": run.train_fields, "pool": run.pool}
    encoded = {
        name: [encode(tokenizer, e, run.cfg.format, run.cfg.max_length) for e in examples]
        for name, examples in sets.items()
    }
    kernel = make_kernel(attr)
    projector = make_projector(attr, model, kernel, checkpoint_moments(kernel, checkpoint))
    key = content_hash(
        OmegaConf.to_container(attr, resolve=True),
        projector.spec(),  # what the stores record: a projector whose numbers changed says so here
        PROJECTOR_VERSION,
        fingerprints(model, tokenizer, run.cfg.format),
        run.cfg.max_length,
        sets,  # the examples themselves: validate.pool.format changes the pool's text, not its ids
        {name: examples_fingerprint(e) for name, e in encoded.items()},  # and their token ids (an earlier cut)
    )
    path = run.run_dir / "validation" / "scores" / name / checkpoint.name / "scores.safetensors"
    cached = read_cached(path, key, run.log)
    if cached is not None:
        run.log(f"[lark] {path}: cached, reused")
        return cached
    raw = {
        name: project_examples(model, examples, projector, tokenizer.pad_token_id, attr.batch_size)
        for name, examples in encoded.items()
        if examples
    }
    out = cosine_scores(kernel, raw) | {"k": torch.tensor(projector.k)}
    atomic_save({k: v.contiguous() for k, v in out.items()}, path, {"key": key})
    return out


def checkpoint_moments(kernel, checkpoint):
    """The checkpoint's AdamW moments (saved by train.py, attribution.save_moments) when the kernel uses them."""
    if not kernel.uses_optimizer:
        return None
    if not (checkpoint / MOMENTS_FILE).is_file():
        raise RunDirError(
            f"{checkpoint / MOMENTS_FILE}: not found; validate.kernels '{kernel.name}' needs the "
            "run's AdamW moments (train.py with attribution.save_moments=true)"
        )
    return Moments.load(checkpoint / MOMENTS_FILE)


def cosine_scores(kernel, raw):
    """{train [Q, N], pool [Q, P] (when projected): the kernel's cosine; q_norm [Q], t_norm [N]: the raw norms}
    from raw projections {queries [Q, k], train [N, k], pool [P, k]}."""
    vectors = kernel.transform({name: unit_rows(v) for name, v in raw.items()}, "queries")  # e.g. TrackStar's R^-1/2
    q = vectors["queries"]
    out = {"train": q @ vectors["train"].T, "q_norm": raw["queries"].norm(dim=1), "t_norm": raw["train"].norm(dim=1)}
    if "pool" in vectors:
        out["pool"] = q @ vectors["pool"].T
    return out


def tracin_term(scores, lr):
    """[Q, N] one checkpoint's TracIn-CP term: lr x the kernel's cosine x both raw norms, = lr x <g(q), g(d)> for
    cosine (rapidin: its norms are of per-tensor-normalised vectors; trackstar: a whitened cosine, unwhitened
    norms; docs/validation.md)."""
    dots = scores["train"] * scores["q_norm"][:, None] * scores["t_norm"][None, :]
    return lr * dots


def bm25_scores(queries, docs):
    """[Q, N] Okapi BM25 scores of the query questions against the documents' text (as Table IV's baseline)."""
    return BM25([example_text(d) for d in docs]).matrix([q["question"] for q in queries]).float()


def bm25_baseline(run):
    """(train [Q, N], pool [Q, P] or None): BM25 of each question against each item's and candidate's text."""
    return bm25_scores(run.queries, run.train_fields), bm25_scores(run.queries, run.pool) if run.pool else None


def random_baseline(run):
    """(train [Q, N], pool [Q, P] or None): uniform scores from validate.random_seed (chance)."""
    g = torch.Generator().manual_seed(int(run.vcfg.random_seed))
    train = torch.rand(len(run.test), len(run.train), generator=g)
    pool = torch.rand(len(run.test), len(run.pool), generator=g) if run.pool else None
    return train, pool


BASELINES = {"bm25": bm25_baseline, "random": random_baseline}  # Table V's rows after the kernels', in this order
