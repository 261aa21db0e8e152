"""Random projections of per-example gradients to k dimensions.

A projector is fixed by (seed, parameter names and shapes): the same gradient always gives the same vector,
whatever the batch, the process or the device, and adding a parameter does not move the others' coordinates.
Cosine similarity of projections approximates cosine similarity of the full gradients (Johnson-Lindenstrauss).

- CountSketch (kind `rapidin`, RapidIn's RapidGrad): coordinate i of parameter `name` is added, with a random
  sign, to a random bucket of k. Bucket and sign come from a counter-based hash of (seed, name, i), so no
  permutation table or P x k matrix is ever stored: O(P) per example.
- GaussianProjector (kind `gaussian`): dense N(0, 1/k) matrix, the textbook reference; tiny models only.
- ExactProjector (kind `exact`): no projection (k = P), for checking the others.
- HookSketch (kind `sketch`, the default, lark/sketch.py): the count sketch computed from forward/backward hooks,
  batched, without the model's weight-gradient GEMMs.

Every projector has project_batch(model, batch) -> [B, k]; the first three also project(grads) one gradient.
Projectors are chosen with `attribution/projector=<sketch|rapidin|gaussian|exact>` (conf/attribution/projector/,
`_target_` configs built by make_projector with the model and the kernel's normalisation and optimizer
correction, lark/kernels.py); a class of your own plugs in by its `_target_`.
"""
import hashlib
import math

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1


def name_key(seed, name, salt):
    """A 32-bit key for one parameter, independent of every other parameter."""
    digest = hashlib.blake2b(f"{seed}|{name}|{salt}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def mix32(x):
    """MurmurHash3's 32-bit finaliser on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def hashed(index, key):
    """Independent-looking 32-bit values for coordinates `index` under `key`."""
    return mix32((index * GOLDEN + key) & MASK32)


def random_signs(index, key):
    """+1 / -1 (float32) for coordinates `index` under `key`."""
    return (hashed(index, key) & 1).to(torch.float32) * 2 - 1


def normalize_tensors(grads, how):
    """RapidIn's per-tensor L2 normalisation (how = per_tensor), or nothing (how = none)."""
    if how == "none":
        return grads
    if how != "per_tensor":
        raise ValueError(f"attribution.projector.normalize: unknown '{how}' (none or per_tensor)")
    norms = {n: torch.linalg.vector_norm(g, dtype=torch.float64).clamp_min(1e-30) for n, g in grads.items()}
    return {n: g / norms[n].to(g.dtype) for n, g in grads.items()}   # float64 sums: 10^7-element tensors


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def example_gradient(model, batch, params):
    """(loss, {name: d loss / d param}) for a batch of one example (mean loss over its loss tokens)."""
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return loss.detach(), {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)}


class PerExample:
    """project_batch by one backward pass per example on the materialised gradient (the reference path).
    `precondition` (lark.kernels.AdamScale, set by make_projector) corrects each gradient before the projection."""

    precondition = None

    @classmethod
    def of_model(cls, model, **options):
        """The projector for a model's trainable parameters (the `_target_` of the projector configs)."""
        return cls({n: tuple(p.shape) for n, p in trainable(model)}, **options)

    def described(self, spec):
        return {**spec, "precondition": self.precondition.spec()} if self.precondition is not None else spec

    def project_batch(self, model, batch):
        params = trainable(model)
        rows = []
        for b, n in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            loss, grads = example_gradient(model, {k: v[b:b + 1, :n] for k, v in batch.items()}, params)
            if self.precondition is not None:
                grads = self.precondition.apply(grads)
            v = self.project(grads)
            rows.append(v if torch.isfinite(loss) else torch.full_like(v, float("nan")))
        return torch.stack(rows)


class CountSketch(PerExample):
    """Count sketch of the concatenated gradient: out[h(i)] += s(i) * g[i]."""

    kind = "rapidin"

    def __init__(self, shapes, k, seed=0, normalize="none", cache_elements=2**26, precondition=None):
        self.shapes, self.k, self.seed, self.normalize = dict(shapes), int(k), int(seed), normalize
        self.precondition = precondition
        self.cache = {}
        self.cache_ok = sum(math.prod(s) for s in self.shapes.values()) <= cache_elements

    def buckets_and_signs(self, name, numel, device):
        if name in self.cache:
            return self.cache[name]
        index = torch.arange(numel, dtype=torch.int64, device=device)
        bucket = hashed(index, name_key(self.seed, name, "bucket")) % self.k
        sign = random_signs(index, name_key(self.seed, name, "sign"))
        if self.cache_ok:
            self.cache[name] = (bucket, sign)
        return bucket, sign

    def project(self, grads):
        """grads: {name: tensor of the parameter's shape} -> [k] float32."""
        grads = normalize_tensors(grads, self.normalize)
        out = None
        for name, g in grads.items():
            flat = g.reshape(-1).float()
            out = torch.zeros(self.k, device=flat.device) if out is None else out
            bucket, sign = self.buckets_and_signs(name, flat.numel(), flat.device)
            out.index_add_(0, bucket, flat * sign)
        return out

    def spec(self):
        return self.described({"kind": self.kind, "k": self.k, "seed": self.seed, "normalize": self.normalize,
                               "hash": "murmur3-fmix32"})


