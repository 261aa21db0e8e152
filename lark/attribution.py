"""The LARK kernel at one checkpoint: projected per-example loss gradients, their cosine similarity, the metrics.

Layout written under attribution/epoch_NNN/:
  stores/<set>.safetensors   unit-normalised projections [n, k] in the attribution.store_dtype tier + norms [n]
                              (float32); header metadata: ids, set, epoch, tier, projector spec (lark.kernel.stores)
  scores/<source>.safetensors cosine scores [n_queries, n_docs] float32 (attribution.save_scores)
  top_influences.csv          the top-k documents of every source for every query
  predictions.jsonl           per test question: gold and predicted answer, loss of the gold answer
  metrics.json                (schema: lark/analysis/schema.py) the paper's metrics (see lark.analysis.metrics) + the
                              evaluation, lr, storage, BM25 baseline, the
                              ids of examples with non-finite gradients, fingerprints; written last (= complete)
  shards/                     only while a set larger than attribution.shard_size is in progress
"""

import json
import math
from pathlib import Path

import torch

from lark import faults
from lark.analysis import metrics as M
from lark.analysis.schema import check as check_metrics
from lark.data.bm25 import source_scores as bm25_source_scores
from lark.data.formats import Encoder
from lark.data.io import write_csv, write_json, write_jsonl
from lark.data.sources import example_text
from lark.evaluation import normalize
from lark.fingerprints import PROJECTOR_VERSION, fingerprints
from lark.kernel.build import examples_fingerprint, project_set, reusable_store
from lark.kernel.factory import make_kernel, make_projector
from lark.kernel.projectors import trainable
from lark.kernel.stores import (
    atomic_save,
    bytes_per_vector,
    check_compatible,
    cosine_scores,
    save_store,
    stored_view,
    topk_scores,
)

QUERY_SET = "test_queries"
TOP_COLUMNS = ("query_id", "source", "rank", "doc_id", "score")  # top_influences.csv


def top_rows(values, index, query_ids, doc_ids, source):
    """Rows (query_id, source, rank, doc_id, score) of each query's best documents."""
    return [
        (q, source, r + 1, doc_ids[index[i, r]], round(values[i, r].item(), 6))
        for i, q in enumerate(query_ids)
        for r in range(values.shape[1])
        if math.isfinite(values[i, r])
    ]


