"""lark.kernel.tokens (attribution.tokens=topk): each top pair's score split over the document's and the query's
loss tokens equals the explicit per-token gradients' cosine shares (exact projector), sums to the pair's score
for every kernel and projector on real stores, and `train.py` / `attribute.py` write tokens/<source>.jsonl."""

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, tiny_with_norms
from omegaconf import OmegaConf

from lark.checkpoint import TOP_COLUMNS
from lark.data.datamodule import collate
from lark.data.formats import IGNORE, encode_text
from lark.data.io import write_csv
from lark.kernel.build import StoreBuilder
from lark.kernel.factory import make_kernel, make_projector
from lark.kernel.kernels import Cosine
from lark.kernel.optimizer import estimate_moments
from lark.kernel.projectors import trainable
from lark.kernel.sketch import HookSketch
from lark.kernel.stores import topk_scores
from lark.kernel.tokens import TOKENS_TOP_K, by_character, check, missing, top_k_of, top_pieces, write_tokens
from lark.kernel.tokens_math import Transpose, pieces, scaling, token_derivatives, token_losses, token_products

CONF = ROOT / "conf" / "attribution"
QUERIES = "test_queries"


@pytest.fixture(scope="module")
def setup():
    """A tiny OLMo-3 (norm weights away from 1), its tokenizer, 4 queries whose loss is their second half (a
    Formatted answer) and two sources of 5 documents (one Formatted-like, one with loss on every token)."""
    tok, model, texts = tiny_with_norms()

    def answer_only(e):  # loss on the second half: a Formatted example's answer
        half = len(e["input_ids"]) // 2
        return {"input_ids": e["input_ids"], "labels": [IGNORE] * half + e["input_ids"][half:]}

    sets = {
        QUERIES: [{"id": f"q{i}", "text": t} for i, t in enumerate(texts[:4])],
        "formatted": [{"id": f"f{i}", "text": t} for i, t in enumerate(texts[10:15])],
        "raw": [{"id": f"r{i}", "text": t} for i, t in enumerate(texts[60:65])],
    }
    encodings = {}
    for name, examples in sets.items():
        for i, e in enumerate(examples):
            encoded = encode_text(tok, e["text"], 20 + 3 * i)
            encodings[e["text"]] = encoded if name == "raw" else answer_only(encoded)
    return {"tok": tok, "model": model, "sets": sets, "encoder": lambda e: encodings[e["text"]]}


def attribution(projector="exact", kernel="cosine", **options):
    projector = OmegaConf.merge(OmegaConf.load(CONF / "projector" / f"{projector}.yaml"), options)
    kernel = OmegaConf.load(CONF / "kernel" / f"{kernel}.yaml")
    attr = {"projector": projector, "kernel": kernel, "top_k": 3, "store_dtype": "float16"}
    return OmegaConf.create({"max_length": 128, "attribution": attr}).attribution  # sketch: plan_tokens


def batch_of(setup, example):
    return collate([setup["encoder"](example)], setup["tok"].pad_token_id)


@pytest.mark.parametrize(
    "mode, budget", [("auto", None), ("forward", None), ("reverse", None), ("auto", 1), ("reverse", 1)]
)
def test_contributions_equal_explicit_per_token_gradient_shares(setup, tmp_path, mode, budget):
    """(a) Exact projector, cosine: c_t(d) = <v_q, g_t(d)> / ||g(d)|| with g_t the autograd gradient of loss token
    t's share (one backward per token), and c_t(q) likewise; both within 1e-4 of what the files say, whether the
    pass is forward mode (a pass per partner), reverse mode (a pass per loss token) or the cheaper of the two, and
    whether a pass takes many tangents (loss tokens) or, with attribution.tokens_budget = 1, one (in reverse mode:
    each loss token's backward pass dotted with the partners' tangents one batch of one at a time)."""
    model, sets = setup["model"], setup["sets"]
    rows = run_tokens(setup, attribution("exact"), tmp_path, mode=mode, budget=budget)
    params = trainable(model)

    def grads(example):
        """[T, P] per-token gradient shares (zero rows where no loss) and the whole gradient [P]."""
        batch = batch_of(setup, example)
        losses = token_losses(model, dict(params), batch)
        per_token = []
        for t in range(losses.shape[0]):
            if losses[t] == 0:
                per_token.append(None)
                continue
            g = torch.autograd.grad(losses[t], [p for _, p in params], retain_graph=True, allow_unused=True)
            per_token.append(
                torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, (_, p) in zip(g, params)])
            )
        whole = sum(g for g in per_token if g is not None)
        return per_token, whole

    record = next(r for r in rows["raw"] if r["rank"] == 1)
    q = next(e for e in sets[QUERIES] if e["id"] == record["query_id"])
    d = next(e for e in sets["raw"] if e["id"] == record["doc_id"])
    (gq_t, gq), (gd_t, gd) = grads(q), grads(d)
    vq, vd = gq / gq.norm(), gd / gd.norm()
    assert record["score"] == pytest.approx(float(vq @ vd), abs=1e-3)
    for side, per_token, whole, other in (("doc", gd_t, gd, vq), ("query", gq_t, gq, vd)):
        written = [t[3] for t in record[side]["tokens"]]
        expected = [None if g is None else float(g @ other / whole.norm()) for g in per_token]
        assert [w is None for w in written] == [e is None for e in expected]
        for w, e in zip(written, expected):
            if e is not None:
                assert w == pytest.approx(e, abs=1e-4)
        assert sum(w for w in written if w is not None) == pytest.approx(record["score"], abs=1e-3)


@pytest.mark.parametrize(
    "projector, options",
    [
        ("sketch", {}),
        ("sketch", {"method": "tensorsketch"}),
        ("factored", {}),
        ("factored", {"vocab_numbers": 700}),
        ("rapidin", {}),
        ("gaussian", {}),
    ],
)
def test_transpose_is_the_projection_adjoint(setup, projector, options):
    """<P^T w, N D g> = <w, project_batch(example)> for the projector's own vector of an example (with per-tensor
    norms and the Adam correction: the rapidin and adam kernels), on autograd's gradient g; the sketch at k = 512
    reads many rotated chunks per parameter, with a last partial one (its Linear layers also as TensorSketch)."""
    model = setup["model"]
    for kernel in ("rapidin", "adam"):
        attr = attribution(projector, kernel, k=512, **options)
        moments = (
            estimate_moments(model, [batch_of(setup, e) for e in setup["sets"]["raw"][:2]])
            if kernel == "adam"
            else None
        )
        kern = make_kernel(attr)
        proj = make_projector(attr, model, kern, moments)
        batch = batch_of(setup, setup["sets"]["formatted"][2])
        vector = proj.project_batch(model, batch)[0]
        w = torch.randn(2, vector.shape[0], generator=torch.Generator().manual_seed(3))
        u, diagonal = Transpose(proj, model)(w), scaling(proj, model, batch)
        tangents = Transpose(proj, model)(w, diagonal)  # what the token pass uses, parameter by parameter
        for n in u:
            torch.testing.assert_close(tangents[n], u[n] * diagonal[n], msg=n)
        from lark.kernel.projectors import example_gradient

        _, g = example_gradient(model, batch, trainable(model))
        for i in range(2):
            total = sum(float((u[n][i] * diagonal[n] * g[n]).sum()) for n in u)
            assert total == pytest.approx(float(w[i] @ vector), rel=1e-4, abs=1e-5), kernel


