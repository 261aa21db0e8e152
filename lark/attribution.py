"""The LARK kernel at one checkpoint: projected per-example loss gradients, their cosine similarity, the metrics.

Layout written under attribution/epoch_NNN/:
  stores/<set>.safetensors   unit-normalised projections [n, k] in the attribution.store_dtype tier + norms [n]
                              (float32); header metadata: ids, set, epoch, tier, projector spec (lark.stores)
  scores/<source>.safetensors cosine scores [n_queries, n_docs] float32 (attribution.save_scores)
  top_influences.csv          the top-k documents of every source for every query
  metrics.json                the paper's metrics (see lark.metrics) + accuracy, lr, storage, BM25 baseline
"""
import csv
import json
import math
from pathlib import Path

import torch

from lark import metrics as M
from lark.data import replacing
from lark.formats import encode
from lark.projector import make_projector, trainable
from lark.sources import example_text
from lark.stores import atomic_save, bytes_per_vector, cosine_scores, save_store, stored_view, topk_scores
from lark.training import collate

QUERY_SET = "test_queries"


def project_examples(model, encoded, projector, pad_id, batch_size=8, rank=0, world=1, gather=None):
    """[n, k] projected gradients (float32), computed in batches. Examples whose loss or gradient is not finite
    get a NaN row. With world > 1, this rank computes examples rank::world and `gather` (an all_gather) collects
    them. Batches are formed by length (less padding): an example's vector does not depend on its batch."""
    mine = list(range(rank, len(encoded), world))
    order = sorted(mine, key=lambda i: len(encoded[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = {}
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in index], pad_id).items()}
        for i, v in zip(index, projector.project_batch(model, batch).float().cpu()):
            rows[i] = v if torch.isfinite(v).all() else torch.full_like(v, float("nan"))
    model.train(was_training)
    out = torch.stack([rows[i] for i in mine]) if mine else torch.zeros(0, projector.k)
    if world == 1:
        return out
    per_rank = -(-len(encoded) // world)
    padded = torch.cat([out, out.new_zeros(per_rank - len(out), projector.k)]).to(device)
    gathered = gather(padded).cpu()          # [world, per_rank, k]
    return torch.stack([gathered[i % world, i // world] for i in range(len(encoded))])


def top_rows(values, index, query_ids, doc_ids, source):
    """Rows (query_id, source, rank, doc_id, score) of each query's best documents."""
    return [(q, source, r + 1, doc_ids[index[i, r]], round(values[i, r].item(), 6))
            for i, q in enumerate(query_ids) for r in range(values.shape[1]) if math.isfinite(values[i, r])]


def attribute_checkpoint(model, tokenizer, sets, queries, fmt, cfg, src, out_dir, max_length, info,
                         rank=0, world=1, gather=None, log=print):
    """Stores, score matrices and metrics of one checkpoint.

    sets: {source: [example]}; queries: [example] (test queries); cfg: the `attribution` config; src: the `source`
    config; info: {epoch, accuracy, lr, ...} copied into metrics.json. Returns the metrics dict."""
    out_dir = Path(out_dir)
    projector = make_projector(cfg.projector, model)
    meta = {"epoch": info["epoch"], "projector": projector.spec(), "format": fmt.name}
    tier, decoded = cfg.store_dtype, {}
    for name, examples in {QUERY_SET: queries, **sets}.items():
        encoded = [encode(tokenizer, e, fmt, max_length) for e in examples]
        vectors = project_examples(model, encoded, projector, tokenizer.pad_token_id, cfg.batch_size, rank, world,
                                   gather)
        bad = [examples[i]["id"] for i in range(len(examples)) if not torch.isfinite(vectors[i]).all()]
        if bad:
            log(f"[lark] {name}: {len(bad)} examples with a non-finite loss or gradient, left out: {bad[:5]}")
        ids = [e["id"] for e in examples]
        path = out_dir / "stores" / f"{name}.safetensors"
        decoded[name] = (save_store(path, vectors, ids, {**meta, "set": name}, tier) if rank == 0
                         else stored_view(vectors, tier))
    query_ids = [q["id"] for q in queries]
    maxinf, rows = {}, []
    for name, examples in sets.items():
        doc_ids = [e["id"] for e in examples]
        values, index = topk_scores(decoded[QUERY_SET], decoded[name], cfg.top_k, tier, cfg.score_block)
        maxinf[name] = values[:, 0] if values.shape[1] else torch.full((len(queries),), float("nan"))
        maxinf[name] = torch.where(torch.isfinite(maxinf[name]), maxinf[name], float("nan"))
        if rank == 0:
            rows += top_rows(values, index, query_ids, doc_ids, name)
            if cfg.save_scores:
                scores = cosine_scores(decoded[QUERY_SET], decoded[name], tier, cfg.score_block)
                atomic_save({"scores": scores.contiguous()}, out_dir / "scores" / f"{name}.safetensors",
                            {"queries": json.dumps(query_ids), "docs": json.dumps(doc_ids)})
    result = M.influence_metrics(maxinf, src.ft_source, src.pt_source, src.format_pairs)
    for name, spec in src.sources.items():
        result["sources"][name].update(n_docs=len(sets[name]), kind=spec.kind, formatted=bool(spec.formatted))
    bm25 = M.bm25_max_scores([q["question"] for q in queries],
                             {name: [example_text(e) for e in examples] for name, examples in sets.items()})
    bm25_metrics = M.influence_metrics(bm25, src.ft_source, src.pt_source, {})
    p = trainable(model)[0][1]
    result = {
        **info,
        "n_queries": len(queries),
        **result,
        "bm25": {"ft_wins": bm25_metrics["ft_wins"], "pt_wins": bm25_metrics["pt_wins"],
                 "sources": {n: {"mean_max": s["mean_max"]} for n, s in bm25_metrics["sources"].items()}},
        "storage": M.storage(sum(p.numel() for _, p in trainable(model)), p.element_size(), projector.k,
                             bytes_per_vector(tier, projector.k) / projector.k, src.size),
        "projector": projector.spec(),
    }
    result = M.clean(result)
    if rank == 0:
        write_csv(out_dir / "top_influences.csv", ["query_id", "source", "rank", "doc_id", "score"], rows)
        write_json(out_dir / "metrics.json", result)
    return result, rows


def write_json(path, obj):
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def write_csv(path, header, rows):
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
