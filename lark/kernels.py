"""Attribution kernels: what is done to per-example gradients before, and to their projections after, the random
projection, so that influence = the cosine of what comes out. Chosen with `attribution/kernel=<name>`
(conf/attribution/kernel/*.yaml, each a `_target_` of a class here):

- `cosine` (Cosine): the plain cosine of the projected gradients.
- `rapidin` (RapidIn): each parameter tensor's gradient L2-normalised before the projection, as RapidIn's
  `calc_inner.grad_z` does (`normalize(p.grad.reshape(-1))` for every parameter, then concatenated): the paper's.
- `adam` (Adam): optimizer-aware (TrackStar's correction, LESS's idea): every coordinate divided by sqrt(v_hat) + eps,
  v_hat the run's own bias-corrected AdamW second moments at that checkpoint (AdamScale). Matrices use the
  factored (Adafactor) form v_hat ~ r c^T / mean(r) (r, c = row and column means of v_hat), which the hook sketch
  applies by scaling its GEMM inputs: diag(r^-1/2) G diag(c^-1/2) = (Delta r^-1/2)^T (X c^-1/2) * sqrt(mean r).
  `factored: false` divides by the full v_hat (per-example projectors only: rapidin, gaussian, exact).
- `trackstar` (TrackStar): the Adam correction, the projection, then R^-1/2 with R the mix of the query and the
  training sets' second moments in the k-dim space (directions every query shares are down-weighted), then unit
  normalisation -- TrackStar's order. R is estimated from the stored unit vectors (whiten()).
- `tracin_cp` (TracInCP): per checkpoint the plain cosine; over the run, TracIn-CP's learning-rate-weighted sum of
  gradient inner products (lark/tracin.py writes attribution/tracin_cp/).

Epoch 0 (the base model) has no optimizer state: its moments are estimated from one pass over the fine-tuning set
in training order's batches (no step taken, gradients clipped like training's): the mean of the squared batch
gradients, which is what AdamW's bias-corrected v_hat approaches at beta2 -> 1 with the weights held at epoch 0.
"""
import hashlib
import json

import torch
from safetensors import safe_open

from lark.errors import ConfigError
from lark.stores import unit_rows

MOMENTS_FILE = "adam_moments.safetensors"   # beside each checkpoint: checkpoints/epoch_NNN/adam_moments.safetensors


# ------------------------------------------------------------------------------------------------ moments
class Moments:
    """Second moments v_hat of every trainable parameter at one checkpoint: {name: {"v": tensor}} (full) or
    {name: {"row": [shape[0]], "col": [numel / shape[0]]}} (factored: means of v_hat over columns and rows).
    source: "optimizer" (the run's AdamW state, bias-corrected) or "estimate" (epoch 0, one pass)."""

    def __init__(self, tensors, source):
        self.tensors, self.source = tensors, source

    def fingerprint(self):
        h = hashlib.sha256(self.source.encode())
        for name in sorted(self.tensors):
            for part, t in sorted(self.tensors[name].items()):
                t = t.detach().float().cpu().contiguous()
                h.update(f"{name}|{part}|{tuple(t.shape)}|".encode())
                h.update(memoryview(t.view(torch.uint8).numpy()))
        return h.hexdigest()[:16]

    def save(self, path):
        from lark.stores import atomic_save

        flat = {f"{name}::{part}": t.detach().float().cpu().contiguous()
                for name, parts in self.tensors.items() for part, t in parts.items()}
        atomic_save(flat, path, {"source": json.dumps(self.source)})

    @classmethod
    def load(cls, path):
        with safe_open(str(path), framework="pt") as f:
            source = json.loads(f.metadata()["source"])
            tensors = {}
            for key in f.keys():
                name, part = key.rsplit("::", 1)
                tensors.setdefault(name, {})[part] = f.get_tensor(key)
        return cls(tensors, source)


def shaped(v, factored):
    """One parameter's v_hat as stored: full, or (matrices and higher, when factored) row and column means."""
    v = v.detach().float().cpu()
    if factored and v.dim() >= 2:
        m = v.reshape(v.shape[0], -1)
        return {"row": m.mean(dim=1), "col": m.mean(dim=0)}
    return {"v": v}


