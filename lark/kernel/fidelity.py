"""The fidelity oracle: how well projected cosines reproduce exact gradient cosines.

Given exact scores S [n_q, n_d] (ExactProjector) and approximate scores A of the same pairs:
Pearson and Spearman correlation over all pairs, max |A - S|, top-1 agreement (share of queries whose best
document is the same) and top-10 overlap (mean share of the exact top 10 found in the approximate top 10).

jl_pearson(exact, k) is the Pearson a dense Gaussian (Johnson-Lindenstrauss) projection to k dimensions is expected
to give on those pairs -- the reference for any oblivious random projection of that size, not an upper bound. For
a dense Gaussian projection the projected cosine of two unit vectors with cosine c is the (uncentred) sample
correlation of k bivariate normal pairs, with variance ~ (1 - c^2)^2 / k whatever the vectors, so Pearson against
exact is about sqrt(var(c) / (var(c) + mean((1 - c^2)^2) / k)) (pair errors taken as independent). A count
sketch's variance is that minus a data-dependent term, so it can do a little better on some pairs; distributional
JL lower bounds (Kane, Meka & Nelson 2011; Jayram & Woodruff 2013) say no oblivious linear sketch does better than
order 1/k. benchmarks/projection_noise.py checks it against measured Gaussian and sketch projections.
"""

import math

import torch

from lark.data.datamodule import collate
from lark.kernel.build import project_examples
from lark.kernel.projectors import ExactProjector, example_gradient, trainable
from lark.kernel.stores import cosine_scores, stored_view, unit_rows
from lark.models import eval_mode


def ranks(x):
    """Average 1-based ranks of a 1-D tensor, float64: ties share their mean rank, as Spearman's rho needs (an
    argsort of an argsort ranked tied scores, the bit tier's k + 1 values, in an arbitrary order)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    counts = counts.double()
    return (counts.cumsum(0) - (counts - 1) / 2)[inverse]


def agreement(exact, approx, top=10):
    """Fidelity numbers of approximate scores against exact ones (both [n_q, n_d])."""
    a, b = exact.flatten().double(), approx.flatten().double()
    top = min(top, exact.shape[1])
    overlap = [
        len(set(e.tolist()) & set(p.tolist())) / top
        for e, p in zip(exact.topk(top, dim=1).indices, approx.topk(top, dim=1).indices)
    ]
    return {
        "pearson": torch.corrcoef(torch.stack([a, b]))[0, 1].item(),
        "spearman": torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item(),
        "max_abs_err": (a - b).abs().max().item(),
        "top1": (exact.argmax(dim=1) == approx.argmax(dim=1)).double().mean().item(),
        f"top{top}": sum(overlap) / len(overlap),
    }


def jl_pearson(exact, k):
    """Expected Pearson (against `exact`) of a dense Gaussian projection of the same vectors to k dimensions."""
    c = exact.flatten().double()
    noise = ((1 - c**2) ** 2).mean().item() / k
    return math.sqrt(c.var().item() / (c.var().item() + noise))


def exact_scores(model, queries, docs, pad_id, normalize="none", on_gradient=None):
    """Exact cosines [n_q, n_d] from full per-example autograd gradients (ExactProjector, optionally per-tensor
    normalised), one example at a time: the queries' unit vectors are held, each document's is scored and
    dropped (n_q + 3 gradients in memory at most: 135M-parameter models fit). `on_gradient(i, grads)` sees each
    example's gradient {name: tensor} (queries first, then documents), e.g. to check per-tensor norms."""
    params = trainable(model)
    exact = ExactProjector({n: tuple(p.shape) for n, p in params}, normalize)

    def unit(i, example):
        loss, grads = example_gradient(model, collate([example], pad_id), params)
        if on_gradient is not None:
            on_gradient(i, grads)
        v = exact.project(grads)
        del grads
        return unit_rows(v[None])[0] if torch.isfinite(loss) else v.fill_(float("nan"))

    # norms and dot products summed in float64: in float32 they drift by ~1% over 10^8 coordinates
    with eval_mode(model):
        q = torch.stack([unit(i, e) for i, e in enumerate(queries)])
        columns = [cosine_scores(q, unit(len(queries) + j, d)[None])[:, 0] for j, d in enumerate(docs)]
    return torch.stack(columns, dim=1) if columns else q.new_zeros(len(queries), 0)


def fidelity(model, queries, docs, projector, pad_id, exact=None, tier="float16"):
    """agreement() of a projector (and store tier) on encoded query and document examples; the exact scores, when
    not given, are normalised as the projector normalises (rapidin's per-tensor norms)."""
    if exact is None:
        exact = exact_scores(model, queries, docs, pad_id, getattr(projector, "normalizer", "none"))
    q = stored_view(project_examples(model, queries, projector, pad_id), tier)
    d = stored_view(project_examples(model, docs, projector, pad_id), tier)
    return agreement(exact, cosine_scores(q, d, tier))
