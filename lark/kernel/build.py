"""Projecting a set of examples into a store: batches by length, examples split across ranks, resumable shards,
reuse of a complete store. lark.checkpoint builds every set of a checkpoint with one StoreBuilder; the store format
and scoring are lark.kernel.stores'.

Layout under a builder's folder (one checkpoint's attribution/epoch_NNN/):
  stores/<set>.safetensors              the complete store (lark.kernel.stores.save_store)
  shards/<set>.<start:06d>.safetensors  raw projections [shard_size, k] float32 with the store's header, only while
                                        a set larger than shard_size is in progress
Both carry a checksum in their header (lark.data.io): a reused store or shard that fails it (corrupted or truncated
after it was written) is recomputed, with one line saying so.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lark import faults
from lark.console import progress
from lark.data.datamodule import collate
from lark.data.io import CHECKSUM, check_safetensors
from lark.errors import CorruptFile
from lark.fingerprints import content_hash
from lark.kernel.stores import atomic_save, load_store, save_store, stored_view
from lark.models import eval_mode


def project_examples(
    model, encoded, projector, pad_id, batch_size=8, rank=0, world=1, gather=None, desc="projecting", keep=None
):
    """[n, k] projected gradients (float32), computed in batches. Examples whose loss or gradient is not finite
    get a NaN row. With world > 1, this rank computes examples rank::world and `gather` (an all_gather) collects
    them. Batches are formed by length (less padding): an example's vector does not depend on its batch. keep:
    called after each batch with its examples' indices, raw vectors and attention mask (lark.kernel.tokens_kept)."""
    mine = list(range(rank, len(encoded), world))
    order = sorted(mine, key=lambda i: len(encoded[i]["input_ids"]))
    device = next(model.parameters()).device
    rows = {}
    with eval_mode(model):
        for start in progress(range(0, len(order), batch_size), desc, unit="batch"):
            index = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([encoded[i] for i in index], pad_id).items()}
            vectors = projector.project_batch(model, batch).float().cpu()
            if keep is not None:
                keep(index, vectors, batch["attention_mask"])
            for i, v in zip(index, vectors):
                rows[i] = v if torch.isfinite(v).all() else torch.full_like(v, float("nan"))
    out = torch.stack([rows[i] for i in mine]) if mine else torch.zeros(0, projector.k)
    if world == 1:
        return out
    per_rank = -(-len(encoded) // world)
    padded = torch.cat([out, out.new_zeros(per_rank - len(out), projector.k)]).to(device)
    gathered = gather(padded).cpu()  # [world, per_rank, k]
    return torch.stack([gathered[i % world, i // world] for i in range(len(encoded))])


def examples_fingerprint(encoded):
    """The content hash of a set's tokenised examples (input ids and labels): a store's `examples` header field."""
    return content_hash([(e["input_ids"], e["labels"]) for e in encoded])


@dataclass
class StoreBuilder:
    """Projects sets of examples with one projector into the stores of one folder.

    tier: attribution.store_dtype; batch_size, shard_size: attribution's (no shard_size: one shard per set);
    rank, world, gather: this process among `world` (gather: an all_gather, world > 1); reuse: keep complete stores
    and shards written from the same inputs (resume); log: where progress lines go; keep: project_examples' for the
    set being built (set by lark.checkpoint.build_stores), told the example indices within the set."""

    model: torch.nn.Module
    projector: object
    folder: Path
    pad_id: int
    tier: str = "float16"
    batch_size: int = 8
    shard_size: int | None = None
    rank: int = 0
    world: int = 1
    gather: Callable | None = None
    reuse: bool = False
    log: Callable = print
    keep: Callable | None = None  # (index, vectors, mask) after each batch of the set in progress (tokens_kept)

    def build(self, encoded, ids, meta):
        """Decoded unit vectors [n, k] of the set meta["set"]: read back from its complete store (reuse), else
        projected and saved by rank 0 (the other ranks keep what the store would give). Then its shards go."""
        path = self.folder / "stores" / f"{meta['set']}.safetensors"
        vectors = reusable_store(path, ids, meta, self.tier, self.projector.k, self.log) if self.reuse else None
        if not self.everyone(vectors is not None):
            vectors = None
        if vectors is not None:
            self.log(f"[lark] {path}: store complete, reused")
        else:
            raw = self.project(encoded, ids, meta)
            vectors = save_store(path, raw, ids, meta, self.tier) if self.rank == 0 else stored_view(raw, self.tier)
        if self.rank == 0:  # the store is complete: its shards are no longer needed
            for shard in (self.folder / "shards").glob(f"{meta['set']}.[0-9]*.safetensors"):
                shard.unlink()
            faults.point("shard")
        return vectors

    def everyone(self, found):
        """Whether every rank found what it looked for (a store or shard to reuse): all ranks reuse it or all
        compute it, so no rank waits in project_examples' all_gather for one that went on (a collective per
        lookup; rank 0 deletes a set's shards only after every rank has read them)."""
        if self.world <= 1:
            return found
        device = next(self.model.parameters()).device
        return bool(self.gather(torch.tensor([float(found)], device=device)).min() > 0)

    def project(self, encoded, ids, meta):
        """[n, k] projected gradients of one set, computed shard by shard (shard_size examples): when a set spans
        several shards, each finished shard is saved under shards/ so that a killed run recomputes at most the
        shard in flight. A saved shard is reused only if its header (ids, projector, fingerprints) matches."""
        size = int(self.shard_size or len(encoded) or 1)  # runs from before shards: one shard per set
        sharded = len(encoded) > size
        parts = [
            self.shard(encoded[start : start + size], ids[start : start + size], meta, start, sharded)
            for start in range(0, len(encoded), size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.projector.k)

    def shard(self, encoded, ids, meta, start, sharded):
        """[len(encoded), k] projections of the examples from `start` on; saved (or reused) when `sharded`."""
        path = self.folder / "shards" / f"{meta['set']}.{start:06d}.safetensors"
        saved = read_shard(path, ids, meta, self.log) if self.reuse and sharded else None
        if not self.everyone(saved is not None):
            saved = None
        if saved is not None:
            self.log(f"[lark] {path.name}: shard complete, reused")
            return saved
        vectors = project_examples(
            self.model,
            encoded,
            self.projector,
            self.pad_id,
            self.batch_size,
            self.rank,
            self.world,
            self.gather,
            f"projecting {meta['set']}",
            None if self.keep is None else lambda index, *rest: self.keep([start + i for i in index], *rest),
        )
        if self.rank == 0 and sharded:
            metadata = {"ids": json.dumps(ids), **{k: json.dumps(v) for k, v in meta.items()}}
            atomic_save({"vectors": vectors.contiguous()}, path, metadata)
            faults.point("shard")
        return vectors

    def remove_empty_shards(self):
        """Rank 0, once every set is built: the shards/ folder goes when nothing is left in it."""
        shards = self.folder / "shards"
        if self.rank == 0 and shards.is_dir() and not any(shards.iterdir()):
            shards.rmdir()


def read_shard(path, ids, meta, log=print):
    """The raw vectors of a saved shard, or None when absent, unreadable, corrupted (logged) or produced from other
    inputs."""
    try:
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            header = {k: json.loads(v) for k, v in f.metadata().items() if k != CHECKSUM}
            return f.get_tensor("vectors") if header == {"ids": ids, **meta} else None
    except CorruptFile as e:
        log(f"[lark] {e}: recomputed")
    except (OSError, ValueError, SafetensorError):
        pass
    return None


def reusable_store(path, ids, meta, tier, k, log=print):
    """The decoded vectors of a complete store written from the same inputs, else None (then it is recomputed;
    a corrupted one is logged)."""
    try:
        vectors, _, stored_ids, header = load_store(path)
    except CorruptFile as e:
        log(f"[lark] {e}: recomputed")
        return None
    except (OSError, ValueError, KeyError, SafetensorError):
        return None
    return vectors if stored_ids == ids and header == {**meta, "tier": tier, "k": k} else None
