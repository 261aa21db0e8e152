"""TracIn-CP over a run (attribution/kernel=tracin_cp): score(q, d) = sum over checkpoints c of
lr_c * <g_c(q), g_c(d)>, from the per-checkpoint stores (unit vectors and norms: <a, b> = cos(a, b) |a| |b|).
lr_c is the learning rate of the epoch that produced checkpoint c (metrics.json `lr`); epoch 0, the base model, has
none and takes no part (TracIn-CP sums over checkpoints taken after training steps).

Only epochs whose stores the tracin_cp kernel wrote, with one projector, are summed (same_gradients; the others are
named in the log). Each query's top-k is found one block of documents at a time; the whole matrix is formed only
when attribution.save_scores asks for it.

Layout written under attribution/tracin_cp/:
  scores/<source>.safetensors  TracIn-CP scores [n_queries, n_docs] float32 (attribution.save_scores)
  top_influences.csv           each query's top-k documents per source
  metrics.json                 the paper's metrics on these scores (lark.analysis.metrics), the checkpoints and their lr
"""

import json
from pathlib import Path

import torch

from lark.analysis import metrics as M
from lark.checkpoint import QUERY_SET, TOP_COLUMNS, top_rows
from lark.data.io import write_csv, write_json
from lark.errors import RunDirError
from lark.kernel.stores import MATCH, atomic_save, check_compatible, cosine_scores, load_store, top_by_blocks
from lark.rundir import epoch_lr

FOLDER = "tracin_cp"


def tracin_scores(checkpoints, tier, start=0, stop=None):
    """sum_c lr_c * cos_c * |q_c| |d_c| for checkpoints [(lr, (q unit, q norms), (d unit, d norms))], over the
    documents start:stop [n_q, stop - start]."""
    total = None
    for lr, (q, q_norm), (d, d_norm) in checkpoints:
        d, d_norm = d[start:stop], d_norm[start:stop]
        part = lr * cosine_scores(q, d, tier) * q_norm.unsqueeze(1) * d_norm.unsqueeze(0)
        total = part if total is None else total + part
    return total


def tracin_top(checkpoints, tier, k, block=4096):
    """(values, indices) [n_q, k] of each query's k best TracIn-CP documents, one block of documents at a time
    (never the whole score matrix; ties by the smaller index, as stores.topk_scores)."""
    n_q, n_d = len(checkpoints[0][1][0]), len(checkpoints[0][2][0])
    return top_by_blocks(lambda s, e: tracin_scores(checkpoints, tier, s, e), n_q, n_d, k, block)


def same_gradients(epochs, heads, log):
    """The epochs [(epoch, lr, stores)] whose query stores (headers `heads` by epoch) hold the tracin_cp kernel's
    vectors of one projector (every MATCH field but the checkpoint equal to the newest such epoch's): TracIn-CP
    sums one gradient over checkpoints, never a normalised or whitened vector of another kernel. The others are
    named in the log."""

    def kernel(e):
        return ((heads[e].get("projector") or {}).get("kernel") or {}).get("name")

    ours = [e for e, _, _ in epochs if kernel(e) == "tracin_cp"]
    if not ours:
        return []
    ref = heads[ours[-1]]
    fields = [key for key in MATCH if key != "checkpoint"]
    kept = [x for x in epochs if x[0] in ours and all(heads[x[0]].get(f) == ref.get(f) for f in fields)]
    left = [e for e, _, _ in epochs if e not in {x[0] for x in kept}]
    if left:
        log(
            f"[lark] tracin_cp: epochs {left} left out of the sum: their stores are another kernel's "
            f"({', '.join(sorted({str(kernel(e)) for e in left}))}) or another projector's than epoch {ours[-1]}'s; "
            f"to include them: attribute.py run_dir=<run> attribution/kernel=tracin_cp "
            f"'+attribution.checkpoints={left}'"
        )
    return kept


def write_tracin_cp(run_dir, cfg, log=print):
    """attribution/tracin_cp/ of a run whose epochs are attributed (stores written). Returns its metrics."""
    run_dir, src, attr = Path(run_dir), cfg.source, cfg.attribution
    epochs = []
    for folder in sorted((run_dir / "attribution").glob("epoch_[0-9][0-9][0-9]")):
        metrics_file = folder / "metrics.json"
        lr = epoch_lr(run_dir / "checkpoints" / folder.name, metrics_file) if metrics_file.is_file() else None
        if lr is not None:
            epochs.append((int(folder.name.split("_")[1]), float(lr), folder / "stores"))
    queries = {e: load_store(stores / f"{QUERY_SET}.safetensors") for e, _, stores in epochs}
    epochs = same_gradients(epochs, {e: q[3] for e, q in queries.items()}, log) if epochs else []
    if not epochs:  # e.g. trainer.max_epochs=0: nothing to sum, and nothing computed is lost
        log(
            f"[lark] tracin_cp: {run_dir / 'attribution'} has no checkpoint after a training step (with an lr) "
            "attributed with attribution/kernel=tracin_cp; TracIn-CP needs trainer.max_epochs >= 1, not written"
        )
        return None
    query_ids, tier = queries[epochs[0][0]][2], queries[epochs[0][0]][3]["tier"]  # the stores' own tier
    maxinf, rows, out = {}, [], run_dir / "attribution" / FOLDER
    for name in src.sources:
        parts, doc_ids = [], None
        for epoch, lr, stores in epochs:
            q, q_norm, q_ids, q_meta = queries[epoch]
            d, d_norm, d_ids, d_meta = load_store(stores / f"{name}.safetensors")
            check_compatible(q_meta, d_meta, QUERY_SET, name)
            if q_ids != query_ids or (doc_ids is not None and d_ids != doc_ids):
                raise RunDirError(
                    f"{stores}: the examples of {name} or {QUERY_SET} differ from epoch "
                    f"{epochs[0][0]}'s; TracIn-CP sums the same examples over checkpoints"
                )
            doc_ids = d_ids
            parts.append((lr, (q, q_norm), (d, d_norm)))
        values, index = tracin_top(parts, tier, attr.top_k, attr.get("score_block", 4096))
        maxinf[name] = values[:, 0] if values.shape[1] else torch.full((len(query_ids),), float("nan"))
        rows += top_rows(values, index, query_ids, doc_ids, name)
        if attr.save_scores:  # the whole matrix only when asked for (attribution.save_scores)
            atomic_save(
                {"scores": tracin_scores(parts, tier).contiguous()},
                out / "scores" / f"{name}.safetensors",
                {"queries": json.dumps(query_ids), "docs": json.dumps(doc_ids)},
            )
    result = M.influence_metrics(maxinf, src.ft_source, src.pt_source, src.format_pairs)
    result = M.clean(
        {
            "kernel": "tracin_cp",
            "epoch": "all",
            "epochs": [e for e, _, _ in epochs],
            "lr": [lr for _, lr, _ in epochs],
            "n_queries": len(query_ids),
            **result,
        }
    )
    write_csv(out / "top_influences.csv", [dict(zip(TOP_COLUMNS, r)) for r in rows], TOP_COLUMNS)
    write_json(out / "metrics.json", result)
    log(
        f"[lark] tracin_cp over epochs {result['epochs']}: "
        + ", ".join(f"{k} {result[k]:.4g}" for k in ("ft", "pt", "ft_pt_ratio", "pt_wins") if result.get(k) is not None)
    )
    return result