def attribute_checkpoint(
    model,
    tokenizer,
    sets,
    queries,
    fmt,
    cfg,
    src,
    out_dir,
    max_length,
    info,
    rank=0,
    world=1,
    gather=None,
    log=print,
    reuse=False,
    prints=None,
    moments=None,
    encoder=None,
):
    """Stores, score matrices and metrics of one checkpoint.

    sets: {source: [example]}; queries: [example] (test queries); cfg: the `attribution` config; src: the `source`
    config; info: {epoch, accuracy, lr, ...} copied into metrics.json; prints: the fingerprints of the checkpoint,
    tokenizer and format (lark.fingerprints; computed when None). reuse: keep complete stores and shards written
    from the same inputs (resume). moments: the checkpoint's AdamW moments for the kernels that use them
    (lark.kernel.kernels). encoder: a memoised lark.data.formats.Encoder (the run's; made here when None).
    metrics.json is written last: it marks the epoch complete. Returns the metrics."""
    out_dir = Path(out_dir)
    if rank == 0:
        (out_dir / "metrics.json").unlink(missing_ok=True)
    kernel = make_kernel(cfg)
    projector = make_projector(cfg, model, kernel, moments)
    encoder = encoder or Encoder(tokenizer, fmt, max_length)
    prints = prints or fingerprints(model, tokenizer, fmt)
    spec = {**projector.spec(), "kernel": kernel.spec(), "version": PROJECTOR_VERSION}  # two kernels never mix
    tier, decoded, nonfinite, metas = cfg.store_dtype, {}, {}, {}
    for name, examples in {QUERY_SET: queries, **sets}.items():
        encoded = [encoder(e) for e in examples]
        ids = [e["id"] for e in examples]
        meta = metas[name] = {
            "epoch": info["epoch"],
            "set": name,
            "projector": spec,
            **prints,
            "examples": examples_fingerprint(encoded),
        }
        path = out_dir / "stores" / f"{name}.safetensors"
        decoded[name] = reusable_store(path, ids, meta, tier, projector.k) if reuse else None
        if decoded[name] is not None:
            log(f"[lark] {path}: store complete, reused")
        else:
            vectors = project_set(
                model,
                encoded,
                ids,
                projector,
                meta,
                out_dir / "shards",
                cfg,
                tokenizer.pad_token_id,
                rank,
                world,
                gather,
                reuse,
                log,
            )
            decoded[name] = save_store(path, vectors, ids, meta, tier) if rank == 0 else stored_view(vectors, tier)
        if rank == 0:  # the store is complete: its shards are no longer needed
            for shard in (out_dir / "shards").glob(f"{name}.[0-9]*.safetensors"):
                shard.unlink()
            faults.point("shard")
        nonfinite[name] = [i for i, v in zip(ids, decoded[name]) if not torch.isfinite(v).all()]
        if nonfinite[name]:
            log(
                f"[lark] {name}: {len(nonfinite[name])} examples with a non-finite loss or gradient, left out of "
                f"the metrics: {nonfinite[name][:5]}"
            )
    if rank == 0 and (out_dir / "shards").is_dir() and not any((out_dir / "shards").iterdir()):
        (out_dir / "shards").rmdir()
    query_ids = [q["id"] for q in queries]
    decoded = kernel.transform(decoded, QUERY_SET)  # the vectors whose dot products are the kernel's scores
    maxinf, rows = {}, []
    for name, examples in sets.items():
        check_compatible(metas[QUERY_SET], metas[name], QUERY_SET, name)
        doc_ids = [e["id"] for e in examples]
        values, index = topk_scores(decoded[QUERY_SET], decoded[name], cfg.top_k, tier, cfg.score_block)
        maxinf[name] = values[:, 0] if values.shape[1] else torch.full((len(queries),), float("nan"))
        maxinf[name] = torch.where(torch.isfinite(maxinf[name]), maxinf[name], float("nan"))
        if rank == 0:
            rows += top_rows(values, index, query_ids, doc_ids, name)
            if cfg.save_scores:
                scores = cosine_scores(decoded[QUERY_SET], decoded[name], tier, cfg.score_block)
                atomic_save(
                    {"scores": scores.contiguous()},
                    out_dir / "scores" / f"{name}.safetensors",
                    {"queries": json.dumps(query_ids), "docs": json.dumps(doc_ids)},
                )
    result = M.influence_metrics(maxinf, src.ft_source, src.pt_source, src.format_pairs)
    for name, spec_ in src.sources.items():
        result["sources"][name].update(
            n_docs=len(sets[name]), kind=spec_.kind, corpus=spec_.get("corpus"), formatted=bool(spec_.formatted)
        )
    bm25 = {
        name: M.max_influence(s).float()
        for name, s in bm25_source_scores(
            [q["question"] for q in queries],
            {name: [example_text(e) for e in examples] for name, examples in sets.items()},
        ).items()
    }
    bm25_metrics = M.influence_metrics(bm25, src.ft_source, src.pt_source, {})
    p = trainable(model)[0][1]
    result = {
        **info,
        "n_queries": len(queries),
        **result,
        "bm25": {
            "ft_wins": bm25_metrics["ft_wins"],
            "pt_wins": bm25_metrics["pt_wins"],
            "sources": {n: {"mean_max": s["mean_max"]} for n, s in bm25_metrics["sources"].items()},
        },
        "storage": M.storage(
            sum(p.numel() for _, p in trainable(model)),
            p.element_size(),
            projector.k,
            bytes_per_vector(tier, projector.k) / projector.k,
            src.size,
        ),
        "projector": projector.spec(),
        "kernel": kernel.spec(),
        "loss_target": {"answer_template": fmt.get("answer_template"), "query_target": cfg.get("query_target")},
        "nonfinite": {"count": sum(map(len, nonfinite.values())), "ids": nonfinite},
        "fingerprints": prints,
    }
    result = check_metrics(M.clean(result), out_dir / "metrics.json")
    if rank == 0:
        write_csv(out_dir / "top_influences.csv", [dict(zip(TOP_COLUMNS, r)) for r in rows], TOP_COLUMNS)
        write_json(out_dir / "metrics.json", result)
    return result, rows


def write_predictions(path, items, predicted, losses):
    """predictions.jsonl: per test question its gold and predicted answer (None where the evaluator predicts
    nothing, eval=loss) and the loss = mean cross-entropy of the gold answer tokens (lark.evaluation)."""
    predicted = predicted or [None] * len(items)
    rows = [
        {
            "id": item["id"],
            "gold": item["answer"],
            "predicted": answer,
            "correct": None if answer is None else normalize(answer) == normalize(item["answer"]),
            "loss": M.clean(loss),
        }
        for item, answer, loss in zip(items, predicted, losses.tolist())
    ]
    write_jsonl(rows, path)
