"""The LARK kernel at one checkpoint: projected per-example loss gradients, their cosine similarity, the metrics.

Layout written under attribution/epoch_NNN/:
  stores/<set>.safetensors   unit-normalised projections [n, k] in the attribution.store_dtype tier + norms [n]
                              (float32); header metadata: ids, set, epoch, tier, projector spec (lark.stores)
  scores/<source>.safetensors cosine scores [n_queries, n_docs] float32 (attribution.save_scores)
  top_influences.csv          the top-k documents of every source for every query
  predictions.jsonl           per test question: gold and predicted answer, log-likelihood of each label, loss
  metrics.json                the paper's metrics (see lark.metrics) + accuracy, lr, storage, BM25 baseline, the
                              ids of examples with non-finite gradients, fingerprints; written last (= complete)
  shards/                     only while a set larger than attribution.shard_size is in progress
"""
import csv
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lark import faults
from lark.console import progress
from lark import metrics as M
from lark.data import LABELS, replacing, write_jsonl
from lark.fingerprints import PROJECTOR_VERSION, fingerprints
from lark.models import content_hash
from lark.formats import encode
from lark.projector import make_projector, trainable
from lark.sources import example_text
from lark.stores import (atomic_save, bytes_per_vector, check_compatible, cosine_scores, load_store, save_store,
                         stored_view, topk_scores)
from lark.training import collate

QUERY_SET = "test_queries"


