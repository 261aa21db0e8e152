"""Store tiers, blocked scoring and the on-disk format."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from lark.kernel.stores import (
    TIERS,
    BFloat16,
    Bit,
    Float16,
    Int8,
    StoreMismatch,
    check_compatible,
    cosine_scores,
    dots,
    load_store,
    save_store,
    store_bytes,
    stored_view,
    tier_of,
    topk_scores,
    unit_rows,
)


def vectors(n=20, k=256, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tier", TIERS)
def test_roundtrip_and_size(tmp_path, tier):
    v = vectors()
    decoded = save_store(tmp_path / "s.safetensors", v, [f"id{i}" for i in range(20)], {"epoch": 3}, tier)
    loaded, norms, ids, meta = load_store(tmp_path / "s.safetensors")
    assert torch.equal(loaded, decoded) and ids == [f"id{i}" for i in range(20)] and meta["epoch"] == 3
    assert torch.allclose(norms, v.norm(dim=1))
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:  # readable without LARK
        stored = f.get_tensor("vectors")
        assert json.loads(f.metadata()["tier"]) == tier
    assert (
        stored.numel() * stored.element_size() == 20 * {"float16": 512, "bfloat16": 512, "int8": 256, "bit": 32}[tier]
    )
    assert tier_of(tier).bytes(256) == {"float16": 512, "bfloat16": 512, "int8": 260, "bit": 32}[tier]
    exact = unit_rows(v) @ unit_rows(v).T
    err = (cosine_scores(decoded, decoded, tier) - exact).abs().max().item()
    assert err < {"float16": 2e-3, "bfloat16": 1e-2, "int8": 2e-2, "bit": 0.5}[tier]


def test_bit_tier_recovers_angles_of_gaussian_vectors():
    """SimHash: with many dimensions the sign agreement gives the angle."""
    base = vectors(1, 8192, 1)
    other = 0.6 * base + 0.8 * vectors(1, 8192, 2)
    a, b = stored_view(base, "bit"), stored_view(other, "bit")
    true = torch.nn.functional.cosine_similarity(base, other).item()
    assert cosine_scores(a, b, "bit").item() == pytest.approx(true, abs=0.03)
    assert Bit().decode(Bit().encode(unit_rows(base)), 8192).norm().item() == pytest.approx(1)


def test_tiers_are_named_by_their_config_string():
    assert TIERS == {"float16": Float16, "bfloat16": BFloat16, "int8": Int8, "bit": Bit}
    assert all(tier_of(name).name == name for name in TIERS)
    with pytest.raises(ValueError, match=r"unknown tier 'float8' \(float16, bfloat16, int8, bit\)"):
        tier_of("float8")


@pytest.mark.parametrize(
    "tier,stored",
    [  # 0.6 and -0.8 rounded to the nearest value with 10 (float16) or 7 (bfloat16) mantissa bits, by hand
        (Float16(), [1229 / 2048, -1638 / 2048]),
        (BFloat16(), [154 / 256, -205 / 256]),
    ],
)
def test_half_tiers_hold_the_rounded_unit_vector(tier, stored):
    tensors = tier.encode(torch.tensor([[0.6, -0.8]]))
    assert list(tensors) == ["vectors"] and tensors["vectors"].dtype == tier.dtype
    assert tensors["vectors"].float().tolist() == [stored]
    assert tier.decode(tensors, 2).dtype == torch.float32 and tier.decode(tensors, 2).tolist() == [stored]
    assert tier.bytes(2) == 4 and tier.bytes(65536) == 131072
    assert torch.equal(tier.finish(torch.tensor([0.25, -1.0])), torch.tensor([0.25, -1.0]))


def test_int8_tier_holds_codes_and_a_scale():
    """max|v| = 0.8 -> scale 0.8/127; 0.6 / scale = 95.25 -> 95, -0.8 -> -127, 0 -> 0."""
    tier = Int8()
    tensors = tier.encode(torch.tensor([[0.6, -0.8, 0.0]]))
    assert tensors["vectors"].dtype == torch.int8 and tensors["vectors"].tolist() == [[95, -127, 0]]
    assert tensors["scale"].dtype == torch.float32 and tensors["scale"].item() == pytest.approx(0.8 / 127)
    torch.testing.assert_close(tier.decode(tensors, 3), torch.tensor([[95 * 0.8 / 127, -0.8, 0.0]]))
    assert tier.bytes(3) == 7 and tier.bytes(256) == 260


def test_bit_tier_packs_signs_high_bit_first():
    """Signs 1010 1101 | 01 (v >= 0 -> 1, padded with zeros) = bytes 173, 64; decoded to +-1/sqrt(10). Two vectors
    2 signs apart: dot = (10 - 2 * 2) / 10, cosine estimate sin(pi/2 * 0.6) = cos(pi * 2 / 10)."""
    tier = Bit()
    a = torch.tensor([[0.5, -0.5, 0.0, -0.1, 0.3, 0.3, -0.2, 0.1, -0.4, 0.2]])
    tensors = tier.encode(a)
    assert tensors["vectors"].dtype == torch.uint8 and tensors["vectors"].tolist() == [[173, 64]]
    signs = [1, -1, 1, -1, 1, 1, -1, 1, -1, 1]
    torch.testing.assert_close(tier.decode(tensors, 10), torch.tensor([[s / math.sqrt(10) for s in signs]]))
    b = a.clone()
    b[0, 1], b[0, 8] = 0.5, 0.4  # two signs flipped
    dot = tier.decode(tensors, 10) @ tier.decode(tier.encode(b), 10).T
    assert dot.item() == pytest.approx(0.6)
    assert tier.finish(dot).item() == pytest.approx(math.cos(math.pi * 2 / 10))
    assert tier.bytes(10) == 2 and tier.bytes(16) == 2 and tier.bytes(17) == 3


def test_store_bytes_counts_vectors_norms_and_scores():
    """3 examples at k = 16 in int8: 3 x (16 + 4 scale + 4 norm) bytes; 1 x 2 float32 scores."""
    assert store_bytes(3, 1, 2, 16, "int8", save_scores=False) == 72
    assert store_bytes(3, 1, 2, 16, "int8", save_scores=True) == 80
    assert store_bytes(3, 1, 2, 16, "bit", save_scores=False) == 3 * (2 + 4)


@pytest.mark.parametrize("block", [1, 3, 7, 100])
def test_topk_in_blocks_equals_full_topk(block):
    q, d = unit_rows(vectors(5, 64, 3)), unit_rows(vectors(23, 64, 4))
    full = (q @ d.T).topk(4, dim=1)
    values, index = topk_scores(q, d, 4, block=block)
    assert torch.equal(index, full.indices) and torch.allclose(values, full.values)


@pytest.mark.parametrize("block", [1, 7, 100, 4096])
def test_tied_scores_rank_by_document_index_whatever_the_block(block):
    """Bit-tier-like scores (few distinct values, many ties): every block size gives the same top-k, ties broken by
    the smaller document index (topk's order among equal values depends on the blocks)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=gen).sign()
    d = torch.randn(300, 8, generator=gen).sign()  # 9 possible dot products: ties everywhere
    values, index = topk_scores(q, d, 10, block=block)
    scores = q @ d.T
    for row in range(4):  # the reference: sort by (-score, index)
        expected = sorted(range(300), key=lambda j: (-scores[row, j].item(), j))[:10]
        assert index[row].tolist() == expected
        assert values[row].tolist() == [scores[row, j].item() for j in expected]


@pytest.mark.parametrize("tier", ["float16", "int8", "bit"])
def test_a_zero_gradient_scores_zero_in_every_tier(tmp_path, tier):
    """A zero gradient (an example whose loss tokens were all cut, a frozen model) scores 0 against everything in
    every tier: the bit tier's signs made it all +1, scoring 1.0 against every other zero row."""
    v = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    v[[1, 3]] = 0
    save_store(tmp_path / "s.safetensors", v, [f"id{i}" for i in range(5)], {"set": "s"}, tier)
    loaded, norms, _, _ = load_store(tmp_path / "s.safetensors")
    assert (norms[[1, 3]] == 0).all() and (loaded[[1, 3]] == 0).all()
    scores = cosine_scores(loaded, loaded, tier)
    assert scores[1, 3] == 0 and scores[1].abs().max() == 0 and scores[0, 0] > 0.9


def test_nan_rows_never_win():
    q, d = unit_rows(vectors(2, 16)), unit_rows(vectors(4, 16, 5))
    d[1] = float("nan")
    values, index = topk_scores(q, d, 4)
    assert (index[:, :3] != 1).all() and math.isinf(values[0, 3].item())


def test_faiss_index_matches_blocked_topk(tmp_path):
    """Optional FAISS path: a flat index over two stores gives the exact top-k; IVF-PQ finds most of it."""
    pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install -e '.[faiss]')")
    from lark.kernel.stores import faiss_index, faiss_topk

    a, b = vectors(300, 64, 6), vectors(200, 64, 7)
    save_store(tmp_path / "a.safetensors", a, [f"a{i}" for i in range(300)], {"set": "A"})
    save_store(tmp_path / "b.safetensors", b, [f"b{i}" for i in range(200)], {"set": "B"})
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    q = stored_view(vectors(5, 64, 8), "float16")
    docs = torch.cat([stored_view(a, "float16"), stored_view(b, "float16")])
    want_v, want_i = topk_scores(q, docs, 5)
    index, ids = faiss_index(paths, "flat")
    got_v, got_ids = faiss_topk(index, ids, q, 5)
    names = [("A", f"a{i}") if i < 300 else ("B", f"b{i - 300}") for i in range(500)]
    assert [[names[i] for i in row] for row in want_i.tolist()] == got_ids
    assert torch.allclose(got_v, want_v, atol=1e-5)
    index, ids = faiss_index(paths, "ivfpq", nlist=4, m=8, train_size=300, nprobe=4)
    _, approx = faiss_topk(index, ids, q, 5)
    assert index.ntotal == 500 and sum(len(set(r) & set(g)) for r, g in zip(approx, got_ids)) >= 10
    b[3] = float("nan")  # a non-finite example's row: left out of both kinds (IVF-PQ's training refused it)
    save_store(tmp_path / "b.safetensors", b, [f"b{i}" for i in range(200)], {"set": "B"})
    for kind in ("flat", "ivfpq"):
        index, ids = faiss_index(paths, kind, nlist=4, m=8, train_size=300, nprobe=4)
        assert index.ntotal == 499 == len(ids) and ("B", "b3") not in ids and ids[303] == ("B", "b4")


