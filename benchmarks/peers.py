"""Peer projectors for the benchmark, behind the same project_batch(model, batch) interface as LARK's.

Each materialises the per-example gradients (one backward per example, as those libraries do on a CPU) and then
applies the peer's own projection. Installed by `pip install -e ".[peers]"` (never in the default install; the
extra leaves the installed torch alone). Missing packages give None, and the benchmark prints why.
"""
import torch

from lark.projector import ExactProjector, trainable


class PeerProjector:
    """Materialised per-example gradients [B, P] -> a peer library's projection [B, k]."""

    def __init__(self, model, k, project):
        self.k, self.project = k, project
        self.flat = ExactProjector({n: tuple(p.shape) for n, p in trainable(model)})

    def project_batch(self, model, batch):
        return self.project(self.flat.project_batch(model, batch))


def trak_basic(model, k, seed=0):
    """TRAK's BasicProjector (traker): a dense Rademacher matrix generated block by block at every call."""
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError:
        return None
    grad_dim = sum(p.numel() for _, p in trainable(model))
    proj = BasicProjector(grad_dim=grad_dim, proj_dim=k, seed=seed, proj_type=ProjectionType.rademacher,
                          device="cpu", dtype=torch.float32)
    return PeerProjector(model, k, lambda grads: proj.project(grads, model_id=0))


def dattri_random(model, k, seed=0, batch=8):
    """dattri's random_project on a CPU (its dense `normal` projection; SJLT and GraSS need CUDA)."""
    try:
        from dattri.func.projection import random_project
    except ImportError:
        return None
    grad_dim = sum(p.numel() for _, p in trainable(model))
    fn = random_project(torch.zeros(batch, grad_dim), batch, k, batch, proj_seed=seed, proj_type="normal",
                        device="cpu")
    return PeerProjector(model, k, fn)


PEERS = {"TRAK BasicProjector": trak_basic, "dattri random_project": dattri_random}