def project_examples(model, encoded, projector, pad_id, batch_size=8, rank=0, world=1, gather=None, desc="projecting"):
    """[n, k] projected gradients (float32), computed in batches. Examples whose loss or gradient is not finite
    get a NaN row. With world > 1, this rank computes examples rank::world and `gather` (an all_gather) collects
    them. Batches are formed by length (less padding): an example's vector does not depend on its batch."""
    mine = list(range(rank, len(encoded), world))
    order = sorted(mine, key=lambda i: len(encoded[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = {}
    for start in progress(range(0, len(order), batch_size), desc, unit="batch"):
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


def examples_fingerprint(encoded):
    return content_hash([(e["input_ids"], e["labels"]) for e in encoded])


def project_set(model, encoded, ids, projector, meta, folder, cfg, pad_id, rank, world, gather, reuse, log):
    """[n, k] projected gradients of one set, computed shard by shard (attribution.shard_size examples): when a
    set spans several shards, each finished shard is saved under shards/ so that a killed run recomputes at most
    the shard in flight. A saved shard is reused only if its header (ids, projector, fingerprints) matches."""
    size = int(cfg.get("shard_size") or len(encoded) or 1)   # runs from before shards: one shard per set
    parts = []
    for start in range(0, len(encoded), size):
        part_ids, path = ids[start:start + size], folder / f"{meta['set']}.{start:06d}.safetensors"
        saved = read_shard(path, part_ids, meta) if reuse and len(encoded) > size else None
        if saved is None:
            saved = project_examples(model, encoded[start:start + size], projector, pad_id, cfg.batch_size, rank,
                                     world, gather, f"projecting {meta['set']}")
            if rank == 0 and len(encoded) > size:
                atomic_save({"vectors": saved.contiguous()}, path,
                            {"ids": json.dumps(part_ids), **{k: json.dumps(v) for k, v in meta.items()}})
                faults.point("shard")
        else:
            log(f"[lark] {path.name}: shard complete, reused")
        parts.append(saved)
    return torch.cat(parts) if parts else torch.zeros(0, projector.k)


def read_shard(path, ids, meta):
    """The raw vectors of a saved shard, or None when absent, unreadable or produced from other inputs."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {k: json.loads(v) for k, v in f.metadata().items()}
            return f.get_tensor("vectors") if header == {"ids": ids, **meta} else None
    except (OSError, ValueError, SafetensorError):
        return None


def reusable_store(path, ids, meta, tier, k):
    """The decoded vectors of a complete store written from the same inputs, else None (then it is recomputed)."""
    try:
        vectors, _, stored_ids, header = load_store(path)
    except (OSError, ValueError, KeyError, SafetensorError):
        return None
    return vectors if stored_ids == ids and header == {**meta, "tier": tier, "k": k} else None


def attribute_checkpoint(model, tokenizer, sets, queries, fmt, cfg, src, out_dir, max_length, info,
                         rank=0, world=1, gather=None, log=print, reuse=False, prints=None):
    """Stores, score matrices and metrics of one checkpoint.

    sets: {source: [example]}; queries: [example] (test queries); cfg: the `attribution` config; src: the `source`
    config; info: {epoch, accuracy, lr, ...} copied into metrics.json; prints: the fingerprints of the checkpoint,
    tokenizer and format (lark.fingerprints; computed when None). reuse: keep complete stores and shards written
    from the same inputs (resume). metrics.json is written last: it marks the epoch complete. Returns the metrics."""
    out_dir = Path(out_dir)
    if rank == 0:
        (out_dir / "metrics.json").unlink(missing_ok=True)
    projector = make_projector(cfg.projector, model)
    prints = prints or fingerprints(model, tokenizer, fmt)
    spec = {**projector.spec(), "version": PROJECTOR_VERSION}
    tier, decoded, nonfinite, metas = cfg.store_dtype, {}, {}, {}
    for name, examples in {QUERY_SET: queries, **sets}.items():
        encoded = [encode(tokenizer, e, fmt, max_length) for e in examples]
        ids = [e["id"] for e in examples]
        meta = metas[name] = {"epoch": info["epoch"], "set": name, "projector": spec, **prints,
                              "examples": examples_fingerprint(encoded)}
        path = out_dir / "stores" / f"{name}.safetensors"
        decoded[name] = reusable_store(path, ids, meta, tier, projector.k) if reuse else None
        if decoded[name] is not None:
            log(f"[lark] {path}: store complete, reused")
        else:
            vectors = project_set(model, encoded, ids, projector, meta, out_dir / "shards", cfg,
                                  tokenizer.pad_token_id, rank, world, gather, reuse, log)
            decoded[name] = save_store(path, vectors, ids, meta, tier) if rank == 0 else stored_view(vectors, tier)
        if rank == 0:  # the store is complete: its shards are no longer needed
            for shard in (out_dir / "shards").glob(f"{name}.[0-9]*.safetensors"):
                shard.unlink()
            faults.point("shard")
        nonfinite[name] = [i for i, v in zip(ids, decoded[name]) if not torch.isfinite(v).all()]
        if nonfinite[name]:
            log(f"[lark] {name}: {len(nonfinite[name])} examples with a non-finite loss or gradient, left out of "
                f"the metrics: {nonfinite[name][:5]}")
    if rank == 0 and (out_dir / "shards").is_dir() and not any((out_dir / "shards").iterdir()):
        (out_dir / "shards").rmdir()
    query_ids = [q["id"] for q in queries]
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
                atomic_save({"scores": scores.contiguous()}, out_dir / "scores" / f"{name}.safetensors",
                            {"queries": json.dumps(query_ids), "docs": json.dumps(doc_ids)})
    result = M.influence_metrics(maxinf, src.ft_source, src.pt_source, src.format_pairs)
    for name, spec_ in src.sources.items():
        result["sources"][name].update(n_docs=len(sets[name]), kind=spec_.kind, formatted=bool(spec_.formatted))
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
        "nonfinite": {"count": sum(map(len, nonfinite.values())), "ids": nonfinite},
        "fingerprints": prints,
    }
    result = M.clean(result)
    if rank == 0:
        write_csv(out_dir / "top_influences.csv", ["query_id", "source", "rank", "doc_id", "score"], rows)
        write_json(out_dir / "metrics.json", result)
    return result, rows


def write_predictions(path, items, predicted, logp):
    """predictions.jsonl: per test question its gold and predicted answer, the summed log-likelihood of each label
    ([n, 3] logp, lark.training.answer_log_likelihoods) and the loss = -log-likelihood of the gold answer."""
    rows = []
    for item, answer, scores in zip(items, predicted, logp.tolist()):
        scores, gold = dict(zip(LABELS, scores)), item["final_decision"]
        rows.append({"id": item["id"], "gold": gold, "predicted": answer, "correct": answer == gold,
                     "loss": M.clean(-scores[gold]) if gold in scores else None, "logp": M.clean(scores)})
    write_jsonl(rows, path)


def write_json(path, obj):
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def write_csv(path, header, rows):
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