def run_tokens(setup, attr, folder, moments=None, mode="auto", budget=None, split=None, kept=None):
    """Real stores of the three sets (lark.kernel.build), the kernel's scores and top rows, then write_tokens
    (attribution.tokens_budget = budget, tokens_split = split where given; kept: "store", the store pass keeps the
    position pieces, as a run does, "late": write_tokens keeps them batch by batch, as for a finished run's stores,
    lark.kernel.tokens_kept; either way no second pass runs): {source: [records]}."""
    from unittest import mock

    from lark.kernel import tokens
    from lark.kernel.tokens_kept import Kept

    model, sets = setup["model"], setup["sets"]
    kernel = make_kernel(attr)
    projector = make_projector(attr, model, kernel, moments)
    builder = StoreBuilder(model, projector, folder, setup["tok"].pad_token_id, batch_size=3)
    vectors, pieces = {}, Kept(projector, 2, 2**28, kernel.whitens) if kept == "store" else None
    for name, examples in sets.items():
        encoded = [setup["encoder"](e) for e in examples]
        builder.keep = pieces.start(name, vectors.get(QUERIES)) if pieces else None
        vectors[name] = builder.build(encoded, [e["id"] for e in examples], {"set": name})
    scored = kernel.transform(vectors, QUERIES)
    rows = []
    for name in ("formatted", "raw"):
        values, index = topk_scores(scored[QUERIES], scored[name], 3)
        for i, q in enumerate(sets[QUERIES]):
            rows += [
                (q["id"], name, r + 1, sets[name][index[i, r]]["id"], round(values[i, r].item(), 6)) for r in range(3)
            ]
    write_csv(folder / "top_influences.csv", [dict(zip(TOP_COLUMNS, r)) for r in rows], TOP_COLUMNS)
    options = {"tokens_top_k": 2, "batch_size": 3, **({"tokens_budget": budget} if budget else {})}
    options.update({**OmegaConf.to_container(attr), "tokens": "topk"} if kept == "late" else {})  # (kept_for's)
    cfg = OmegaConf.create({"attribution": {**options, **({"tokens_split": split} if split else {})}})
    ck = SimpleNamespace(out_dir=folder, model=model, tokenizer=setup["tok"], encoder=setup["encoder"], cfg=cfg)
    if pieces:  # every query, and (a kernel that does not whiten) every written pair's document, from its pieces
        pairs = {
            (name, next(i for i, e in enumerate(sets[name]) if e["id"] == d)) for _, name, r, d, _ in rows if r <= 2
        }
        assert {(QUERIES, i) for i in range(len(sets[QUERIES]))} <= set(pieces.examples)
        assert (pairs <= set(pieces.examples)) != kernel.whitens and pieces.held() <= 2**28
    second = mock.Mock(wraps=tokens.position_products)
    with mock.patch.object(tokens, "position_products", second):
        write_tokens(ck, projector, kernel, vectors, sets, rows, QUERIES, mode, pieces)
    assert second.called == (split == "position" and kept is None), second.call_count
    return {
        name: [json.loads(line) for line in (folder / "tokens" / f"{name}.jsonl").read_text().splitlines()]
        for name in ("formatted", "raw")
    }


@pytest.mark.parametrize(
    "projector,kernel,split",
    [
        ("sketch", "cosine", "loss"),
        ("sketch", "rapidin", "loss"),
        ("sketch", "adam", "loss"),
        ("sketch", "trackstar", "loss"),
        ("sketch", "tracin_cp", "loss"),
        ("factored", "cosine", "loss"),
        ("factored", "rapidin", "loss"),
        ("factored", "adam", "loss"),
        ("factored", "trackstar", "loss"),
        ("factored", "tracin_cp", "loss"),
        ("sketch", "cosine", "position"),
        ("sketch", "rapidin", "position"),
        ("sketch", "adam", "position"),
        ("sketch", "trackstar", "position"),
        ("sketch", "tracin_cp", "position"),
        ("factored", "cosine", "position"),
        ("factored", "rapidin", "position"),
        ("factored", "adam", "position"),
        ("factored", "trackstar", "position"),
        ("factored", "tracin_cp", "position"),
        ("factored", "cosine", "position-store"),
        ("factored", "rapidin", "position-store"),
        ("factored", "adam", "position-store"),
        ("factored", "trackstar", "position-store"),
        ("factored", "tracin_cp", "position-store"),
        ("factored", "rapidin", "position-late"),
        ("factored", "adam", "position-late"),
        ("factored", "trackstar", "position-late"),
    ],
)
def test_contributions_sum_to_the_score_on_real_stores(setup, tmp_path, projector, kernel, split):
    """(b) For every kernel (and the factored projector), each written pair's doc and query contributions sum to
    its score within 1e-3, split by loss token (loss tokens only carry one) or by position (every token carries
    one), by the second pass or from the pieces the store pass kept (position-store) or write_tokens kept batch by
    batch (position-late: a finished run's stores); every token is listed with piece == text[start:end]."""
    attr = attribution(projector, kernel, k=1024)
    moments = estimate_moments(setup["model"], [batch_of(setup, e) for e in setup["sets"]["raw"][:2]])
    split, _, kept = split.partition("-")
    rows = run_tokens(
        setup, attr, tmp_path, moments if kernel in ("adam", "trackstar") else None, split=split, kept=kept or None
    )
    for name, records in rows.items():
        assert len(records) == 4 * 2  # each query's top tokens_top_k = 2
        for r in records:
            assert r["kernel"] == kernel and r["rank"] in (1, 2) and r["split"] == split
            for side, examples in (("doc", setup["sets"][name]), ("query", setup["sets"][QUERIES])):
                example = next(e for e in examples if e["id"] == r[f"{side}_id" if side == "doc" else "query_id"])
                encoded = setup["encoder"](example)
                tokens = r[side]["tokens"]
                assert len(tokens) == len(encoded["input_ids"])
                assert all(piece == r[side]["text"][a:b] for piece, a, b, _ in tokens)
                carries = [split == "position" or (s >= 1 and lab != IGNORE) for s, lab in enumerate(encoded["labels"])]
                assert [c is not None for *_, c in tokens] == carries
                total = sum(c for *_, c in tokens if c is not None)
                assert total == pytest.approx(r["score"], abs=1e-3), (side, r["query_id"], r["doc_id"])
    shown = top_pieces(tmp_path / "tokens")  # W&B's column says which split its numbers are
    assert shown and all(v.startswith("by position: ") == (split == "position") for v in shown.values())


