"""Store tiers, blocked scoring and the on-disk format."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from lark.kernel.stores import (
    TIERS,
    bytes_per_vector,
    cosine_scores,
    decode,
    dots,
    encode,
    load_store,
    save_store,
    stored_view,
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
    assert bytes_per_vector(tier, 256) == {"float16": 512, "bfloat16": 512, "int8": 260, "bit": 32}[tier]
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
    assert decode(encode(unit_rows(base), "bit"), "bit", 8192).norm().item() == pytest.approx(1)


@pytest.mark.parametrize("block", [1, 3, 7, 100])
def test_topk_in_blocks_equals_full_topk(block):
    q, d = unit_rows(vectors(5, 64, 3)), unit_rows(vectors(23, 64, 4))
    full = (q @ d.T).topk(4, dim=1)
    values, index = topk_scores(q, d, 4, block=block)
    assert torch.equal(index, full.indices) and torch.allclose(values, full.values)


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