def test_stores_norms_sum_in_float64(tmp_path):
    """A finite row of large coordinates keeps a finite norm (float32's sum of squares overflowed: the row then
    read as a non-finite gradient)."""
    rows = torch.tensor([[3e20, 4e20], [3.0, 4.0]])
    save_store(tmp_path / "s.safetensors", rows, ["big", "small"], {"set": "S"})
    _, norms, _, _ = load_store(tmp_path / "s.safetensors")
    torch.testing.assert_close(norms, torch.tensor([5e20, 5.0]))
    assert torch.isfinite(stored_view(rows, "float16")).all()


def test_a_trackstar_store_is_not_scored_alone(tmp_path):
    from lark.kernel.stores import score_stores

    meta = {"set": "S", "projector": {"kind": "sketch", "kernel": {"name": "trackstar"}}}
    save_store(tmp_path / "s.safetensors", vectors(3, 8), ["a", "b", "c"], meta)
    with pytest.raises(StoreMismatch, match=r"s\.safetensors: a trackstar store"):
        score_stores(tmp_path / "s.safetensors", tmp_path / "s.safetensors")


def test_a_header_missing_a_field_is_a_store_mismatch_naming_it():
    with pytest.raises(StoreMismatch, match=r"projector\.cache differs \(None vs '<missing>'\)"):
        check_compatible({"projector": {"k": 8, "cache": None}}, {"projector": {"k": 8}})


