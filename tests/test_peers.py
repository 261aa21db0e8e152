"""benchmarks/peers.py: Captum's TracInCP rows against LARK's exact per-example gradients on a tiny OLMo-3."""

import sys
from pathlib import Path

import pytest
import torch

from lark.kernel.projectors import ExactProjector, trainable

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

pytest.importorskip("captum")
from peers import captum_fast_rand_proj, captum_tracincp  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    from transformers import Olmo3Config, Olmo3ForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Olmo3ForCausalLM(
        Olmo3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    ).eval()
    ids = torch.randint(1, 64, (3, 16))
    mask = torch.ones_like(ids)
    mask[1, 11:] = mask[2, 6:] = 0  # right padding
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # a prompt without loss
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    exact = ExactProjector({n: tuple(p.shape) for n, p in trainable(model)}).project_batch(model, batch)
    yield model, batch, exact
    torch.set_num_threads(before)


def cosines(v):
    v = v.double() / v.double().norm(dim=1, keepdim=True)
    return v @ v.T


def state(model):
    return [(p.detach().clone(), p.requires_grad) for p in model.parameters()]


def unchanged(model, before):
    return all(torch.equal(p, q) and p.requires_grad == flag for p, (q, flag) in zip(model.parameters(), before))


def test_tracincp_is_the_exact_gradient(setup):
    model, batch, exact = setup
    before = state(model)
    peer = captum_tracincp(model, 1024)
    v = peer.project_batch(model, batch)
    assert v.dtype == torch.float32 and v.shape == exact.shape == (3, peer.k)  # covers every parameter
    assert torch.allclose(cosines(v), cosines(exact), atol=1e-4, rtol=0)
    assert torch.allclose(v, exact, atol=1e-5, rtol=1e-4)
    assert torch.equal(peer.project_batch(model, batch), v)
    assert unchanged(model, before)


def test_fast_rand_proj_is_the_output_layer_gradient(setup):
    model, batch, exact = setup
    before = state(model)
    head = exact[:, -model.lm_head.weight.numel() :]  # lm_head is the last parameter
    full = captum_fast_rand_proj(model, 4096).project_batch(model, batch)  # V * H = 2048 <= k: no projection
    assert full.shape == (3, 4096) and torch.allclose(full[:, :2048], head, atol=1e-5) and not full[:, 2048:].any()
    peer = captum_fast_rand_proj(model, 256)  # 16 x 16 projection of the 64 x 32 gradient
    v = peer.project_batch(model, batch)
    assert v.dtype == torch.float32 and v.shape == (3, 256)
    assert torch.equal(captum_fast_rand_proj(model, 256).project_batch(model, batch), v)
    assert (cosines(v) - cosines(head)).abs().max() < 0.5  # a random projection, not exact
    assert unchanged(model, before)
