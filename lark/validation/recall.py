"""Ranking metrics of attribution as retrieval: does a query's ranking put the documents that really carry its
answer first? Every function takes a score matrix [n_queries, n_docs] (higher = more influential) and, per
query, the set of relevant document columns. Queries without a relevant document are left out (NaN).

recall@k(q)    = |relevant(q) in the top k| / |relevant(q)|          (Bergson's `recall`; 1 at k >= n_docs)
MRR(q)         = 1 / rank of the best-ranked relevant document         (rank 1 = first)
precision@n(q) = |relevant(q) in the top n| / n                        (n = |relevant(q)|: R-precision)
AP(q)          = mean over relevant documents d of precision@rank(d)   (area under the precision-recall curve)
Ties are broken by column order (stable sort), so a constant score ranks documents in their given order. A NaN
score (an example whose loss or gradient was not finite, lark.kernel.build) ranks its document last; a query with no
finite score is left out (NaN), as README promises for non-finite rows.
"""

import torch


def ranking(scores):
    """[n_queries, n_docs] document columns, best first (stable: ties keep column order; NaN last)."""
    return torch.argsort(-scores.float().nan_to_num(nan=-torch.inf), dim=1, stable=True)


def relevant_ranks(scores, relevant):
    """Per query, the sorted 1-based ranks of its relevant columns (an empty tensor when it has none)."""
    order = ranking(scores)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(1, scores.shape[1] + 1).expand_as(order).contiguous())
    return [
        torch.sort(rank_of[i, sorted(r)]).values if r else torch.zeros(0, dtype=torch.long)
        for i, r in enumerate(relevant)
    ]


def _per_query(scores, relevant, metric):
    scored = torch.isfinite(scores).any(1).tolist()  # a NaN query row ranked documents in column order
    return torch.tensor(
        [metric(r) if len(r) and ok else float("nan") for r, ok in zip(relevant_ranks(scores, relevant), scored)],
        dtype=torch.float64,
    )


def recall_at(scores, relevant, k):
    """[n_queries] share of each query's relevant documents ranked in its top k."""
    return _per_query(scores, relevant, lambda r: (r <= k).sum().item() / len(r))


def reciprocal_rank(scores, relevant):
    """[n_queries] 1 / rank of each query's best-ranked relevant document."""
    return _per_query(scores, relevant, lambda r: 1.0 / r[0].item())


def precision_at(scores, relevant, n=None):
    """[n_queries] share of the top n that is relevant (n = the query's number of relevant documents if None)."""
    return _per_query(scores, relevant, lambda r: (r <= (n or len(r))).sum().item() / (n or len(r)))


def average_precision(scores, relevant):
    """[n_queries] average precision (AUPRC) of each query's ranking."""
    return _per_query(
        scores, relevant, lambda r: (torch.arange(1, len(r) + 1, dtype=torch.float64) / r.double()).mean().item()
    )


def mean(values):
    """Mean of the finite entries (None when there are none) and how many there were."""
    finite = values[torch.isfinite(values)]
    return (finite.mean().item() if finite.numel() else None), int(finite.numel())


def columns(doc_ids, wanted):
    """Per query, the column indices of its wanted ids among doc_ids (ids not present are an error)."""
    index = {d: i for i, d in enumerate(doc_ids)}
    missing = sorted({d for w in wanted for d in w if d not in index})
    if missing:
        raise KeyError(f"{len(missing)} relevant documents are not among the candidates, e.g. {missing[:3]}")
    return [[index[d] for d in w] for w in wanted]