def optimizer_moments(optimizer, model, factored=True):
    """Moments of an Adam-family optimizer's state (exp_avg_sq / (1 - beta2^step)); None for other optimizers.
    A parameter without state (never stepped) has v_hat = 0."""
    state = {id(p): (optimizer.state.get(p, {}), group) for group in optimizer.param_groups for p in group["params"]}
    if not any("exp_avg_sq" in s for s, _ in state.values()):
        return None
    tensors = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s, group = state.get(id(p), ({}, None))
        if "exp_avg_sq" in s:
            step = float(s["step"])
            v = s["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        else:
            v = torch.zeros_like(p, dtype=torch.float32)
        tensors[name] = shaped(v, factored)
    return Moments(tensors, "optimizer")


def estimate_moments(model, batches, clip=None, factored=True):
    """Epoch 0's moments: the mean over `batches` of each batch's squared mean-loss gradient (clipped to total
    norm `clip`, as training clips), weights unchanged, dropout off."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    device, count, was_training = next(model.parameters()).device, 0, model.training
    model.eval()
    try:
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g.float() for (_, p), g in zip(params, grads)]
            if clip:
                norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
                grads = [g * min(1.0, float(clip) / (float(norm) + 1e-6)) for g in grads]
            for (n, _), g in zip(params, grads):
                sums[n] += g.pow(2)
            count += 1
    finally:
        model.train(was_training)
    return Moments({n: shaped(s / max(count, 1), factored) for n, s in sums.items()}, "estimate")


def checkpoint_moments(attr, model, epoch, optimizer=None, loader=None, clip=None):
    """The moments to save beside (and attribute) checkpoint `epoch`, or None when neither the kernel needs them
    nor `attribution.save_moments` asks (a run with attribution off needs them only to save them): the optimizer's
    state after an epoch, the one-pass estimate at epoch 0."""
    from lark.projector import make_kernel

    kernel = make_kernel(attr)
    if not ((kernel.uses_optimizer and attr.get("enabled", True)) or attr.get("save_moments", False)):
        return None
    factored = getattr(kernel, "factored", True)
    if epoch > 0 and optimizer is not None:
        return optimizer_moments(optimizer, model, factored)
    if loader is None:
        return None
    from torch.utils.data import DataLoader

    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    return estimate_moments(model, ordered, clip, factored)


class AdamScale:
    """The optimizer correction of one checkpoint: every coordinate of a parameter's gradient times
    1 / (sqrt(v_hat) + eps) (full moments), or, for factored moments, times row_i * col_j with
    row = ((r + eps^2) / mean(r + eps^2))^-1/2 and col = (c + eps^2)^-1/2 -- 1 / sqrt(v_hat) of the factored
    v_hat = r c^T / mean(r) (exact when v_hat has rank one; eps^2 keeps zero rows finite, at Adam's 1/eps scale)."""

    def __init__(self, moments, eps, model):
        self.moments, self.eps = moments, float(eps)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in moments.tensors]
        if missing:
            raise ConfigError(f"attribution.kernel: the AdamW moments ({moments.source}) have no entry for "
                              f"{missing[:3]} ({len(missing)} parameters); they were saved for another model")
        self.cache = {}

    def spec(self):
        kinds = {"factored" if "row" in t else "full" for t in self.moments.tensors.values()}
        return {"moments": self.moments.fingerprint(), "source": self.moments.source, "eps": self.eps,
                "form": "+".join(sorted(kinds))}

    def factors(self, name, device):
        """(row [shape[0]], col [rest]) scales of a factored matrix (the hook sketch's GEMM inputs)."""
        key = ("factors", name, str(device))
        if key not in self.cache:
            parts = self.moments.tensors[name]
            if "row" not in parts:
                raise ConfigError(f"attribution.kernel.factored=false: the hook sketch (attribution/projector="
                                  f"sketch) can only apply factored moments ({name} is full); use "
                                  "attribution/projector=rapidin or exact for the unfactored reference")
            e2 = self.eps ** 2
            r, c = parts["row"].double() + e2, parts["col"].double() + e2
            self.cache[key] = ((r / r.mean()).rsqrt().float().to(device), c.rsqrt().float().to(device))
        return self.cache[key]

    def vector(self, name, device):
        """1 / (sqrt(v_hat) + eps) of a parameter stored in full (1-D parameters)."""
        key = ("vector", name, str(device))
        if key not in self.cache:
            v = self.moments.tensors[name]["v"].double()
            self.cache[key] = (1 / (v.sqrt() + self.eps)).float().to(device)
        return self.cache[key]

    def scale(self, name, shape, device):
        """The per-coordinate factor of a parameter, materialised in its shape."""
        if "row" in self.moments.tensors[name]:
            row, col = self.factors(name, device)
            return torch.outer(row, col).reshape(shape)
        return self.vector(name, device).reshape(shape)

    def apply(self, grads):
        """{name: gradient} -> {name: corrected gradient} (the per-example projectors' path)."""
        return {n: g * self.scale(n, g.shape, g.device) for n, g in grads.items()}

    def rows(self, name, tokens, grad):
        """Embedding gradients per position [B, T, d] corrected: position t's row is token tokens[b, t]'s."""
        row, col = self.factors(name, grad.device) if "row" in self.moments.tensors[name] else (None, None)
        if row is None:
            full = self.vector(name, grad.device).reshape(-1, grad.shape[-1])
            return grad * full[tokens].to(grad.dtype)
        return grad * row[tokens].unsqueeze(-1).to(grad.dtype) * col.to(grad.dtype)


# ------------------------------------------------------------------------------------------------ kernels
class Cosine:
    """Influence = cosine of the projected raw gradients."""

    name = "cosine"
    normalize = "none"          # per-tensor L2 normalisation before the projection (none | per_tensor)
    uses_optimizer = False      # needs the run's AdamW moments
    run_level = False           # also writes a run-level score over all checkpoints

    def options(self):
        return {}

    def spec(self):
        return {"name": self.name, "normalize": self.normalize, **self.options()}

    def preconditioner(self, moments, model):
        return None

    def transform(self, vectors, query_set):
        """{set: [n, k] unit vectors of one checkpoint} -> the vectors whose dot products are the scores."""
        return vectors


class RapidIn(Cosine):
    """RapidIn's kernel (the paper's): cosine of per-tensor L2-normalised gradients."""

    name = "rapidin"
    normalize = "per_tensor"


class Adam(Cosine):
    """Optimizer-aware cosine: coordinates divided by sqrt(v_hat) + eps of the run's AdamW at that checkpoint."""

    name = "adam"
    uses_optimizer = True

    def __init__(self, eps=1e-8, factored=True, normalize="none"):
        if normalize not in ("none", "per_tensor"):
            raise ConfigError(f"attribution.kernel.normalize: unknown '{normalize}' (none or per_tensor)")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ConfigError(f"attribution.kernel.eps must be a number >= 0, got {eps!r}")
        self.eps, self.factored, self.normalize = float(eps), bool(factored), normalize

    def options(self):
        return {"eps": self.eps, "factored": self.factored}

    def preconditioner(self, moments, model):
        if moments is None:
            raise ConfigError(f"attribution.kernel={self.name} needs the run's AdamW second moments at this "
                              f"checkpoint (checkpoints/epoch_NNN/{MOMENTS_FILE}); none were given")
        return AdamScale(moments, self.eps, model)


class TrackStar(Adam):
    """TrackStar: optimizer correction -> projection -> R^-1/2 (R = mix * R_queries + (1 - mix) * R_train) ->
    unit normalisation."""

    name = "trackstar"

    def __init__(self, eps=1e-8, factored=True, mix=0.99, damping=0.1):
        super().__init__(eps, factored)
        if not (isinstance(mix, (int, float)) and 0 <= mix <= 1):
            raise ConfigError(f"attribution.kernel.mix must be in [0, 1], got {mix!r}")
        if not (isinstance(damping, (int, float)) and damping > 0):
            raise ConfigError(f"attribution.kernel.damping must be > 0, got {damping!r}")
        self.mix, self.damping = float(mix), float(damping)

    def options(self):
        return {**super().options(), "mix": self.mix, "damping": self.damping}

    def transform(self, vectors, query_set):
        return whiten(vectors, query_set, self.mix, self.damping)


class TracInCP(Cosine):
    """TracIn-CP: per checkpoint the plain cosine; over the run sum_c lr_c <g_c(q), g_c(d)> (lark/tracin.py)."""

    name = "tracin_cp"
    run_level = True


def whiten(vectors, query_set, mix, damping):
    """Each set's rows mapped by (R + delta I)^-1/2 (scaled by sqrt(delta), which cosine ignores) and
    unit-normalised. R = mix * mean(q q^T) over the query rows + (1 - mix) * mean(d d^T) over every other set's
    rows (the k x k matrix is never formed: R = A^T A with A the n x k stack of weighted rows, whose Gram matrix
    gives R's non-zero eigenpairs); delta = damping * the mean non-zero eigenvalue of R. A direction of R with
    eigenvalue s is weighted sqrt(delta / (s + delta)) relative to directions no example spans."""
    def finite(x):
        return x[torch.isfinite(x).all(dim=1)].double()

    queries = finite(vectors[query_set])
    train = torch.cat([finite(v) for name, v in vectors.items() if name != query_set])
    parts = [p for p, w in ((queries, mix), (train, 1 - mix)) if len(p) and w > 0]
    weights = [w for p, w in ((queries, mix), (train, 1 - mix)) if len(p) and w > 0]
    a = torch.cat([p * (w / len(p)) ** 0.5 for p, w in zip(parts, weights)])
    s, u = torch.linalg.eigh(a @ a.T)
    keep = s > s.max().clamp_min(1e-300) * 1e-10
    s, u = s[keep], u[:, keep]
    basis = a.T @ u / s.sqrt()                               # [k, r]: R's eigenvectors of non-zero eigenvalues
    delta = damping * s.mean()
    weight = (delta / (s + delta)).sqrt() - 1
    out = {}
    for name, x in vectors.items():
        y = x.double() + ((x.double() @ basis) * weight) @ basis.T
        out[name] = unit_rows(y).float()
    return out
