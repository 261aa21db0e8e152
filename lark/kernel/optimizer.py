"""The optimizer correction of the adam and trackstar kernels: the run's AdamW second moments at a checkpoint
(Moments: taken from the optimizer's state, or estimated for epoch 0, saved beside the checkpoint) and AdamScale,
which turns them into per-coordinate factors 1 / (sqrt(v_hat) + eps) -- full, or factored (row_i * col_j) so that
the hook sketch can apply them to its GEMM inputs without forming a per-coordinate matrix."""

import hashlib
import json

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from lark.data.io import check_safetensors
from lark.errors import ConfigError, CorruptFile
from lark.kernel.factory import make_kernel
from lark.kernel.stores import atomic_save
from lark.models import eval_mode

MOMENTS_FILE = "adam_moments.safetensors"  # beside each checkpoint: checkpoints/epoch_NNN/adam_moments.safetensors


def adam_eps(cfg):
    """The run's AdamW eps: optimizer.eps, or torch's AdamW default (1e-8) when the run's optimizer sets none."""
    return (cfg.get("optimizer") or {}).get("eps", 1e-8)


# ------------------------------------------------------------------------------------------------ moments
class Moments:
    """Second moments v_hat of every trainable parameter at one checkpoint: {name: {"v": tensor}} (full) or
    {name: {"row": [shape[0]], "col": [numel / shape[0]]}} (factored: means of v_hat over columns and rows).
    source: "optimizer" (the run's AdamW state, bias-corrected) or "estimate" (epoch 0, one pass); path: the file
    they were loaded from (None: in memory)."""

    def __init__(self, tensors, source, path=None):
        self.tensors, self.source, self.path = tensors, source, path

    def fingerprint(self):
        h = hashlib.sha256(self.source.encode())
        for name in sorted(self.tensors):
            for part, t in sorted(self.tensors[name].items()):
                t = t.detach().float().cpu().contiguous()
                h.update(f"{name}|{part}|{tuple(t.shape)}|".encode())
                h.update(memoryview(t.view(torch.uint8).numpy()))
        return h.hexdigest()[:16]

    def save(self, path):
        flat = {
            f"{name}::{part}": t.detach().float().cpu().contiguous()
            for name, parts in self.tensors.items()
            for part, t in parts.items()
        }
        atomic_save(flat, path, {"source": json.dumps(self.source)})

    @classmethod
    def load(cls, path):
        """The moments saved at `path`; CorruptFile (saying what to do) when the file fails its checksum."""
        try:
            check_safetensors(path)
        except CorruptFile as e:
            raise CorruptFile(
                f"{e}; the moments of a checkpoint come from its training: retrain to that epoch (training is "
                "deterministic), or delete the file to attribute with a kernel that does not use them "
                "(attribution/kernel=cosine or rapidin)"
            ) from None
        with safe_open(str(path), framework="pt") as f:
            source = json.loads(f.metadata()["source"])
            tensors = {}
            for key in f.keys():
                name, part = key.rsplit("::", 1)
                tensors.setdefault(name, {})[part] = f.get_tensor(key)
        return cls(tensors, source, str(path))


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
    device, count = next(model.parameters()).device, 0
    with eval_mode(model):
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
    return Moments({n: shaped(s / max(count, 1), factored) for n, s in sums.items()}, "estimate")


def checkpoint_moments(attr, model, epoch, optimizer=None, loader=None, clip=None):
    """The moments to save beside (and attribute) checkpoint `epoch`, or None when neither the kernel needs them
    nor `attribution.save_moments` asks (a run with attribution off needs them only to save them): the optimizer's
    state after an epoch, the one-pass estimate at epoch 0."""
    kernel = make_kernel(attr)
    if not ((kernel.uses_optimizer and attr.get("enabled", True)) or attr.get("save_moments", False)):
        return None
    factored = getattr(kernel, "factored", True)
    if epoch > 0 and optimizer is not None:
        return optimizer_moments(optimizer, model, factored)
    if loader is None:
        return None
    ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    return estimate_moments(model, ordered, clip, factored)


class AdamScale:
    """The optimizer correction of one checkpoint: every coordinate of a parameter's gradient times
    1 / (sqrt(v_hat) + eps) (full moments), or, for factored moments, times row_i * col_j with
    row = ((r + eps^2) / mean(r + eps^2))^-1/2 and col = (c + eps^2)^-1/2 -- 1 / sqrt(v_hat) of the factored
    v_hat = r c^T / mean(r) (exact when v_hat has rank one; eps^2 keeps zero rows finite, at Adam's 1/eps scale)."""

    def __init__(self, moments, eps, model, factored=True):
        self.moments, self.eps = moments, float(eps)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in moments.tensors]
        if missing:
            raise ConfigError(
                f"attribution.kernel: the AdamW moments ({moments.source}) have no entry for "
                f"{missing[:3]} ({len(missing)} parameters); they were saved for another model"
            )
        rank_one = [n for n, t in moments.tensors.items() if "row" in t]
        if not factored and rank_one:  # the full v_hat was asked for: never its rank-one approximation instead
            raise ConfigError(
                f"attribution.kernel.factored=false needs the full v_hat, but the AdamW moments "
                f"({moments.path or moments.source}) are factored ({rank_one[0]} and {len(rank_one) - 1} more: "
                "attribution.save_moments saves them factored unless the run's own kernel is adam or trackstar "
                "with factored=false); train with attribution/kernel=adam attribution.kernel.factored=false to save "
                "the full moments, or keep attribution.kernel.factored=true"
            )
        self.cache = {}

    def spec(self):
        kinds = {"factored" if "row" in t else "full" for t in self.moments.tensors.values()}
        return {
            "moments": self.moments.fingerprint(),
            "source": self.moments.source,
            "eps": self.eps,
            "form": "+".join(sorted(kinds)),
        }

    def factors(self, name, device):
        """(row [shape[0]], col [rest]) scales of a factored matrix (the hook sketch's GEMM inputs)."""
        key = ("factors", name, str(device))
        if key not in self.cache:
            parts = self.moments.tensors[name]
            if "row" not in parts:
                raise ConfigError(
                    f"attribution.kernel.factored=false: the hook sketch (attribution/projector="
                    f"sketch) can only apply factored moments ({name} is full); use "
                    "attribution/projector=rapidin or exact for the unfactored reference"
                )
            e2 = self.eps**2
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
