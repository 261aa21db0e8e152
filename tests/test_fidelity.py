"""The fidelity oracle on real text gradients of a tiny OLMo-3: projected cosines against exact cosines."""

import pytest
import torch
from conftest import TINY_OLMO3
from omegaconf import OmegaConf

from lark.data.formats import encode_qa, encode_text, qa_fields
from lark.data.world import generate_world
from lark.kernel.factory import make_projector
from lark.kernel.fidelity import agreement, exact_scores, fidelity, jl_pearson
from lark.models import build_tiny, train_tokenizer

FMT = OmegaConf.create(
    {
        "layout": {"_target_": "lark.data.formats.Chat"},
        "system_prompt": None,
        "user_template": "Context: {context}\nQuestion: {question}",
    }
)


@pytest.fixture(scope="module")
def setup():
    """Test questions as queries; fine-tuning questions and abstracts as documents (world text, not random)."""
    world = generate_world()
    tokenizer = train_tokenizer([d["text"] for d in world.medical_docs[:300] + world.entertainment_docs[:100]], 1024)
    torch.manual_seed(0)
    model = build_tiny(
        OmegaConf.create(TINY_OLMO3),
        tokenizer,
    ).eval()
    queries = [encode_qa(tokenizer, qa_fields(i, "{final_decision}"), FMT, 128) for i in world.test[:12]]
    docs = [encode_qa(tokenizer, qa_fields(i, "{final_decision}"), FMT, 128) for i in world.train[:18]] + [
        encode_text(tokenizer, d["text"], 128) for d in world.medical_docs[:18]
    ]
    return model, tokenizer.pad_token_id, queries, docs, exact_scores(model, queries, docs, tokenizer.pad_token_id)


def projector(model, kind, k):
    return make_projector(
        OmegaConf.create({"kind": kind, "k": k, "seed": 0, "normalize": "none", "method": "auto"}), model
    )


@pytest.mark.parametrize("kind", ["sketch", "rapidin"])
def test_error_shrinks_like_one_over_sqrt_k(setup, kind):
    model, pad, queries, docs, exact = setup
    results = {k: fidelity(model, queries, docs, projector(model, kind, k), pad, exact) for k in (1024, 4096, 65536)}
    errors = [results[k]["max_abs_err"] for k in (1024, 4096, 65536)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 3  # sqrt(65536 / 1024) = 8; max errors are noisy, so ask for 3
    best = results[65536]
    assert best["pearson"] >= 0.995 and best["max_abs_err"] <= 0.03 and best["top1"] >= 0.9


def test_a_per_tensor_projector_is_compared_with_per_tensor_exact_scores(setup):
    """fidelity() without `exact` compared a per-tensor (rapidin) projector with unnormalised exact cosines."""
    model, pad, queries, docs, _ = setup
    spec = {"kind": "sketch", "k": 4096, "seed": 0, "normalize": "per_tensor", "method": "auto"}
    p = make_projector(OmegaConf.create(spec), model)
    exact = exact_scores(model, queries[:3], docs[:4], pad, "per_tensor")
    assert fidelity(model, queries[:3], docs[:4], p, pad) == fidelity(model, queries[:3], docs[:4], p, pad, exact)


def test_store_tiers_cost(setup):
    model, pad, queries, docs, exact = setup
    p = projector(model, "sketch", 65536)
    half = fidelity(model, queries, docs, p, pad, exact, "float16")
    int8 = fidelity(model, queries, docs, p, pad, exact, "int8")
    bit = fidelity(model, queries, docs, p, pad, exact, "bit")
    assert int8["max_abs_err"] <= half["max_abs_err"] + 0.005 and int8["pearson"] >= 0.995
    assert 0.8 <= bit["pearson"] < half["pearson"]  # 16x smaller, measurably worse


def test_agreement_on_hand_matrices():
    exact = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    same = agreement(exact, exact, top=2)
    assert same["pearson"] == pytest.approx(1) and same["max_abs_err"] == 0 and same["top1"] == 1 and same["top2"] == 1
    swapped = agreement(exact, torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.8, 0.3]]), top=2)
    assert swapped["top1"] == 0.5 and swapped["max_abs_err"] == pytest.approx(0.8) and swapped["top2"] == 0.75


def test_spearman_gives_tied_scores_their_mean_rank():
    """The bit tier's scores take k + 1 values: an argsort of an argsort ranked ties in an arbitrary order, which
    understated Spearman (a tie-coarsened copy of the scores is a perfect monotone match)."""
    exact = torch.arange(12.0).view(2, 6)
    coarse = (exact / 3).floor()  # ties in groups of three
    ra = torch.tensor([2.0, 2, 2, 5, 5, 5, 8, 8, 8, 11, 11, 11])  # mean ranks of the groups
    expected = torch.corrcoef(torch.stack([torch.arange(1.0, 13), ra]))[0, 1].item()
    assert agreement(exact, coarse)["spearman"] == pytest.approx(expected)
    assert agreement(exact, -coarse)["spearman"] == pytest.approx(-expected)


def test_jl_pearson_predicts_a_dense_gaussian_projection():
    """The dense-JL formula against 20 draws of an actual N(0, 1) projection of vectors with spread-out cosines."""
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(20000, generator=gen)
    a = torch.randn(8, 20000, generator=gen) + torch.rand(8, 1, generator=gen) * 0.6 * common
    b = torch.randn(24, 20000, generator=gen) + torch.rand(24, 1, generator=gen) * 0.6 * common
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    exact = a @ b.T
    for k, tolerance in ((256, 0.025), (1024, 0.01)):
        measured = []
        for seed in range(20):
            r = torch.randn(20000, k, generator=torch.Generator().manual_seed(seed))
            pa, pb = a @ r, b @ r
            measured.append(
                agreement(exact, (pa / pa.norm(dim=1, keepdim=True)) @ (pb / pb.norm(dim=1, keepdim=True)).T)["pearson"]
            )
        assert sum(measured) / 20 == pytest.approx(jl_pearson(exact, k), abs=tolerance)
    assert jl_pearson(exact, 1024) > jl_pearson(exact, 256)


def test_sketch_error_is_the_projection_limit_not_more(setup):
    """The sketch's 1 - Pearson is what an ideal projection of k dimensions gives (within noise), on real text."""
    model, pad, queries, docs, exact = setup
    for k in (256, 1024):
        measured = [
            fidelity(
                model,
                queries,
                docs,
                make_projector(
                    OmegaConf.create({"kind": "sketch", "k": k, "seed": seed, "normalize": "none", "method": "auto"}),
                    model,
                ),
                pad,
                exact,
            )["pearson"]
            for seed in range(3)
        ]
        ratio = (1 - sum(measured) / 3) / (1 - jl_pearson(exact, k))
        assert 0.6 <= ratio <= 1.4, (k, measured, jl_pearson(exact, k))
