"""TracIn-CP over a run (attribution/kernel=tracin_cp): score(q, d) = sum over checkpoints c of
lr_c * <g_c(q), g_c(d)>, from the per-checkpoint stores (unit vectors and norms: <a, b> = cos(a, b) |a| |b|).
lr_c is the learning rate of the epoch that produced checkpoint c (metrics.json `lr`); epoch 0, the base model, has
none and takes no part (TracIn-CP sums over checkpoints taken after training steps).

Layout written under attribution/tracin_cp/:
  scores/<source>.safetensors  TracIn-CP scores [n_queries, n_docs] float32
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
from lark.kernel.stores import atomic_save, best_by_value, check_compatible, cosine_scores, load_store

FOLDER = "tracin_cp"


def tracin_scores(checkpoints, tier):
    """sum_c lr_c * cos_c * |q_c| |d_c| for checkpoints [(lr, (q unit, q norms), (d unit, d norms))]."""
    total = None
    for lr, (q, q_norm), (d, d_norm) in checkpoints:
        part = lr * cosine_scores(q, d, tier) * q_norm.unsqueeze(1) * d_norm.unsqueeze(0)
        total = part if total is None else total + part
    return total


def write_tracin_cp(run_dir, cfg, log=print):
    """attribution/tracin_cp/ of a run whose epochs are attributed (stores written). Returns its metrics."""
    run_dir, src, attr = Path(run_dir), cfg.source, cfg.attribution
    epochs = []
    for folder in sorted((run_dir / "attribution").glob("epoch_[0-9][0-9][0-9]")):
        metrics_file = folder / "metrics.json"
        lr = json.loads(metrics_file.read_text()).get("lr") if metrics_file.is_file() else None
        if lr is not None:
            epochs.append((int(folder.name.split("_")[1]), float(lr), folder / "stores"))
    if not epochs:  # e.g. trainer.max_epochs=0: nothing to sum, and nothing computed is lost
        log(
            f"[lark] tracin_cp: {run_dir / 'attribution'} has no attributed checkpoint after a training step (with "
            "an lr); TracIn-CP needs trainer.max_epochs >= 1, not written"
        )
        return None
    queries = {e: load_store(stores / f"{QUERY_SET}.safetensors") for e, _, stores in epochs}
    query_ids = queries[epochs[0][0]][2]
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
        scores = tracin_scores(parts, attr.store_dtype)
        columns = torch.arange(scores.shape[1]).expand(scores.shape[0], -1)
        values, index = best_by_value(scores.nan_to_num(float("-inf")), columns, attr.top_k)  # ties: smaller index
        maxinf[name] = values[:, 0] if values.shape[1] else torch.full((len(query_ids),), float("nan"))
        rows += top_rows(values, index, query_ids, doc_ids, name)
        if attr.save_scores:
            atomic_save(
                {"scores": scores.contiguous()},
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
