"""Gradient stores on disk and scoring against them.

A store is one safetensors file: the projected gradients of one set, unit-normalised and encoded in a tier,
plus their float32 norms; the header metadata carries the example ids and what produced them (JSON strings).
It reads without LARK: `safe_open(path, "pt").get_tensor("vectors")`.

Tiers (`attribution.store_dtype`: one Tier class each, in TIERS), bytes per dimension, and how cosine is recovered:
- float16 / bfloat16 (2 bytes, default float16): the unit vector itself.
- int8 (1 byte + 4 bytes per vector): round(127 * v / max|v|) and the per-vector scale max|v| / 127.
- bit (1/8 byte): the sign of each coordinate, packed; cos = sin(pi/2 * <sign(a), sign(b)> / k), the SimHash
  estimate (angle = pi * Hamming / k), exact for Gaussian vectors. Gradient sketches are heavier-tailed: on the
  tiny model's trained checkpoint (k = 65,536) the bit cosines came out shrunk, slope 0.68 and mean |error| 0.16
  against the float16 tier under kernel normalize=none, slope 0.90 and 0.07 under per_tensor (rapidin): compare
  bit-tier scores with each other, not with another tier's.
"""

import csv
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from lark.data.io import CHECKSUM, check_safetensors, replacing, seal
from lark.errors import CorruptFile, StoreMismatch

# Header fields two stores must agree on to be scored against each other: the projection (kind, k, seed, version,
# ...), the tier, and the fingerprints of the checkpoint, the tokenizer and the format that produced them.
MATCH = ("k", "tier", "projector", "checkpoint", "tokenizer", "format")


# ------------------------------------------------------------------------------------------------ tiers
class Tier:
    """How a store holds unit vectors: encode / decode / bytes, and `finish`, which turns dot products of decoded
    vectors into cosine estimates. One subclass per `attribution.store_dtype`; `name` is that string, written in
    the store header's `tier`."""

    name = None

    def bytes(self, k):
        """Bytes of one stored vector of k dimensions (its float32 norm aside)."""
        raise NotImplementedError

    def encode(self, unit):
        """{name: tensor} holding unit vectors [n, k] in this tier."""
        raise NotImplementedError

    def decode(self, tensors, k):
        """float32 [n, k] vectors whose dot products give the tier's cosine estimate (before `finish`)."""
        raise NotImplementedError

    def finish(self, dots):
        """Dot products of decoded vectors -> cosine estimates."""
        return dots


class Float16(Tier):
    """The unit vector itself, 2 bytes per dimension (the default)."""

    name, dtype = "float16", torch.float16

    def bytes(self, k):
        return 2 * k

    def encode(self, unit):
        return {"vectors": unit.to(self.dtype).contiguous()}

    def decode(self, tensors, k):
        return tensors["vectors"].float()


class BFloat16(Float16):
    """The unit vector itself in bfloat16 (float32's exponent, 8 bits of mantissa), 2 bytes per dimension."""

    name, dtype = "bfloat16", torch.bfloat16


class Int8(Tier):
    """round(127 * v / max|v|) and the per-vector scale max|v| / 127: 1 byte per dimension + 4 per vector."""

    name = "int8"

    def bytes(self, k):
        return k + 4

    def encode(self, unit):
        scale = unit.abs().amax(dim=1).clamp_min(1e-30) / 127
        return {"vectors": torch.round(unit / scale.unsqueeze(1)).to(torch.int8), "scale": scale.float()}

    def decode(self, tensors, k):
        return tensors["vectors"].float() * tensors["scale"].unsqueeze(1)


