"""The paper's metrics, computed from score matrices [n_queries, n_docs] per source.

maxinf(q, S) = max over documents d in S of score(q, d)
MeanMax(S)   = mean over q of maxinf(q, S)
FT/PT ratio  = MeanMax(ft source) / MeanMax(pt source)
FT wins vs S = share of q with maxinf(q, ft) > maxinf(q, S);  PT wins = share with maxinf(q, pt) > maxinf(q, ft)
               (the paper's "pretrain data shows higher influence": strict, so a tie is neither's win)
Format effect(content) = MeanMax(content formatted) / MeanMax(content raw)
Queries with a non-finite maxinf in a compared source are left out of that number (and counted).
bm25_baseline: the same wins and MeanMax with BM25 scores (question -> document text), Table IV's baseline.
"""

import math

import torch

from lark.data.bm25 import source_scores as bm25_source_scores


def max_influence(scores):
    """[n_queries] maximum score over a source's documents (NaN rows stay NaN; an empty source gives NaN)."""
    if scores.shape[1] == 0:
        return torch.full((scores.shape[0],), float("nan"))
    return scores.max(dim=1).values


def mean_max(maxinf):
    """Mean of the finite entries; None when there are none."""
    finite = maxinf[torch.isfinite(maxinf)]
    return finite.mean().item() if finite.numel() else None


def wins(a, b):
    """Share of queries with a > b among those where both are finite (strict: ties are not wins)."""
    ok = torch.isfinite(a) & torch.isfinite(b)
    return int((a[ok] > b[ok]).sum()) / int(ok.sum()) if ok.any() else None  # 22/100 = 0.22, not float32's 0.2199...


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def influence_metrics(maxinf, ft_source, pt_source, format_pairs):
    """The paper's metrics from {source: [n_queries] maxinf}."""
    ft = maxinf[ft_source]
    sources = {
        name: {
            "mean_max": mean_max(m),
            "ft_wins": None if name == ft_source else wins(ft, m),
            "n_nonfinite": int((~torch.isfinite(m)).sum()),
        }
        for name, m in maxinf.items()
    }
    ft_wins = sources[pt_source]["ft_wins"]
    pt_wins = wins(maxinf[pt_source], ft)
    return {
        "sources": sources,
        "ft_source": ft_source,
        "pt_source": pt_source,
        "ft": sources[ft_source]["mean_max"],
        "pt": sources[pt_source]["mean_max"],
        "ft_pt_ratio": ratio(sources[ft_source]["mean_max"], sources[pt_source]["mean_max"]),
        "ft_wins": ft_wins,
        "pt_wins": pt_wins,
        "format_effect": {
            content: ratio(sources[f]["mean_max"], sources[r]["mean_max"])
            for content, (f, r) in format_pairs.items()
            if f in maxinf and r in maxinf
        },
    }


def storage(n_params, grad_dtype_bytes, k, store_dtype_bytes, n_examples):
    """Bytes for a full per-example gradient versus a projected vector (Table III)."""
    return {
        "n_params": n_params,
        "grad_dtype_bytes": grad_dtype_bytes,
        "k": k,
        "store_dtype_bytes": store_dtype_bytes,
        "n_examples": n_examples,
        "full_bytes_per_example": n_params * grad_dtype_bytes,
        "store_bytes_per_example": int(round(k * store_dtype_bytes)),
    }


def clean(value):
    """JSON-safe: NaN/inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def bm25_baseline(questions, texts, ft_source, pt_source):
    """Table IV's lexical baseline: the FT/PT wins and mean max of BM25 scores (question -> document text).
    texts: {source: [document text]}."""
    scores = bm25_source_scores(questions, texts)
    metrics = influence_metrics(
        {name: max_influence(s).float() for name, s in scores.items()}, ft_source, pt_source, {}
    )
    return {
        "ft_wins": metrics["ft_wins"],
        "pt_wins": metrics["pt_wins"],
        "sources": {n: {"mean_max": s["mean_max"]} for n, s in metrics["sources"].items()},
    }
