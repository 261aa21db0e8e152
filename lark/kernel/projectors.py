"""Random projections of per-example gradients to k dimensions.

A projector is fixed by (seed, parameter names and shapes): the same gradient always gives the same vector,
whatever the batch, the process or the device, and adding a parameter does not move the others' coordinates.
Cosine similarity of projections approximates cosine similarity of the full gradients (Johnson-Lindenstrauss).

- CountSketch (kind `rapidin`, RapidIn's RapidGrad): coordinate i of parameter `name` is added, with a random
  sign, to a random bucket of k. Bucket and sign come from a counter-based hash of (seed, name, i), so no
  permutation table or P x k matrix is ever stored: O(P) per example.
- GaussianProjector (kind `gaussian`): dense N(0, 1/k) matrix, the textbook reference; tiny models only.
- ExactProjector (kind `exact`): no projection (k = P), for checking the others.
- HookSketch (kind `sketch`, the default, lark/kernel/sketch.py): the count sketch computed from forward/backward hooks,
  batched, without the model's weight-gradient GEMMs.
- FactoredProjector (kind `factored`, lark/kernel/factored.py; LoGra / Bergson): each Linear module's gradient
  projected from its factors, sum_t (P_out delta_t)(P_in x_t)^T, from the same hooks: cheaper per layer, but a
  module's error is that of two r-dim projections multiplied (~sqrt(1/r_out + 1/r_in)), not ~1/sqrt(k).

Every projector has project_batch(model, batch) -> [B, k]; the first three also project(grads) one gradient.
Projectors are chosen with `attribution/projector=<sketch|factored|rapidin|gaussian|exact>`
(conf/attribution/projector/, `_target_` configs built by make_projector with the model and the kernel's
normaliser (`normalize=`, a lark.kernel.normalizers class; "none" / "per_tensor" strings are accepted too) and
optimizer correction, lark/kernel/kernels.py); a class of your own plugs in by its `_target_`. Its class attribute
`self_check` says whether lark.kernel.selfcheck must check it on the model before a run (HookSketch's hooks can miss
layers; the per-example projectors, which take autograd's gradient, cannot; FactoredProjector refuses layers its
hooks do not reach itself and is checked against autograd by tests/test_factored.py).
"""

import math

import torch

from lark.kernel.hashing import hashed, name_key, random_signs
from lark.kernel.normalizers import normalizer


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def example_gradient(model, batch, params):
    """(loss, {name: d loss / d param}) for a batch of one example (mean loss over its loss tokens)."""
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return loss.detach(), {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)}


class PerExample:
    """project_batch by one backward pass per example on the materialised gradient (the reference path).
    `precondition` (lark.kernel.optimizer.AdamScale, set by make_projector) corrects each gradient before the
    projection."""

    precondition = None
    self_check = False  # autograd's whole gradient: nothing for lark.kernel.selfcheck to check

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
            loss, grads = example_gradient(model, {k: v[b : b + 1, :n] for k, v in batch.items()}, params)
            if self.precondition is not None:
                grads = self.precondition.apply(grads)
            v = self.project(grads)
            rows.append(v if torch.isfinite(loss) else torch.full_like(v, float("nan")))
        return torch.stack(rows)


class CountSketch(PerExample):
    """Count sketch of the concatenated gradient: out[h(i)] += s(i) * g[i]."""

    kind = "rapidin"

    def __init__(self, shapes, k, seed=0, normalize="none", cache_elements=2**26, precondition=None):
        self.shapes, self.k, self.seed, self.normalizer = dict(shapes), int(k), int(seed), normalizer(normalize)
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
        grads = self.normalizer(grads)
        out = None
        for name, g in grads.items():
            flat = g.reshape(-1).float()
            out = torch.zeros(self.k, device=flat.device) if out is None else out
            bucket, sign = self.buckets_and_signs(name, flat.numel(), flat.device)
            out.index_add_(0, bucket, flat * sign)
        return out

    def spec(self):
        return self.described(
            {
                "kind": self.kind,
                "k": self.k,
                "seed": self.seed,
                "normalize": self.normalizer.name,
                "hash": "murmur3-fmix32",
            }
        )


class GaussianProjector(PerExample):
    """Dense Gaussian projection g -> R^T g / sqrt(k), R[i, j] ~ N(0, 1), generated per parameter from its key."""

    kind = "gaussian"

    def __init__(self, shapes, k, seed=0, normalize="none", max_dense_elements=200_000_000, precondition=None):
        self.shapes, self.k, self.seed, self.normalizer = dict(shapes), int(k), int(seed), normalizer(normalize)
        self.precondition = precondition
        total = sum(math.prod(s) for s in self.shapes.values()) * self.k
        if total > max_dense_elements:
            raise ValueError(
                f"attribution/projector=gaussian needs a P x k = {total:,} matrix, more than "
                f"attribution.projector.max_dense_elements={max_dense_elements:,}; use "
                "attribution/projector=rapidin or a smaller k"
            )
        self.matrices = {}

    def matrix(self, name, numel, device):
        if name not in self.matrices:
            gen = torch.Generator().manual_seed(name_key(self.seed, name, "gaussian"))
            self.matrices[name] = torch.randn(numel, self.k, generator=gen).div_(math.sqrt(self.k)).to(device)
        return self.matrices[name]

    def project(self, grads):
        grads = self.normalizer(grads)
        return sum(g.reshape(-1).float() @ self.matrix(n, g.numel(), g.device) for n, g in grads.items())

    def spec(self):
        return self.described({"kind": self.kind, "k": self.k, "seed": self.seed, "normalize": self.normalizer.name})


class ExactProjector(PerExample):
    """No projection: the full gradient, concatenated in parameter order (k = P)."""

    kind = "exact"

    def __init__(self, shapes, normalize="none", precondition=None):
        self.shapes, self.normalizer, self.precondition = dict(shapes), normalizer(normalize), precondition
        self.k = sum(math.prod(s) for s in self.shapes.values())

    def project(self, grads):
        grads = self.normalizer(grads)
        return torch.cat([g.reshape(-1).float() for g in grads.values()])

    def spec(self):
        return self.described({"kind": self.kind, "k": self.k, "normalize": self.normalizer.name})