class Bit(Tier):
    """The sign of each coordinate (v >= 0 -> 1), 8 to a byte, the first coordinate in the high bit: 1/8 byte per
    dimension. Decoded to +-1/sqrt(k), whose dot product is 1 - 2 Hamming / k; `finish` maps it to
    sin(pi/2 * dot) = cos(pi * Hamming / k), the SimHash estimate."""

    name = "bit"

    def bytes(self, k):
        return math.ceil(k / 8)

    def encode(self, unit):
        bits = (unit >= 0).to(torch.uint8)
        pad = (-unit.shape[1]) % 8
        bits = torch.nn.functional.pad(bits, (0, pad)).view(unit.shape[0], -1, 8)
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        return {"vectors": (bits * weights).sum(dim=2).to(torch.uint8)}

    def decode(self, tensors, k):
        shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
        bits = ((tensors["vectors"].unsqueeze(2) >> shifts) & 1).flatten(1)[:, :k].float()
        return (bits * 2 - 1) / math.sqrt(k)

    def finish(self, dots):
        return torch.sin(dots.clamp(-1, 1) * (math.pi / 2))


TIERS = {tier.name: tier for tier in (Float16, BFloat16, Int8, Bit)}  # attribution.store_dtype -> its class


def tier_of(name):
    """The tier named by attribution.store_dtype (or by a store header's `tier`)."""
    if name not in TIERS:
        raise ValueError(f"attribution.store_dtype: unknown tier '{name}' ({', '.join(TIERS)})")
    return TIERS[name]()


def store_bytes(n_examples, n_queries, n_docs, k, tier, save_scores):
    """Bytes written per attributed checkpoint: stores (vectors + float32 norms) and float32 score matrices."""
    return n_examples * (tier_of(tier).bytes(k) + 4) + (4 * n_queries * n_docs if save_scores else 0)


# ------------------------------------------------------------------------------------------------ vectors
def unit_rows(vectors):
    """Rows scaled to unit norm (zero rows stay zero, NaN rows stay NaN); norms accumulated in float64 (torch's
    float32 norm of 10^8 coordinates is ~0.7% low on a CPU, which inflates exact cosines by as much)."""
    norms = torch.linalg.vector_norm(vectors, dim=1, keepdim=True, dtype=torch.float64)
    return vectors / norms.clamp_min(1e-30).to(vectors.dtype)


def row_norms(vectors):
    """[n] float32 norms of the rows, accumulated in float64 as unit_rows' (a float32 sum of squares loses ~1% over
    10^8 coordinates and overflows to inf for coordinates near 1e20, which a finite gradient can have)."""
    return torch.linalg.vector_norm(vectors, dim=1, dtype=torch.float64).float()


def dots(a, b, chunk=2**20):
    """a @ b.T. Rows longer than `chunk` (the exact projector: k = every parameter) are multiplied a chunk of
    columns at a time and summed in float64: a float32 product over 10^8 coordinates drifts by ~1% on a CPU."""
    if a.shape[1] <= chunk:
        return a @ b.T
    return sum(a[:, s : s + chunk].double() @ b[:, s : s + chunk].double().T for s in range(0, a.shape[1], chunk)).to(
        a.dtype
    )


def atomic_save(tensors, path, metadata):
    """safetensors written to a temporary name and renamed: a reader never sees half a file. The header carries
    the file's checksum (lark.data.io.seal; verified by load_store) and its keys sorted (safetensors writes them in
    hash-map order), so equal contents give byte-identical files."""
    parts = seal(save(tensors, metadata=metadata))
    with replacing(path, sum(len(part) for part in parts)) as tmp, open(tmp, "wb") as f:
        for part in parts:
            f.write(part)


def decoded(tensors, tier, k):
    """The tier's decode(), with the rows of non-finite gradients (non-finite norms) NaN and those of zero gradients
    zero in every tier (the bit tier would otherwise turn both into valid-looking sign vectors: a zero gradient
    all +1, scoring 1.0 against every other zero row where the other tiers score 0)."""
    vectors = tier_of(tier).decode(tensors, k)
    norms = tensors["norms"].unsqueeze(1)
    return torch.where(torch.isfinite(norms), torch.where(norms == 0, 0.0, vectors), float("nan"))


