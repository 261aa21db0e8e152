"""TODO-DOC"""

import json

import torch
from safetensors import SafetensorError, safe_open

from lark import faults
from lark.console import progress
from lark.data.datamodule import collate
from lark.fingerprints import content_hash
from lark.kernel.stores import (
    atomic_save,
    load_store,
)


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
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in index], pad_id).items()}
        for i, v in zip(index, projector.project_batch(model, batch).float().cpu()):
            rows[i] = v if torch.isfinite(v).all() else torch.full_like(v, float("nan"))
    model.train(was_training)
    out = torch.stack([rows[i] for i in mine]) if mine else torch.zeros(0, projector.k)
    if world == 1:
        return out
    per_rank = -(-len(encoded) // world)
    padded = torch.cat([out, out.new_zeros(per_rank - len(out), projector.k)]).to(device)
    gathered = gather(padded).cpu()  # [world, per_rank, k]
    return torch.stack([gathered[i % world, i // world] for i in range(len(encoded))])


def examples_fingerprint(encoded):
    return content_hash([(e["input_ids"], e["labels"]) for e in encoded])


def project_set(model, encoded, ids, projector, meta, folder, cfg, pad_id, rank, world, gather, reuse, log):
    """[n, k] projected gradients of one set, computed shard by shard (attribution.shard_size examples): when a
    set spans several shards, each finished shard is saved under shards/ so that a killed run recomputes at most
    the shard in flight. A saved shard is reused only if its header (ids, projector, fingerprints) matches."""
    size = int(cfg.get("shard_size") or len(encoded) or 1)  # runs from before shards: one shard per set
    parts = []
    for start in range(0, len(encoded), size):
        part_ids, path = ids[start : start + size], folder / f"{meta['set']}.{start:06d}.safetensors"
        saved = read_shard(path, part_ids, meta) if reuse and len(encoded) > size else None
        if saved is None:
            saved = project_examples(
                model,
                encoded[start : start + size],
                projector,
                pad_id,
                cfg.batch_size,
                rank,
                world,
                gather,
                f"projecting {meta['set']}",
            )
            if rank == 0 and len(encoded) > size:
                atomic_save(
                    {"vectors": saved.contiguous()},
                    path,
                    {"ids": json.dumps(part_ids), **{k: json.dumps(v) for k, v in meta.items()}},
                )
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