class GaussianProjector(PerExample):
    """Dense Gaussian projection g -> R^T g / sqrt(k), R[i, j] ~ N(0, 1), generated per parameter from its key."""

    kind = "gaussian"

    def __init__(self, shapes, k, seed=0, normalize="none", max_dense_elements=200_000_000, precondition=None):
        self.shapes, self.k, self.seed, self.normalize = dict(shapes), int(k), int(seed), normalize
        self.precondition = precondition
        total = sum(math.prod(s) for s in self.shapes.values()) * self.k
        if total > max_dense_elements:
            raise ValueError(f"attribution/projector=gaussian needs a P x k = {total:,} matrix, more than "
                             f"attribution.projector.max_dense_elements={max_dense_elements:,}; use "
                             "attribution/projector=rapidin or a smaller k")
        self.matrices = {}

    def matrix(self, name, numel, device):
        if name not in self.matrices:
            gen = torch.Generator().manual_seed(name_key(self.seed, name, "gaussian"))
            self.matrices[name] = torch.randn(numel, self.k, generator=gen).div_(math.sqrt(self.k)).to(device)
        return self.matrices[name]

    def project(self, grads):
        grads = normalize_tensors(grads, self.normalize)
        return sum(g.reshape(-1).float() @ self.matrix(n, g.numel(), g.device) for n, g in grads.items())

    def spec(self):
        return self.described({"kind": self.kind, "k": self.k, "seed": self.seed, "normalize": self.normalize})


class ExactProjector(PerExample):
    """No projection: the full gradient, concatenated in parameter order (k = P)."""

    kind = "exact"

    def __init__(self, shapes, normalize="none", precondition=None):
        self.shapes, self.normalize, self.precondition = dict(shapes), normalize, precondition
        self.k = sum(math.prod(s) for s in self.shapes.values())

    def project(self, grads):
        grads = normalize_tensors(grads, self.normalize)
        return torch.cat([g.reshape(-1).float() for g in grads.values()])

    def spec(self):
        return self.described({"kind": self.kind, "k": self.k, "normalize": self.normalize})


# Configs saved before attribution/projector and attribution/kernel existed: `attribution.projector.kind` (+ the
# keys below, the others had no effect on that kind) and `normalize` (none -> cosine, per_tensor -> rapidin).
LEGACY = {"sketch": ("lark.sketch.HookSketch", ("k", "seed", "method", "plan_tokens", "cache_bytes")),
          "rapidin": ("lark.projector.CountSketch.of_model", ("k", "seed")),
          "gaussian": ("lark.projector.GaussianProjector.of_model", ("k", "seed", "max_dense_elements")),
          "exact": ("lark.projector.ExactProjector.of_model", ())}
LEGACY_KERNELS = {"none": "lark.kernels.Cosine", "per_tensor": "lark.kernels.RapidIn"}


def upgrade(attr):
    """An `attribution` config in today's form. One saved before the projector and kernel groups (a projector with
    `kind`, `normalize`) is mapped to the `_target_` configs it meant; so are such keys given as overrides
    (attribute.py): `kind` picks the projector, `normalize` the kernel (none -> cosine, per_tensor -> rapidin).
    A bare projector config (`{kind: ..., k: ...}`, as older callers pass) is read as {projector: it}."""
    if "projector" not in attr and {"kind", "_target_"} & set(attr):
        attr = OmegaConf.create({"projector": OmegaConf.to_container(attr, resolve=True)})
    projector = attr.get("projector")
    if projector is None or not {"kind", "normalize"} & set(projector):
        return attr
    old = OmegaConf.to_container(projector, resolve=True)
    new = OmegaConf.create(OmegaConf.to_container(attr, resolve=True))
    if "kind" in old:
        if old["kind"] not in LEGACY:
            raise ValueError(f"attribution.projector.kind: unknown '{old['kind']}' ({', '.join(LEGACY)})")
        target, keys = LEGACY[old["kind"]]
        new.projector = {"_target_": target, "_partial_": True, **{k: old[k] for k in keys if k in old}}
    else:
        new.projector = {k: v for k, v in old.items() if k != "normalize"}
    if "normalize" in old:
        normalize = old["normalize"]
        if normalize not in LEGACY_KERNELS:
            raise ValueError(f"attribution.projector.normalize: unknown '{normalize}' (none or per_tensor)")
        if "kernel" in new and new.kernel.get("_target_") not in LEGACY_KERNELS.values():
            raise ValueError("attribution.projector.normalize is the kernel's choice now: use attribution/kernel="
                             "rapidin (per-tensor) or the kernel's own normalize key")
        new.kernel = {"_target_": LEGACY_KERNELS[normalize]}
    if "kernel" not in new:   # a config from before the kernels: the unnormalised cosine it computed
        new.kernel = {"_target_": LEGACY_KERNELS["none"]}
    return new


def built(build):
    """build() with Hydra's InstantiationException unwrapped: a bad value's own error (naming its key) is raised."""
    from hydra.errors import InstantiationException

    try:
        return build()
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


def make_kernel(attr):
    """The kernel (lark.kernels) of an `attribution` config."""
    return built(lambda: instantiate(upgrade(attr).kernel))


def make_projector(attr, model, kernel=None, moments=None):
    """The projector of an `attribution` config for the model's trainable parameters: the `attribution.projector`
    factory called as factory(model, normalize=<the kernel's>, precondition=<the kernel's optimizer correction,
    when it has one>). moments: the checkpoint's AdamW moments (lark.kernels.Moments) for kernels that use them."""
    attr = upgrade(attr)
    if "k" in attr.projector and (attr.projector.k is None or int(attr.projector.k) <= 0):
        raise ValueError(f"attribution.projector.k must be a positive integer, got {attr.projector.k}")
    kernel = kernel or make_kernel(attr)
    options = {"normalize": kernel.normalize}
    precondition = kernel.preconditioner(moments, model)
    if precondition is not None:
        options["precondition"] = precondition
    return built(lambda: instantiate(attr.projector, _partial_=True))(model, **options)