def save_store(path, vectors, ids, meta, tier="float16"):
    """Write projected gradients [n, k] as a store; returns the decoded unit vectors the scores will use."""
    unit = unit_rows(vectors)
    tensors = {**tier_of(tier).encode(unit), "norms": row_norms(vectors)}
    metadata = {
        "ids": json.dumps(ids),
        "tier": json.dumps(tier),
        "k": json.dumps(vectors.shape[1]),
        **{k: json.dumps(v) for k, v in meta.items()},
    }
    atomic_save(tensors, path, metadata)
    return decoded(tensors, tier, vectors.shape[1])


def stored_view(vectors, tier):
    """What the scores see of vectors stored in a tier (without writing them)."""
    return decoded({**tier_of(tier).encode(unit_rows(vectors)), "norms": row_norms(vectors)}, tier, vectors.shape[1])


def load_store(path):
    """(decoded unit vectors float32 [n, k], norms [n], ids, metadata). safetensors: nothing is unpickled. The
    checksum is verified first (CorruptFile: corrupted or truncated; a store without one reads unverified)."""
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items() if k != CHECKSUM}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return decoded(tensors, meta["tier"], meta["k"]), tensors["norms"], meta.pop("ids"), meta


def check_compatible(a, b, a_name="a", b_name="b"):
    """Refuse (StoreMismatch, naming the field) to score stores whose headers disagree on a MATCH field."""
    for key in MATCH:
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        field = key
        if isinstance(x, dict) and isinstance(y, dict):  # name the first sub-field that differs (or is missing)
            missing = object()
            sub = next(s for s in sorted(set(x) | set(y)) if x.get(s, missing) != y.get(s, missing))
            field, x, y = f"{key}.{sub}", x.get(sub, "<missing>"), y.get(sub, "<missing>")
        raise StoreMismatch(
            f"cannot score {a_name} against {b_name}: {field} differs ({x!r} vs {y!r}); "
            "stores from different projectors, checkpoints, tokenizers or formats never mix"
        )


def refuse_whitened(meta, path):
    """A store of a kernel that transforms its checkpoint's vectors together before scoring (TrackStar's
    whitening over every set) cannot be scored alone: its plain cosines are not the kernel's scores."""
    kernel = (meta.get("projector") or {}).get("kernel") or {}
    if kernel.get("name") == "trackstar":
        raise StoreMismatch(
            f"{path}: a trackstar store: its scores need the whitening over all of the checkpoint's sets (the "
            "run's scores/ and top_influences.csv have them); scoring it alone would give unwhitened cosines"
        )


def score_stores(query_path, doc_path, block=4096):
    """[n_q, n_d] cosine scores between two stores on disk, after checking that they can be compared."""
    q, _, _, q_meta = load_store(query_path)
    d, _, _, d_meta = load_store(doc_path)
    check_compatible(q_meta, d_meta, Path(query_path).name, Path(doc_path).name)
    refuse_whitened(q_meta, query_path)
    return cosine_scores(q, d, q_meta["tier"], block)


def cosine_scores(queries, docs, tier="float16", block=4096):
    """[n_q, n_d] cosine estimates from decoded unit vectors, computed in blocks of document rows."""
    finish = tier_of(tier).finish
    parts = [finish(dots(queries, docs[s : s + block])) for s in range(0, len(docs), block)]
    return torch.cat(parts, dim=1) if parts else torch.zeros(len(queries), 0)


def topk_scores(queries, docs, k, tier="float16", block=4096):
    """(values, indices) [n_q, k] of each query's k best documents, never holding more than one block of scores
    (plus the running top-k): for stores too large to score all at once. Equal scores (the bit tier's are few
    distinct values) rank by document index, whatever the block size (best_by_value)."""
    finish = tier_of(tier).finish
    return top_by_blocks(lambda s, e: finish(dots(queries, docs[s:e])), len(queries), len(docs), k, block)