def test_reverse_mode_equals_forward_mode(setup):
    """token_products (a backward pass per loss token, one at a time or 4 batched) = token_derivatives (a
    forward-mode pass per tangent) on random tangents over every parameter, for an example with loss on its second
    half and one with loss on every token, each with the padding token inside its prompt and among its loss tokens
    (SmolLM2's pad id is <|im_end|>, in every ChatML prompt); their sums over tokens = the tangents' products with
    autograd's gradient of the whole example, whose input embedding gives the padding row no gradient (the stores'
    gradient, lark.kernel.sketch_math.without_padding)."""
    from lark.kernel.projectors import example_gradient

    model, pad = setup["model"], setup["tok"].pad_token_id
    assert model.get_input_embeddings().padding_idx == pad
    params = trainable(model)
    gen = torch.Generator().manual_seed(5)
    tangents = {n: torch.randn(3, *p.shape, generator=gen) for n, p in params}
    for name in ("formatted", "raw"):
        batch = batch_of(setup, setup["sets"][name][1])
        batch["input_ids"][0, [2, -3]] = pad  # in the prompt, and a loss token (its row gets no input gradient)
        forward, reverse = token_derivatives(model, batch, tangents), token_products(model, batch, tangents)
        torch.testing.assert_close(token_products(model, batch, tangents, chunk=4), reverse)  # batched backward
        made = []  # the tangents in batches of 2 and 1, made on demand: the first once, the other per loss batch
        batches = [{n: t[:2] for n, t in tangents.items()}, {n: t[2:] for n, t in tangents.items()}]
        makers = [lambda b=b: made.append(b) or batches[b] for b in (0, 1)]
        for chunk, passes in ((1, int((batch["labels"][0, 1:] != IGNORE).sum())), (4, None)):
            made.clear()
            torch.testing.assert_close(token_products(model, batch, makers, chunk=chunk), reverse)
            assert made.count(0) == 1 and (passes is None or made.count(1) == passes), made
        assert forward.shape == reverse.shape == (3, batch["input_ids"].shape[1])
        assert (reverse[:, batch["labels"][0] == IGNORE] == 0).all()
        torch.testing.assert_close(reverse, forward, rtol=1e-4, atol=1e-6)
        _, g = example_gradient(model, batch, params)
        whole = sum((tangents[n].flatten(1) @ g[n].flatten().float()) for n, _ in params if g.get(n) is not None)
        torch.testing.assert_close(forward.sum(dim=1), whole, rtol=1e-4, atol=1e-5)


