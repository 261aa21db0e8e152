"""TODO-DOC"""

import torch


def normalize_tensors(grads, how):
    """RapidIn's per-tensor L2 normalisation (how = per_tensor), or nothing (how = none)."""
    if how == "none":
        return grads
    if how != "per_tensor":
        raise ValueError(f"attribution.projector.normalize: unknown '{how}' (none or per_tensor)")
    norms = {n: torch.linalg.vector_norm(g, dtype=torch.float64).clamp_min(1e-30) for n, g in grads.items()}
    return {n: g / norms[n].to(g.dtype) for n, g in grads.items()}  # float64 sums: 10^7-element tensors