def test_exact_length_vectors_are_normalised_and_scored_in_float64():
    """Vectors as long as a model's gradient (the exact projector, the fidelity reference): torch's float32 norm and
    matrix product over 2^25 coordinates drift by ~0.2% on a CPU (1% at SmolLM2's 1.3 * 10^8), which once
    made every exact cosine of SmolLM2 look 3-4 dense-JL standard deviations off its sketch. Both sum in float64."""
    torch.manual_seed(0)
    n = 2**25
    a = torch.randn(n) * torch.rand(n) ** 4  # uneven magnitudes, like a per-tensor-normalised gradient
    b = 0.8 * a + 0.6 * torch.randn(n) * torch.rand(n) ** 4
    rows = torch.stack([a, b])
    unit = unit_rows(rows)
    assert unit.dtype == torch.float32
    torch.testing.assert_close(unit.double().norm(dim=1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    want = (a.double() @ b.double()) / (a.double().norm() * b.double().norm())
    got = cosine_scores(unit[:1], unit[1:])
    assert abs(got.item() - want.item()) < 1e-6, (got.item(), want.item())
    assert dots(rows[:, :1000], rows[:, :1000]).dtype == torch.float32  # short rows: the plain product


# ------------------------------------------------------------------------- the checkpoint's verbs, by hand
def hand_made(tmp_path):
    """A checkpoint context and its stores, made by hand: 2 queries, sources ft and pt of 2 documents each, unit
    vectors of +-1/2 (exact in float16), so that every cosine is a dot product done by hand:
        q1 = (+ + + +)/2  q2 = (+ + - -)/2
        ft: d1 = (+ + + -)/2  d2 = (- - - +)/2      q1: 0.5, -0.5   q2: 0.5, -0.5
        pt: e1 = (+ + + +)/2  e2 = (- + - -)/2      q1: 1.0, -0.5   q2: 0.0,  0.5"""
    from omegaconf import OmegaConf

    from lark.checkpoint import QUERY_SET, Checkpoint, Stores
    from lark.kernel.kernels import Cosine

    cfg = OmegaConf.create(
        {
            "attribution": {"store_dtype": "float16", "top_k": 2, "score_block": 1, "save_scores": True},
            "source": {
                "ft_source": "ft",
                "pt_source": "pt",
                "format_pairs": {},
                "size": 2,
                "sources": {
                    "ft": {"kind": "finetune", "corpus": None, "formatted": True},
                    "pt": {"kind": "sample", "corpus": "medical", "formatted": False},
                },
            },
            "format": {"answer_template": "{answer}"},
        }
    )
    ck = Checkpoint(cfg, torch.nn.Linear(3, 2), None, tmp_path, epoch=1, encoder=lambda e: e)
    ck.prints = {"checkpoint": "c", "tokenizer": "t", "format": "f"}
    half = [[0.5 * s for s in row] for row in ([1, 1, 1, 1], [1, 1, -1, -1], [1, 1, 1, -1], [-1, -1, -1, 1])]
    half += [[0.5 * s for s in row] for row in ([1, 1, 1, 1], [-1, 1, -1, -1])]
    vectors = {
        name: stored_view(torch.tensor(half[i : i + 2]), "float16")
        for name, i in zip([QUERY_SET, "ft", "pt"], [0, 2, 4])
    }
    projector = type("Hand", (), {"k": 4, "spec": lambda self: {"kind": "hand", "k": 4}})()
    stores = Stores(projector, Cosine(), vectors, {n: {"k": 4} for n in vectors}, {n: [] for n in vectors})
    sets = {"ft": [{"id": "d1", "text": "alpha"}, {"id": "d2", "text": "beta"}]}
    sets["pt"] = [{"id": "e1", "text": "gamma"}, {"id": "e2", "text": "delta"}]
    queries = [{"id": "q1", "question": "alpha"}, {"id": "q2", "question": "gamma"}]
    return ck, stores, sets, queries


def test_score_gives_the_hand_computed_top_documents_and_matrices(tmp_path):
    from lark.checkpoint import score

    ck, stores, sets, _ = hand_made(tmp_path)
    maxinf, rows = score(ck, stores, ["q1", "q2"], sets)
    assert {n: m.tolist() for n, m in maxinf.items()} == {"ft": [0.5, 0.5], "pt": [1.0, 0.5]}
    assert rows == [
        ("q1", "ft", 1, "d1", 0.5),
        ("q1", "ft", 2, "d2", -0.5),
        ("q2", "ft", 1, "d1", 0.5),
        ("q2", "ft", 2, "d2", -0.5),
        ("q1", "pt", 1, "e1", 1.0),
        ("q1", "pt", 2, "e2", -0.5),
        ("q2", "pt", 1, "e2", 0.5),
        ("q2", "pt", 2, "e1", 0.0),
    ]
    with safe_open(str(ck.out_dir / "scores" / "pt.safetensors"), framework="pt") as f:
        assert f.get_tensor("scores").tolist() == [[1.0, -0.5], [0.0, 0.5]]
        assert json.loads(f.metadata()["docs"]) == ["e1", "e2"]


def test_measure_gives_the_hand_computed_metrics(tmp_path):
    """maxinf ft (0.5, 0.5), pt (1.0, 0.5): MeanMax 0.5 and 0.75, FT/PT 2/3, FT wins 0 and PT wins 0.5 (a tie is no
    one's win). BM25 over
    the 4 one-word documents: a query's word is in one document, idf = ln((4 - 1 + 0.5) / (1 + 0.5)) = ln(7/3), its
    term weight tf (k1 + 1) / (tf + k1) = 1 at dl = avgdl; q1 (alpha) finds ft's d1, q2 (gamma) pt's e1."""
    from lark.checkpoint import measure

    ck, stores, sets, queries = hand_made(tmp_path)
    maxinf = {"ft": torch.tensor([0.5, 0.5]), "pt": torch.tensor([1.0, 0.5])}
    metrics = measure(ck, stores, maxinf, queries, sets, {"epoch": 1, "lr": None})
    assert list(metrics) == [
        "epoch", "lr", "n_queries", "sources", "ft_source", "pt_source", "ft", "pt", "ft_pt_ratio", "ft_wins",
        "pt_wins", "format_effect", "bm25", "storage", "projector", "kernel", "loss_target", "nonfinite",
        "fingerprints", "warnings",
    ]  # fmt: skip
    assert metrics["warnings"] == {}  # nothing cut, no source short, no all-zero scores
    assert (metrics["ft"], metrics["pt"], metrics["ft_wins"], metrics["pt_wins"]) == (0.5, 0.75, 0.0, 0.5)
    assert metrics["ft_pt_ratio"] == pytest.approx(2 / 3) and metrics["n_queries"] == 2
    assert metrics["sources"]["pt"] == {
        "mean_max": 0.75,
        "ft_wins": 0.0,
        "n_nonfinite": 0,
        "n_docs": 2,
        "kind": "sample",
        "corpus": "medical",
        "formatted": False,
    }
    bm25 = metrics["bm25"]
    assert (bm25["ft_wins"], bm25["pt_wins"]) == (0.5, 0.5)
    assert bm25["sources"]["ft"]["mean_max"] == pytest.approx(math.log(7 / 3) / 2)
    assert bm25["sources"]["pt"]["mean_max"] == pytest.approx(math.log(7 / 3) / 2)
    assert metrics["storage"] == {  # Linear(3, 2): 8 float32 parameters; k = 4 float16 dimensions
        "n_params": 8,
        "grad_dtype_bytes": 4,
        "k": 4,
        "store_dtype_bytes": 2.0,
        "n_examples": 2,
        "full_bytes_per_example": 32,
        "store_bytes_per_example": 8,
    }
    assert metrics["projector"] == {"kind": "hand", "k": 4} and metrics["kernel"]["name"] == "cosine"
    assert metrics["loss_target"] == {"answer_template": "{answer}", "query_target": None}
    assert metrics["nonfinite"] == {"count": 0, "ids": {"test_queries": [], "ft": [], "pt": []}}
    assert metrics["fingerprints"] == {"checkpoint": "c", "tokenizer": "t", "format": "f"}