def test_position_split_equals_a_per_position_perturbation(setup):
    """The position split c_s = <u, G_s> (lark.kernel.tokens_position: one backward, each module's directional
    derivative dotted with its output's gradient) equals an independent reference: the derivative of the loss
    with respect to eps_s, where every weight's use at position s is moved by eps_s u (the output of each module
    at s shifted by eps_s module(x_s; u): these modules are linear in their own weights), by autograd through the
    whole model; with the padding token in the prompt and among the loss tokens (its input row takes no part, as
    nn.Embedding gives it no gradient) and random tangents over every parameter. Its sums over positions equal the
    tangents' products with the store's gradient (autograd's, lark.kernel.projectors.example_gradient), and the
    loss split's sums."""
    from torch.func import functional_call

    from lark.kernel.projectors import example_gradient
    from lark.kernel.tokens_math import input_embeds
    from lark.kernel.tokens_position import position_products

    model, pad = setup["model"], setup["tok"].pad_token_id
    params = dict(trainable(model))
    names = {id(p): n for n, p in params.items()}
    gen = torch.Generator().manual_seed(11)
    tangents = {n: torch.randn(3, *p.shape, generator=gen) for n, p in params.items()}
    embedding = model.get_input_embeddings()
    for name in ("formatted", "raw"):
        batch = batch_of(setup, setup["sets"][name][2])
        batch["input_ids"][0, [1, -2]] = pad
        ids, T = batch["input_ids"], batch["input_ids"].shape[1]
        keep = (batch["labels"][0, 1:] != IGNORE).nonzero().flatten()
        halves = [{n: t[:2] for n, t in tangents.items()}, {n: t[2:] for n, t in tangents.items()}]
        split = position_products(model, batch, [lambda b=b: b for b in halves])
        assert split.shape == (3, T)
        for i in range(3):
            eps = torch.zeros(T, requires_grad=True)
            shifts = {
                id(m): {k: tangents[names[id(p)]][i] for k, p in m.named_parameters(recurse=False)}
                for m in model.modules()
                if next(m.parameters(recurse=False), None) is not None and m is not embedding
            }
            inside = []

            def shift(module, args, output):
                if inside or id(module) not in shifts:
                    return None
                inside.append(module)
                moved = functional_call(module, shifts[id(module)], args)
                inside.clear()
                rows = eps if output.shape[1] == T else eps[keep]  # the output layer: the loss positions only
                return output + rows.view(1, -1, 1) * moved

            hooks = [m.register_forward_hook(shift) for m in model.modules()]
            try:
                row = tangents[names[id(embedding.weight)]][i][ids[0]] * (ids[0] != pad).unsqueeze(-1)
                embeds = input_embeds(model, params, ids) + eps.view(1, -1, 1) * row
                loss = token_losses(model, params, batch, embeds).sum()
                reference = torch.autograd.grad(loss, eps)[0]
            finally:
                for hook in hooks:
                    hook.remove()
            torch.testing.assert_close(split[i], reference, rtol=1e-4, atol=1e-6)
        assert (split[:, : T - 1] != 0).all()  # every position but the last (it predicts nothing) takes a part
        _, g = example_gradient(model, batch, list(params.items()))
        whole = sum(tangents[n].flatten(1) @ g[n].flatten() for n in params)
        torch.testing.assert_close(split.sum(dim=1), whole, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            split.sum(dim=1), token_products(model, batch, tangents).sum(dim=1), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("family", ["olmo3-tied", "gpt2", "qwen3"])
def test_position_split_sums_on_a_tied_model_and_one_with_learned_positions(family):
    """The position split's sums = <u, g> (autograd's gradient of the store's loss) on a tied OLMo-3 (SmolLM2's
    case: the output layer's weight is the input embedding's, used at both ends) with the padding token in its
    prompt, on a GPT-2 (learned position embeddings, off the path from the input embeddings, and Conv1D layers
    through the generic derivative) and on a Qwen3 (norms on each head: outputs [1, T, heads, head_dim]): the
    position embedding's part was left out before (the GPT-2 sums missed <u, g> by far) and the Qwen3 norms were
    refused, and the loss split agrees."""
    from transformers import GPT2Config, GPT2LMHeadModel, Olmo3Config, Olmo3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from lark.kernel.projectors import example_gradient
    from lark.kernel.tokens_position import position_products

    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    elif family == "qwen3":  # q_norm and k_norm on each head: outputs [1, T, heads, head_dim]
        config = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8)
        config.update({"num_attention_heads": 2, "num_key_value_heads": 2})
        model = Qwen3ForCausalLM(config)
    else:
        config = Olmo3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
        config.update(
            {"num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True, "pad_token_id": 3}
        )
        model = Olmo3ForCausalLM(config)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.eval()
    ids = torch.randint(4, 50, (1, 12))
    ids[0, 2] = 3  # (OLMo-3: the padding token, in the prompt)
    labels = ids.clone()
    labels[0, :5] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    params = trainable(model)
    gen = torch.Generator().manual_seed(4)
    tangents = {n: torch.randn(2, *p.shape, generator=gen) for n, p in params}
    split = position_products(model, batch, [lambda: tangents])
    _, g = example_gradient(model, batch, params)
    whole = sum(tangents[n].flatten(1) @ g[n].flatten() for n, _ in params)
    torch.testing.assert_close(split.sum(dim=1), whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(token_products(model, batch, tangents).sum(dim=1), whole, rtol=1e-4, atol=1e-5)


def test_a_linear_and_a_norm_layers_position_parts_equal_their_directional_derivative():
    """linear_part (delta_s^T U x_s + delta_s . u_b, no primal) and norm_part (LayerNorm with its bias, RMSNorm) =
    the module's own derivative along the tangents dotted with delta (the generic path of every other module),
    biases included: the test model's layers have none."""
    from torch.func import vmap

    from lark.kernel.tokens_position import directional, linear_part, norm_part

    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(5, 4)
    x, grad = torch.randn(1, 3, 5, generator=gen), torch.randn(1, 3, 4, generator=gen)
    local = {"weight": torch.randn(2, 4, 5, generator=gen), "bias": torch.randn(2, 4, generator=gen)}
    primal = {k: p.detach() for k, p in layer.named_parameters()}
    generic = (vmap(directional(layer, (x,), {}, primal))(local) * grad).sum(-1).flatten(1)
    torch.testing.assert_close(linear_part(x, grad, local), generic)
    torch.testing.assert_close(linear_part(x, grad, {"weight": local["weight"]}), (grad @ local["weight"] * x).sum(-1))
    # a norm layer's parts (norm_part: weight * xhat + bias, xhat at weight 1) = its derivative, weights away from 1
    for norm in (torch.nn.LayerNorm(5), torch.nn.RMSNorm(5)):
        with torch.no_grad():
            for q in norm.parameters():
                q.add_(torch.randn(q.shape, generator=gen))
        own = {k: torch.randn(2, *q.shape, generator=gen) for k, q in norm.named_parameters()}
        primal = {k: q.detach() for k, q in norm.named_parameters()}
        grad = torch.randn(1, 3, 5, generator=gen)
        generic = (vmap(directional(norm, (x,), {}, primal))(own) * grad).sum(-1).flatten(1)
        torch.testing.assert_close(norm_part(norm, (x,), {}, grad, own), generic)


def test_factored_tangents_in_their_factors_equal_the_formed_ones(setup):
    """The position split's LowRank tangents of the factored projector (every Linear weight kept as N diag(row)
    P_out^T W P_in diag(col)) equal Transpose's formed N D P^T w (rapidin's per-tensor N, adam's factored D, an
    identity side where r >= d), their parts delta_s^T U x_s through the factors equal linear_part's on the formed
    tangents, and position_products gives the same parts either way, in float32 and in bf16, with the output layer
    factored too (vocab=factored) and a Linear called with keyword arguments (its generic derivative, formed)."""
    import copy

    from lark.kernel.tokens_math import tensor_norms
    from lark.kernel.tokens_position import LowRank, linear_part, low_rank_tangents, position_products

    model, gen = setup["model"], torch.Generator().manual_seed(4)
    moments = estimate_moments(model, [batch_of(setup, e) for e in setup["sets"]["raw"][:2]])
    batch = batch_of(setup, setup["sets"]["formatted"][1])
    cases = (("rapidin", {"k": 1024}), ("adam", {"k": 1024, "vocab": "factored"}), ("cosine", {"r_in": 64, "r_out": 8}))
    for kernel, options in cases:
        attr = attribution("factored", kernel, **options)
        proj = make_projector(attr, model, make_kernel(attr), moments if kernel == "adam" else None)
        norms = tensor_norms(proj, model, batch)
        diagonal, transpose = scaling(proj, model, batch, norms), Transpose(proj, model)
        w = torch.randn(3, proj.k, generator=gen)
        formed, low = transpose(w, diagonal), low_rank_tangents(proj, transpose, w, diagonal, norms)
        factored = {n: t for n, t in low.items() if isinstance(t, LowRank)}
        assert set(low) == set(formed) and len(factored) == len(proj.linears), kernel  # (untied: every Linear)
        identity = [side is None for t in factored.values() for side in t.sides]  # r >= d: the cosine case's P_in
        assert not all(identity) and any(identity) == (kernel == "cosine"), kernel
        for n, t in factored.items():
            torch.testing.assert_close(t.full(), formed[n].float(), rtol=1e-4, atol=1e-6, msg=n)
            out, in_ = formed[n].shape[1:]
            x, grad = torch.randn(1, 6, in_, generator=gen), torch.randn(1, 6, out, generator=gen)
            expected = linear_part(x, grad, {"weight": formed[n].float()})  # float32 sums in other orders
            atol = 1e-6 * float(expected.abs().max())
            torch.testing.assert_close(linear_part(x, grad, {"weight": t}), expected, rtol=1e-5, atol=atol, msg=n)
        for dtype, rtol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):  # bf16: formed tangents are rounded
            copied = copy.deepcopy(model).to(dtype)
            proj = make_projector(attr, copied, make_kernel(attr), moments if kernel == "adam" else None)
            transpose = Transpose(proj, copied)
            parts = [position_products(copied, batch, [lambda: transpose(w, diagonal)])]
            parts.append(
                position_products(copied, batch, [lambda: low_rank_tangents(proj, transpose, w, diagonal, norms)])
            )
            q_proj = copied.model.layers[0].self_attn.q_proj  # called with input= from now on: the generic path
            q_proj.register_forward_pre_hook(lambda m, a, k: ((), {"input": a[0]}) if a else None, with_kwargs=True)
            parts.append(
                position_products(copied, batch, [lambda: low_rank_tangents(proj, transpose, w, diagonal, norms)])
            )
            for other in parts[1:]:
                atol = rtol * float(parts[0].abs().max())
                torch.testing.assert_close(other, parts[0], rtol=rtol, atol=atol, msg=f"{kernel} {dtype}")


def test_pieces_cover_the_decoded_text(setup):
    """Every token's piece in order covers the text; the one-call path (tokens decoded one by one add up to the
    text) gives the spans of the prefix decodings; a character split over byte tokens goes to the token that
    completes it, the others getting an empty piece."""
    tok = setup["tok"]
    ids = setup["encoder"](setup["sets"]["raw"][0])["input_ids"]
    text, spans = pieces(tok, ids)
    assert "".join(text[a:b] for a, b in spans) == text and spans[-1][1] == len(text)
    prefixes = [len(tok.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]
    assert [b for _, b in spans] == prefixes
    ids = tok("Gene \U0001f9ec café")["input_ids"]  # the emoji and the é are byte tokens here
    text, spans = pieces(tok, ids)
    assert text == "Gene \U0001f9ec café" and "".join(text[a:b] for a, b in spans) == text
    split = [text[a:b] for a, b in spans]
    assert "\U0001f9ec" in split and "é" in split and "" in split
    # a cut through a character (truncate_middle may cut between byte tokens): the text holds U+FFFD, and the
    # tokens after it keep their pieces
    ids = tok("Gene \U0001f9ec café and more words")["input_ids"]
    first = next(i for i, t in enumerate(ids) if "\ufffd" in tok.decode([t]))
    cut = ids[:first] + ids[first + 1 :]
    text, spans = pieces(tok, cut)
    assert "\ufffd" in text and "".join(text[a:b] for a, b in spans) == text
    assert text[spans[-1][0] : spans[-1][1]] == tok.decode(cut[-1:]) and text.endswith(" words")


def test_a_character_split_over_byte_tokens_shows_as_one_piece(setup, tmp_path):
    """Documents with emoji and accents (byte tokens here): the file gives the tokens before a character's last an
    empty piece with their own contribution, summing to the score; W&B's top pieces and the report's page tokens
    show the character once with its tokens' contributions added (no '' piece), a text's sum unchanged."""
    from lark.analysis.report_data import token_entry

    tok, model = setup["tok"], setup["model"]
    raw = [e["text"].replace(" ", " \U0001f9ec caf\u00e9 ", 3) for e in setup["sets"]["raw"]]
    sets = {**setup["sets"], "raw": [{"id": f"r{i}", "text": t} for i, t in enumerate(raw)]}
    encoded = {e["text"]: encode_text(tok, e["text"], 40) for examples in sets.values() for e in examples}
    emoji = {"tok": tok, "model": model, "sets": sets, "encoder": lambda e: encoded[e["text"]]}
    rows = run_tokens(emoji, attribution("sketch", "cosine", k=256), tmp_path)
    shown = top_pieces(tmp_path / "tokens", n=40)
    empty = 0
    for r in rows["raw"]:
        tokens = r["doc"]["tokens"]
        empty += sum(piece == "" and c is not None for piece, *_, c in tokens)
        assert "''" not in shown[(r["query_id"], "raw", r["doc_id"])]
        assert "\U0001f9ec" in shown[(r["query_id"], "raw", r["doc_id"])]
        _, _, top = token_entry(r["doc"], {}, "here")
        assert sum(c for *_, c in tokens if c is not None) == pytest.approx(r["score"], abs=1e-3)
        assert len(top) // 2 == min(10, sum(c is not None for *_, c in by_character(tokens)))
        assert all(piece for piece, *_, c in by_character(tokens) if c is not None)
        merged = sum(c for *_, c in by_character(tokens) if c is not None)
        assert merged == pytest.approx(sum(c for *_, c in tokens if c is not None), abs=1e-9)
    assert empty > 0  # the file keeps each byte token's own value


def prefix_pieces(tok, ids):
    """The reference spans: piece i ends where the decoding of the first i + 1 tokens agrees with the text."""
    text, ends = tok.decode(ids, skip_special_tokens=False), [0]
    for i in range(len(ids)):
        prefix = tok.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ends.append(max(ends[-1], len(os.path.commonprefix([prefix, text])) if i + 1 < len(ids) else len(text)))
    return text, list(zip(ends[:-1], ends[1:]))


def test_pieces_of_split_characters_decode_a_linear_number_of_tokens(setup):
    """A text holding characters split over byte tokens (an emoji, accents, a cut through one) gets the spans of
    the prefix decodings, decoding O(T) tokens in all, not every prefix (O(T^2): 0.95 s against 0.009 s at 2,048
    tokens)."""
    tok = setup["tok"]
    decoded = []

    class Counting:  # the tokenizer, counting the tokens it decodes
        def decode(self, ids, **options):
            decoded.append(len(ids))
            return tok.decode(ids, **options)

        def batch_decode(self, rows, **options):
            decoded.extend(map(len, rows))
            return tok.batch_decode(rows, **options)

    words = " ".join(setup["sets"]["raw"][1]["text"].split()[:60])
    for text in ("naïve café \U0001f9ec\U0001f9ec " + words, words + " déjà vu \U0001f9ec", "é" * 9 + words):
        ids = tok(text)["input_ids"]
        for cut in (ids, ids[:3] + ids[4:]):  # whole, and a cut through the first split character
            decoded.clear()
            assert pieces(Counting(), cut) == prefix_pieces(tok, cut)
            assert sum(decoded) <= 4 * len(cut) + 16, (sum(decoded), len(cut))


def test_top_pieces_and_config_checks(setup, tmp_path):
    rows = run_tokens(setup, attribution("sketch", "cosine", k=256), tmp_path)
    shown = top_pieces(tmp_path / "tokens", n=3)
    r = rows["raw"][0]
    assert (r["query_id"], "raw", r["doc_id"]) in shown and shown[(r["query_id"], "raw", r["doc_id"])].count("(") == 3
    for r in rows["raw"]:  # the 3 of largest |contribution|, largest first, with their values
        largest = sorted((c for *_, c in by_character(r["doc"]["tokens"]) if c is not None), key=abs, reverse=True)
        listed = re.findall(r" \(([+-][0-9.e+-]+)\)(?:, |$)", shown[(r["query_id"], "raw", r["doc_id"])])
        assert [float(v) for v in listed] == pytest.approx(largest[:3], rel=5e-3)  # printed with 3 significant digits
    # W&B's column lists as many pieces as the report does under the shaded text (it listed 5, the report 10)
    from lark.analysis.report_data import token_entry

    default = top_pieces(tmp_path / "tokens")
    for r in rows["raw"]:
        _, _, top = token_entry(r["doc"], {}, "here")
        assert len(re.findall(r" \([+-]\d", default[(r["query_id"], "raw", r["doc_id"])])) == len(top) // 2 == 10
    from lark.errors import ConfigError

    base = {"top_k": 5, "store_dtype": "float16"}
    assert check(OmegaConf.create({**base, "tokens": "off"})) is False
    assert check(OmegaConf.create({**base, "tokens": "topk", "tokens_top_k": 3})) is True
    # a run saved before the tokens keys existed: tokens_top_k (as tokens_pass and tokens_budget) has its default
    assert check(OmegaConf.create({**base, "tokens": "topk"})) is True
    assert top_k_of(OmegaConf.create(base)) == OmegaConf.load(CONF / "default.yaml").tokens_top_k == TOKENS_TOP_K
    assert missing(tmp_path, OmegaConf.create({**base, "tokens": "topk"}), ["raw"]) is True  # 2 pairs a query, not 3
    asked = {**base, "tokens": "topk", "tokens_top_k": 2}
    assert missing(tmp_path, OmegaConf.create(asked), ["formatted", "raw"]) is False  # the pairs asked, split by loss
    assert missing(tmp_path, OmegaConf.create({**asked, "tokens_split": "position"}), ["raw"]) is True  # another split
    for path in (tmp_path / "tokens").glob("*.jsonl"):  # files written before the split was recorded: the loss split
        records = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in records))
    assert missing(tmp_path, OmegaConf.create(asked), ["formatted", "raw"]) is False
    assert missing(tmp_path, OmegaConf.create({**asked, "tokens_split": "position"}), ["raw"]) is True
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "top_influences.csv").write_text("query_id,source,rank,doc_id,score\nq1,raw,1,d1,0.5\nq2,raw,1\n")
    from lark.errors import CorruptFile

    with pytest.raises(CorruptFile, match=r"torn/top_influences.csv:3: expected the columns"):  # not a bare TypeError
        missing(torn, OmegaConf.create({**base, "tokens": "topk"}), ["raw"])
    for bad, key in (
        ({"tokens": "all"}, "attribution.tokens"),
        ({"tokens": "topk", "tokens_top_k": 9}, "tokens_top_k"),
        ({"tokens": "topk", "tokens_top_k": True}, "tokens_top_k"),  # YAML's yes/true is not 1
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_pass": "both"}, "attribution.tokens_pass"),
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_split": "word"}, "attribution.tokens_split"),
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_budget": 0}, "attribution.tokens_budget"),
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_budget": "2^26"}, "attribution.tokens_budget"),
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_kept": -1}, "attribution.tokens_kept"),  # (0: none kept)
        ({"tokens": "topk", "tokens_top_k": 3, "tokens_kept": 1.5e8}, "attribution.tokens_kept"),
    ):
        with pytest.raises(ConfigError, match=key):
            check(OmegaConf.create({**base, **bad}))
    assert not math.isnan(r["score"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The small embedded run (1 epoch: checkpoints 0 and 1; each query's top document) made twice by `train.py`:
    tokens=topk and tokens=off."""
    import subprocess
    import sys

    from conftest import SMALL

    root = tmp_path_factory.mktemp("token_runs")
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")]
    overrides += ["trainer.max_epochs=1", "logger=none", "attribution.tokens_top_k=1"]
    out = {}
    for mode in ("topk", "off"):
        out[mode] = root / mode
        args = [*overrides, f"attribution.tokens={mode}", f"hydra.run.dir={out[mode]}"]
        done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def read_tokens(folder):
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(folder.glob("*.jsonl"))}


@pytest.mark.slow
def test_train_writes_tokens_and_attribute_adds_them_without_recomputing_stores(runs):
    """(c) train.py writes tokens/<source>.jsonl for every source at every epoch, its pairs = each query's top
    tokens_top_k (1) of top_influences.csv, doc and query contributions summing to the csv's scores; (d) attribute.py
    with attribution.tokens=topk on the tokens=off run adds the same files, its stores untouched."""
    import csv

    from conftest import compose

    from lark.experiment import attribute

    sources = list(compose().source.sources)
    for epoch in ("epoch_000", "epoch_001"):
        folder = runs["topk"] / "attribution" / epoch
        written = read_tokens(folder / "tokens")
        assert sorted(written) == sorted(sources)
        top = list(csv.DictReader((folder / "top_influences.csv").open()))
        for source, records in written.items():
            expected = [
                (r["query_id"], r["doc_id"], int(r["rank"]), float(r["score"]))
                for r in top
                if r["source"] == source and int(r["rank"]) <= 1
            ]
            assert [(r["query_id"], r["doc_id"], r["rank"], r["score"]) for r in records] == expected
            for r in records:
                for side in ("doc", "query"):
                    assert sum(t[3] for t in r[side]["tokens"] if t[3] is not None) == pytest.approx(
                        r["score"], abs=1e-3
                    )
        assert not (runs["off"] / "attribution" / epoch / "tokens").exists()
    stores = sorted((runs["off"] / "attribution").glob("epoch_*/stores/*.safetensors"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stores}
    attribute(runs["off"], {"tokens": "topk"})  # tokens_top_k=1 from the run's saved config
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stores} == before
    for epoch in ("epoch_000", "epoch_001"):
        added = read_tokens(runs["off"] / "attribution" / epoch / "tokens")
        reference = read_tokens(runs["topk"] / "attribution" / epoch / "tokens")
        assert sorted(added) == sorted(reference)
        for source in added:
            for a, b in zip(added[source], reference[source], strict=True):
                assert {k: v for k, v in a.items() if k not in ("doc", "query")} == {
                    k: v for k, v in b.items() if k not in ("doc", "query")
                }
                for side in ("doc", "query"):
                    assert a[side]["text"] == b[side]["text"]
                    assert [t[:3] for t in a[side]["tokens"]] == [t[:3] for t in b[side]["tokens"]]
                    for x, y in zip(a[side]["tokens"], b[side]["tokens"]):
                        assert (x[3] is None) == (y[3] is None) and (
                            x[3] is None or x[3] == pytest.approx(y[3], abs=1e-6)
                        )
    # (e) another tokens_top_k on the finished epoch writes the pairs it asks (stores reused); an epoch attributed
    # again without tokens keeps no token files of the earlier scores
    folder = runs["off"] / "attribution" / "epoch_001"
    attribute(runs["off"], {"tokens": "topk", "tokens_top_k": 2, "checkpoints": [1]})
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stores} == before
    top = list(csv.DictReader((folder / "top_influences.csv").open()))
    for source, records in read_tokens(folder / "tokens").items():
        expected = [(r["query_id"], r["doc_id"]) for r in top if r["source"] == source and int(r["rank"]) <= 2]
        assert [(r["query_id"], r["doc_id"]) for r in records] == expected and {r["rank"] for r in records} == {1, 2}
    attribute(runs["off"], {"tokens": "off", "checkpoints": [1]}, resume=False)
    assert not (folder / "tokens").exists() and (folder / "metrics.json").is_file()


class OwnProjector:
    """A user's projector that lark.kernel.tokens_math.Transpose does not know."""


class OwnSketch(HookSketch):
    """A user's projector built on one Transpose knows."""


class ScaledKernel(Cosine):
    """A user's kernel mapping the vectors without saying so (whitens False, no linear_map)."""

    def transform(self, vectors, query_set):
        return {name: 2 * v for name, v in vectors.items()}


def test_tokens_refuse_at_start_a_projector_without_transpose_and_a_silent_transform():
    """With tokens=topk, a projector Transpose does not know failed with a TypeError only after every store and
    score was built, and a kernel whose transform() is not the identity without `whitens` gave token sums that are
    not its scores: both are ConfigErrors at start, naming the key; known projectors (a class, a classmethod, a
    subclass) and the built-in kernels pass, and with tokens off nothing is asked of them."""
    from lark.config_checks import check_targets
    from lark.errors import ConfigError

    def attr(projector=None, kernel=None, tokens="topk", name="sketch", kernel_name="cosine"):
        node = attribution(name, kernel_name)
        node.tokens, node.tokens_top_k = tokens, 2
        if projector:
            node.projector = {"_target_": projector}
        if kernel:
            node.kernel = {"_target_": kernel}
        return node

    with pytest.raises(ConfigError, match=r"attribution\.projector\._target_ test_tokens\.OwnProjector has no"):
        check_targets(attr(projector="test_tokens.OwnProjector"))
    with pytest.raises(ConfigError, match=r"attribution\.kernel\._target_ test_tokens\.ScaledKernel overrides"):
        check_targets(attr(kernel="test_tokens.ScaledKernel"))
    check_targets(attr(projector="test_tokens.OwnProjector", tokens="off"))
    check_targets(attr(kernel="test_tokens.ScaledKernel", tokens="off"))
    check_targets(attr(projector="test_tokens.OwnSketch"))
    for name in ("sketch", "factored", "rapidin", "gaussian", "exact"):
        for kernel_name in ("cosine", "rapidin", "adam", "trackstar", "tracin_cp"):
            check_targets(attr(name=name, kernel_name=kernel_name))


def test_tokens_added_to_a_complete_epoch_touch_nothing_else_and_survive_a_kill(setup, tmp_path, monkeypatch):
    """tokens=topk asked of an epoch complete without those tokens (metrics.json matches: here `reusable` says
    so) makes only the token files, from the stores and top_influences.csv: it re-ran the whole epoch, deleting
    metrics.json and the old tokens/ first, so that a kill during the token pass left an epoch analyze refuses.
    A kill mid-pass (a raise from the pass) leaves metrics.json, the stores, the csv and the old token files as
    they were; the rerun writes each query's top tokens_top_k = 3 pairs, their sums the csv's scores."""
    import lark.checkpoint as C
    import lark.kernel.tokens as tokens
    import lark.reuse

    out = tmp_path / "attribution" / "epoch_001"
    root = OmegaConf.create({"max_length": 128, "attribution": attribution("sketch", "cosine", k=256), "format": {}})
    run_tokens(setup, root.attribution, out)  # stores, top_influences.csv, tokens/ with tokens_top_k = 2
    (out / "metrics.json").write_text('{"epoch": 1}')
    root.attribution.update(enabled=True, checkpoints="all", save_checkpoints=False, tokens="topk", tokens_top_k=3)
    done = {"sources": {}, "format_effect": {}, "bm25": {"ft_wins": None}, "eval": {"metric": "m", "value": 0.5}}
    done.update(dict.fromkeys(("ft", "pt", "ft_pt_ratio", "ft_wins", "pt_wins")))
    monkeypatch.setattr(C, "reusable", lambda ck, *args: done if ck.out_dir == out else None)
    monkeypatch.setattr(C, "epoch_fingerprint", lambda *args: "same")
    monkeypatch.setattr(lark.reuse, "query_examples", lambda items, fmt, answers: setup["sets"][QUERIES])
    ck = C.Checkpoint(root, setup["model"], setup["tok"], tmp_path, 1, encoder=setup["encoder"], reuse=True)
    ck.__dict__["prints"] = {"checkpoint": "c"}  # (the cached fingerprints)
    sources = {name: setup["sets"][name] for name in ("formatted", "raw")}

    def files():
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}

    before, real, calls = files(), tokens.Pass.contributions, []

    def killed(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed mid-pass")
        return real(self, *args)

    monkeypatch.setattr(tokens.Pass, "contributions", killed)
    with pytest.raises(KeyboardInterrupt):
        C.evaluate_checkpoint(ck, [None] * 4, sources)
    assert {p: v for p, v in files().items() if "tokens.tmp" not in p.parts} == before  # nothing lost
    monkeypatch.setattr(tokens.Pass, "contributions", real)
    logs, _ = C.evaluate_checkpoint(ck, [None] * 4, sources)
    assert logs["test/m"] == 0.5 and not (out / "tokens.tmp").exists()
    after = files()
    assert {p: v for p, v in after.items() if "tokens" not in p.parts} == {
        p: v for p, v in before.items() if "tokens" not in p.parts
    }  # metrics.json, the stores and the csv untouched
    written = read_tokens(out / "tokens")
    assert {r["rank"] for records in written.values() for r in records} == {1, 2, 3}
    for records in written.values():
        assert len(records) == 4 * 3
        for r in records:
            for side in ("doc", "query"):
                assert sum(c for *_, c in r[side]["tokens"] if c is not None) == pytest.approx(r["score"], abs=1e-3)
    calls.clear()
    C.evaluate_checkpoint(ck, [None] * 4, sources)  # complete now: nothing written again
    assert files() == after


@pytest.mark.parametrize(
    "model_kind, kernel, options",
    [
        ("untied", "rapidin", {"k": 1024}),  # per-tensor N; Linear weights factored, the embedding TensorSketched
        ("untied", "adam", {"k": 1024, "vocab": "factored"}),  # Adam's D; the embedding and output layer factored
        ("untied", "cosine", {"k": 1024, "vocab": "tensorsketch"}),  # the output layer TensorSketched by position
        ("untied", "cosine", {"r_in": 64, "r_out": 8}),  # an identity side (r >= d)
        ("tied", "rapidin", {"k": 1024}),  # SmolLM2's case: the output layer's part in the embedding's slot
        ("qwen3", "adam", {"k": 1024}),  # Linear biases, norms on each head ([B, T, heads, head_dim])
        ("qwen3", "rapidin", {"r_in": 2, "r_out": 2}),  # 1-D slots count-sketched (n > r_out r_in)
    ],
)
def test_store_pass_pieces_equal_the_second_pass(setup, model_kind, kernel, options):
    """The position parts read from the pieces a store pass kept (lark.kernel.tokens_kept, two examples of
    different lengths in one padded batch) equal the second pass's (position_products on the formed tangents
    N D P^T w, one example at a time) for random rows w, and sum over positions to <w, r> (r the store's raw
    vector): the factored blocks, TensorSketched vocabulary matrices (a tied weight's two parts in one slot), 1-D
    slots (exact or count-sketched, per-head norms, biases) and per-tensor norms all split by position."""
    from transformers import Olmo3Config, Olmo3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from lark.kernel.build import project_examples
    from lark.kernel.tokens_kept import Kept
    from lark.kernel.tokens_math import tensor_norms
    from lark.kernel.tokens_position import position_products

    model, pad = setup["model"], setup["tok"].pad_token_id
    encoded = [setup["encoder"](setup["sets"]["formatted"][1]), setup["encoder"](setup["sets"]["raw"][3])]
    others = [setup["encoder"](e) for e in setup["sets"]["raw"][:2]]  # the Adam moments' examples
    if model_kind != "untied":
        torch.manual_seed(0)
        if model_kind == "tied":
            config = Olmo3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2)
            config.update({"num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True})
            model = Olmo3ForCausalLM(config)
        else:
            config = Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8)
            config.update({"num_attention_heads": 2, "num_key_value_heads": 2, "attention_bias": True})
            model = Qwen3ForCausalLM(config)
            with torch.no_grad():  # (norm weights away from 1, biases away from 0)
                for n, p in model.named_parameters():
                    if p.dim() == 1:
                        p.uniform_(0.5, 1.5)
        model, pad = model.eval(), 0
        texts = ([5, 9, 7, 11, 30, 8], [6, 14, 22, 9, 41, 17, 3, 28, 12], [8, 2, 33, 19, 7, 45, 21], [40, 13, 4, 26, 9])
        texts = [{"input_ids": ids, "labels": [IGNORE] * 4 + ids[4:]} for ids in texts]
        encoded, others = texts[:2], texts[2:]
    attr = attribution("factored", kernel, **options)
    moments = estimate_moments(model, [collate([e], pad) for e in others]) if kernel == "adam" else None
    proj = make_projector(attr, model, make_kernel(attr), moments)
    kept = Kept(proj, top_k=1, budget=2**28)
    raw = project_examples(model, encoded, proj, pad, batch_size=2, keep=kept.start("s"))
    kept.stop()
    assert sorted(kept.examples) == [("s", 0), ("s", 1)] and len({len(e["input_ids"]) for e in encoded}) == 2
    w = torch.randn(3, proj.k, generator=torch.Generator().manual_seed(6))
    transpose = Transpose(proj, model)
    kinds = {}  # w's columns by slot kind (a factored matrix, a TensorSketched one, a 1-D parameter): each checked
    for name, (start, size, _) in kept.spans.items():  # on its own, so a small kind (adam's norms) is not hidden
        how = proj.slots[name][1]
        kind = "matrix" if isinstance(how, tuple) else "vector" if how is None else how  # (or tensorsketch)
        kinds.setdefault(kind, torch.zeros(proj.k, dtype=torch.bool))[start : start + size] = True
    for i, example in enumerate(encoded):
        batch = collate([example], pad)
        diagonal = scaling(proj, model, batch, tensor_norms(proj, model, batch))
        for kind, columns in {"all": torch.ones(proj.k, dtype=torch.bool), **kinds}.items():
            rows = w * columns
            second = position_products(model, batch, [lambda: transpose(rows, diagonal)])
            parts = kept.parts("s", i, rows)
            assert parts.shape == second.shape == (3, len(example["input_ids"]))
            atol = 1e-5 * float(second.abs().max())  # the kept parts add up to the stored vector itself:
            torch.testing.assert_close(parts.sum(1), rows @ raw[i], rtol=1e-4, atol=atol, msg=kind)
            # the second pass recomputes the gradient and its norms (autograd, one example) where the store pass
            # took them from its hooks (the Gram identity, a padded batch): float32 apart, 1e-4 of the parts on
            # Qwen3's small attention gradients under per-tensor norms; a missing or misplaced piece is off by O(1)
            atol = 3e-4 * float(second.abs().max())
            message = f"{model_kind} {kernel} {options} {kind}"
            torch.testing.assert_close(parts, second, rtol=1e-3, atol=atol, msg=message)


def test_in_batches_keeps_a_batch_at_a_time_within_the_budget(setup):
    """lark.kernel.tokens_kept.in_batches (the pairs' examples the store pass did not keep, as for a finished run's
    stores): the store pass's examples come first, one it kept outside the pairs is let go, and the rest are kept
    batch by batch, one projection each, their parts those of the store pass's pieces; every example is let go as
    the token pass reads it (nothing held after, keep_positions off), the budget is never passed; under a budget
    that holds no example one keeping projection runs and the rest go to the second pass as one batch."""
    from unittest import mock

    from lark.kernel import tokens_kept
    from lark.kernel.build import project_examples
    from lark.kernel.tokens_kept import Kept, in_batches

    model, pad = setup["model"], setup["tok"].pad_token_id
    encoded = [setup["encoder"](e) for e in setup["sets"]["raw"][:5]]
    attr = attribution("factored", "rapidin")
    proj = make_projector(attr, model, make_kernel(attr))
    store = Kept(proj, top_k=1, budget=2**28)
    project_examples(model, encoded, proj, pad, batch_size=5, keep=store.start("s"))
    store.stop()
    w = torch.randn(2, proj.k, generator=torch.Generator().manual_seed(3))
    reference = {i: store.parts("s", i, w) for i in range(5)}
    smallest = min(store.sizes.values())
    store.release(("s", 1)), store.release(("s", 3))  # kept by the store pass: 0, 2 (in the pairs) and 4 (not)
    jobs = [("s", i, None) for i in range(4)]
    for kept, want in ((store, [[0, 2], [1, 3]]), (Kept(proj, 1, smallest), None), (Kept(proj, 1, 1), [[0, 1, 2, 3]])):
        spy = mock.Mock(wraps=tokens_kept.keep_batch)
        taken, read = [], 0
        with mock.patch.object(tokens_kept, "keep_batch", spy):
            for batch in in_batches(kept, jobs, lambda name, i: encoded[i], model, pad, 2):
                taken.append(sorted(i for _, i, _ in batch))
                assert ("s", 4) not in kept.examples and kept.held() <= kept.budget
                for name, i, _ in batch:
                    if (name, i) in kept.examples:
                        torch.testing.assert_close(kept.parts(name, i, w), reference[i], rtol=1e-4, atol=1e-6)
                        read += 1
                    kept.release((name, i))  # (as Pass.contributions does)
        assert not kept.examples and proj.keep_positions is False and proj.last_positions is None
        if want is not None:
            assert taken == want and read == (4 if kept is store else 0) and spy.call_count == 1
        else:  # room for the smallest example alone: some kept (one at a time), the others left to the second pass
            assert 1 <= read < 4 and sorted(sum(taken, [])) == [0, 1, 2, 3] and 1 <= spy.call_count <= 2


def test_contributions_are_written_as_their_float32_exactly():
    """tokens.number (the token files' contributions): JSON that reads back as the float32 it wrote, for values
    across float32's range and signs; json's NaN / Infinity where not finite."""
    from lark.kernel.tokens import number

    values = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 2000)
    values = torch.cat([values, torch.tensor([0.0, -0.0, 1.0, 3.4028235e38, 1.4e-45])])
    back = torch.tensor([json.loads(number(v)) for v in values.tolist()], dtype=torch.float64).float()
    assert torch.equal(back, values) and all(len(number(v)) <= 15 for v in values.tolist())
    assert [json.dumps(json.loads(number(v))) for v in (float("nan"), float("inf"), -float("inf"))] == [
        "NaN",
        "Infinity",
        "-Infinity",
    ]