def top_by_blocks(score, n_queries, n_docs, k, block=4096):
    """(values, indices) [n_q, min(k, n_d)] of each query's k best documents, `score(start, stop)` giving the
    [n_q, stop - start] scores of one block of documents at a time (NaN ranks last); ties by document index."""
    best_v = torch.full((n_queries, 0), float("-inf"))
    best_i = torch.zeros((n_queries, 0), dtype=torch.long)
    for s in range(0, n_docs, block):
        scores = score(s, min(s + block, n_docs)).nan_to_num(float("-inf"))
        values = torch.cat([best_v, scores], dim=1)
        index = torch.cat([best_i, torch.arange(s, s + scores.shape[1]).expand(n_queries, -1)], dim=1)
        best_v, best_i = best_by_value(values, index, min(k, n_docs))
    return best_v, best_i


def best_by_value(values, index, k):
    """The k largest values of each row and their indices, ties by the smaller index (a stable sort of the
    entries in index order; topk's order among equal values is arbitrary)."""
    order = index.argsort(dim=1)
    values, index = values.gather(1, order), index.gather(1, order)
    values, pos = values.sort(dim=1, descending=True, stable=True)
    return values[:, :k], index.gather(1, pos[:, :k])


def faiss_index(paths, kind="flat", nlist=64, m=64, train_size=20000, nprobe=8):
    """An inner-product FAISS index (optional: `pip install -e ".[faiss]"`) over one or more stores, added one
    store at a time, with the (set, id) of every row. kind=flat keeps the decoded vectors (4 bytes/dim, exact
    top-k); kind=ivfpq keeps m bytes per vector (product quantisation, nlist inverted lists), for sets of stores
    larger than memory: its codebooks are trained on up to `train_size` vectors of the first stores, and a search
    visits `nprobe` of the lists. Rows of non-finite gradients (NaN in a store) are left out: they score nothing
    (FAISS would refuse them in training and rank their NaN scores arbitrarily)."""
    import faiss
    import numpy as np

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("faiss_index: no store paths")
    index, ids, pending, first = None, [], [], None
    for path in paths:
        vectors, _, store_ids, meta = load_store(path)
        first = first or (meta, path.name)
        check_compatible(first[0], meta, first[1], path.name)
        refuse_whitened(meta, path)
        if index is None:
            dim = vectors.shape[1]
            if kind == "flat":
                index = faiss.IndexFlatIP(dim)
            elif kind == "ivfpq":
                index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
                index.nprobe = nprobe
            else:
                raise ValueError(f"faiss_index: unknown kind '{kind}' (flat or ivfpq)")
        finite = torch.isfinite(vectors).all(dim=1)
        ids += [(meta["set"], i) for i, keep in zip(store_ids, finite.tolist()) if keep]
        pending.append(vectors[finite].numpy().astype(np.float32))
        if index.is_trained or sum(len(r) for r in pending) >= train_size or path == paths[-1]:
            rows, pending = np.concatenate(pending), []
            if not index.is_trained:
                index.train(rows[:train_size])
            index.add(rows)
    return index, ids


def faiss_topk(index, ids, queries, k, tier="float16"):
    """(scores [n_q, k], [[(set, id), ...], ...]) of each query's k best rows of a faiss_index."""
    scores, rows = index.search(queries.float().numpy(), k)
    names = [[ids[j] if j >= 0 else None for j in row] for row in rows]
    return tier_of(tier).finish(torch.from_numpy(scores)), names


def read_top_influences(path):
    """(rank, query_id, source, doc_id, score) of each row of a top_influences.csv; CorruptFile names the file and
    the line of a row that is not one (a torn file: a row cut short, a rank or score that is no number)."""
    out, line = [], 1
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                line = reader.line_num
                out.append((int(row["rank"]), row["query_id"], row["source"], row["doc_id"], float(row["score"])))
    except (KeyError, TypeError, ValueError, csv.Error) as error:  # UnicodeDecodeError is a ValueError
        raise CorruptFile(
            f"{path}:{line}: expected the columns query_id, source, rank (an integer), doc_id, score (a number) "
            f"({error!r}): re-attribute that epoch (attribute.py), or remove the file to analyse the run without it"
        ) from None
    return out
