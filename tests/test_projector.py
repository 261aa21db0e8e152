"""lark.kernel.projectors (+ lark.kernel.sketch): CountSketch / Gaussian / exact / hook-sketch projections of
per-example
gradients, and lark.kernel.build.project_examples."""

import hashlib
import random

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from lark.data.datamodule import collate
from lark.data.formats import document_fields, encode, qa_fields
from lark.data.world import generate_world
from lark.kernel.build import project_examples
from lark.kernel.factory import make_projector
from lark.kernel.fidelity import jl_pearson
from lark.kernel.hashing import mix32, name_key
from lark.kernel.normalizers import NoNorm, PerTensor, normalizer
from lark.kernel.projectors import CountSketch, ExactProjector, GaussianProjector, example_gradient, trainable
from lark.kernel.sketch import HookSketch
from lark.models import build_tiny, train_tokenizer

CHAT = OmegaConf.create(
    {
        "name": "chatml",
        "layout": {"_target_": "lark.data.formats.Chat"},
        "system_prompt": "Answer with yes, no, or maybe.",
        "user_template": "Context: {context}\nQuestion: {question}",
        "answer_template": "{final_decision}",
    }
)
TINY = OmegaConf.create(
    {
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
    }
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and thread spinning on a busy 2-core box costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(one_thread):
    world = generate_world(seed=0, n_train=40, n_test=20, n_facts=30, n_medical_docs=100, n_entertainment_docs=100)
    texts = [d["text"] for d in world.medical_docs + world.entertainment_docs]
    texts += [" ".join(x["contexts"]) + " " + x["question"] for x in world.train]
    tok = train_tokenizer(texts, 600)
    torch.manual_seed(0)
    model = build_tiny(TINY, tok)
    with torch.no_grad():  # norm weights away from their initial 1, as in a trained model
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    examples = (
        [qa_fields(x, "{final_decision}") for x in world.test[:8]]
        + [document_fields(d) for d in world.medical_docs[:4]]
        + [{"id": d["id"], "text": d["text"]} for d in world.medical_docs[4:8] + world.entertainment_docs[:4]]
    )
    encoded = [encode(tok, e, CHAT, 256) for e in examples]
    params = trainable(model)
    model.eval()
    grads = [example_gradient(model, collate([e], tok.pad_token_id), params)[1] for e in encoded]
    shapes = {n: tuple(p.shape) for n, p in params}
    return {"tok": tok, "model": model, "encoded": encoded, "grads": grads, "shapes": shapes}


def make(setup, **over):
    """make_projector on the tiny model with the shipped attribution.projector config and overrides."""
    return make_projector(projector_cfg(**over), setup["model"])


def rand_grads(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in shapes.items()}


def pair_cosines(vectors):
    v = torch.stack(vectors).double()
    u = v / v.norm(dim=1, keepdim=True)
    i, j = torch.triu_indices(len(v), len(v), 1)
    return (u @ u.T)[i, j]


SMALL = {"layer.a": (30, 20), "layer.b": (50,), "layer.c": (7, 3, 2)}


# ----------------------------------------------------------------------------- CountSketch: the hash
def fmix32(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reference_sketch(grads, k, seed):
    """The documented construction in plain Python integers: out[h(i)] += s(i) * g[i]."""
    out = [0.0] * k
    for name, g in grads.items():
        kb = int.from_bytes(hashlib.blake2b(f"{seed}|{name}|bucket".encode(), digest_size=4).digest(), "little")
        ks = int.from_bytes(hashlib.blake2b(f"{seed}|{name}|sign".encode(), digest_size=4).digest(), "little")
        for i, x in enumerate(g.reshape(-1).tolist()):
            bucket = fmix32((i * 0x9E3779B1 + kb) & 0xFFFFFFFF) % k
            sign = 1.0 if fmix32((i * 0x9E3779B1 + ks) & 0xFFFFFFFF) & 1 else -1.0
            out[bucket] += sign * x
    return torch.tensor(out)


def test_countsketch_matches_the_documented_hash():
    grads = rand_grads(SMALL, 1)
    for k, seed in [(16, 0), (37, 5)]:
        got = CountSketch(SMALL, k, seed).project(grads)
        assert got.dtype == torch.float32 and got.shape == (k,)
        torch.testing.assert_close(got, reference_sketch(grads, k, seed), rtol=1e-5, atol=1e-5)


def test_mix32_has_no_int64_overflow_error_near_2_to_32():
    rng = random.Random(0)
    values = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(500)]
    assert mix32(torch.tensor(values, dtype=torch.int64)).tolist() == [fmix32(v) for v in values]


def test_countsketch_large_indices_match_the_reference():
    # coordinates far into a big tensor (7B-model embeddings have ~4e8 entries) hash like the reference
    n = 3_000_000
    g = torch.zeros(n)
    idx = [0, 1, 2_999_999, 2_500_001]
    g[idx] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = torch.zeros(97)
    kb, ks = name_key(3, "emb", "bucket"), name_key(3, "emb", "sign")
    for i, x in zip(idx, [1.0, 2.0, 3.0, 4.0]):
        s = 1.0 if fmix32((i * 0x9E3779B1 + ks) & 0xFFFFFFFF) & 1 else -1.0
        ref[fmix32((i * 0x9E3779B1 + kb) & 0xFFFFFFFF) % 97] += s * x
    torch.testing.assert_close(CountSketch({"emb": (n,)}, 97, 3).project({"emb": g}), ref)


def test_countsketch_same_seed_same_vector_other_seed_differs(setup):
    g = setup["grads"][0]
    a = CountSketch(setup["shapes"], 1024, seed=7).project(g)
    b = CountSketch(setup["shapes"], 1024, seed=7).project(g)
    c = CountSketch(setup["shapes"], 1024, seed=8).project(g)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.norm() > 0
    assert CountSketch(setup["shapes"], 1024, seed=7).spec() == {
        "kind": "rapidin",
        "k": 1024,
        "seed": 7,
        "normalize": "none",
        "hash": "murmur3-fmix32",
    }


def test_countsketch_cache_does_not_change_values(setup):
    g = setup["grads"][3]
    cached = CountSketch(setup["shapes"], 512, seed=1)
    uncached = CountSketch(setup["shapes"], 512, seed=1, cache_elements=0)
    assert cached.cache_ok and not uncached.cache_ok
    first = cached.project(g)
    assert torch.equal(first, cached.project(g)) and torch.equal(first, uncached.project(g))
    assert set(cached.cache) == set(setup["shapes"]) and uncached.cache == {}


# ----------------------------------------------------------------------------- independence, linearity
@pytest.mark.parametrize(
    "make",
    [lambda s: CountSketch(s, 64, seed=2), lambda s: GaussianProjector(s, 64, seed=2)],
    ids=["countsketch", "gaussian"],
)
def test_adding_a_parameter_does_not_move_the_others(make):
    grads = rand_grads(SMALL, 3)
    two = {n: SMALL[n] for n in ["layer.a", "layer.b"]}
    sub = {n: grads[n] for n in two}
    p_two, p_all = make(two), make(SMALL)
    torch.testing.assert_close(p_two.project(sub), p_all.project(sub))
    # each parameter contributes on its own: the projection of all is the sum of the parts
    parts = sum(p_all.project({n: g}) for n, g in grads.items())
    torch.testing.assert_close(p_all.project(grads), parts, rtol=1e-5, atol=1e-5)
    # and the order of the parameters does not matter
    torch.testing.assert_close(
        p_all.project(dict(reversed(list(grads.items())))), p_all.project(grads), rtol=1e-5, atol=1e-5
    )


def test_countsketch_parameter_independence_on_model_gradients(setup):
    shapes, g = setup["shapes"], setup["grads"][1]
    names = list(shapes)
    without_head = {n: shapes[n] for n in names if n != "lm_head.weight"}
    sub = {n: g[n] for n in without_head}
    torch.testing.assert_close(CountSketch(without_head, 256, 0).project(sub), CountSketch(shapes, 256, 0).project(sub))


def test_countsketch_is_linear():
    p = CountSketch(SMALL, 50, seed=4)
    g1, g2 = rand_grads(SMALL, 5), rand_grads(SMALL, 6)
    mixed = {n: 2.0 * g1[n] - 3.0 * g2[n] for n in SMALL}
    torch.testing.assert_close(p.project(mixed), 2.0 * p.project(g1) - 3.0 * p.project(g2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p.project({n: torch.zeros(s) for n, s in SMALL.items()}), torch.zeros(50))


def test_countsketch_inner_products_are_unbiased_over_seeds():
    shapes = {"w1": (40, 25), "w2": (1000,)}
    x = {n: g + 0.5 for n, g in rand_grads(shapes, 10).items()}  # not centred: without signs, collisions add bias
    noise = rand_grads(shapes, 11)
    y = {n: 0.6 * x[n] + 0.8 * noise[n] for n in shapes}
    z = {
        n: noise[n] - (sum((noise[m] * x[m]).sum() for m in shapes) / sum((x[m] ** 2).sum() for m in shapes)) * x[n]
        for n in shapes
    }  # orthogonal to x
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in shapes]).double()  # noqa: E731
    xy, xx, xz = flat(x) @ flat(y), flat(x) @ flat(x), flat(x) @ flat(z)
    assert abs(xz) < 1e-6 * xx
    sx, sy, sz = [], [], []
    for seed in range(300):
        p = CountSketch(shapes, 64, seed=seed)
        sx.append(p.project(x).double()), sy.append(p.project(y).double()), sz.append(p.project(z).double())
    sxy = torch.tensor([(a @ b).item() for a, b in zip(sx, sy)])
    sxx = torch.tensor([(a @ a).item() for a in sx])
    sxz = torch.tensor([(a @ b).item() for a, b in zip(sx, sz)])
    scale = (flat(x).norm() * flat(y).norm()).item()
    assert abs(sxy.mean().item() - xy.item()) < 0.05 * scale
    assert abs(sxx.mean().item() - xx.item()) < 0.05 * xx.item()
    assert abs(sxz.mean().item()) < 0.05 * (flat(x).norm() * flat(z).norm()).item()
    assert sxy.std().item() > 0  # the seeds do give different sketches


# ----------------------------------------------------------------------------- fidelity on real gradients
@pytest.fixture(scope="module")
def exact_cosines(setup):
    out = {}
    for how in ["none", "per_tensor"]:
        ex = ExactProjector(setup["shapes"], how)
        out[how] = pair_cosines([ex.project(g) for g in setup["grads"]])
    return out


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_countsketch_cosines_track_exact_cosines_on_model_gradients(setup, exact_cosines, how):
    exact = exact_cosines[how]
    assert len(setup["grads"]) == 20 and len(exact) == 190
    assert exact.std() > 0.1 and exact.max() - exact.min() > 0.5  # a spread worth correlating with
    errors = {}
    for k in [256, 1024, 4096]:
        errs, rs = [], []
        for seed in range(3):
            p = CountSketch(setup["shapes"], k, seed=seed, normalize=how)
            approx = pair_cosines([p.project(g) for g in setup["grads"]])
            errs.append((approx - exact).abs().mean().item())
            rs.append(torch.corrcoef(torch.stack([approx, exact]))[0, 1].item())
        errors[k] = sum(errs) / len(errs)
        if k == 4096:
            assert min(rs) > 0.9
    assert errors[256] > errors[1024] > errors[4096]
    assert errors[4096] < 0.5 * errors[256]


def test_exact_projector_is_the_concatenated_gradient(setup):
    g = setup["grads"][0]
    ex = ExactProjector(setup["shapes"])
    v = ex.project(g)
    assert ex.k == sum(p.numel() for _, p in trainable(setup["model"])) == v.numel()
    assert torch.equal(v, torch.cat([t.reshape(-1) for t in g.values()]))
    assert ex.spec() == {"kind": "exact", "k": ex.k, "normalize": "none"}


# ----------------------------------------------------------------------------- per-tensor normalisation
def test_per_tensor_gives_each_tensor_unit_norm(setup):
    g = setup["grads"][2]
    v = ExactProjector(setup["shapes"], "per_tensor").project(g)
    start = 0
    for name, t in g.items():
        seg = v[start : start + t.numel()]
        start += t.numel()
        assert seg.norm().item() == pytest.approx(1.0, abs=1e-5), name
    assert v.double().norm().item() ** 2 == pytest.approx(len(g), rel=1e-5)


def test_per_tensor_scales_out_each_tensors_size():
    grads = rand_grads(SMALL, 8)
    scaled = {n: g * f for (n, g), f in zip(grads.items(), [1e-3, 10.0, 1e4])}
    p = CountSketch(SMALL, 32, seed=0, normalize="per_tensor")
    torch.testing.assert_close(p.project(scaled), p.project(grads), rtol=1e-4, atol=1e-5)
    unit = {n: g / g.norm() for n, g in grads.items()}
    torch.testing.assert_close(p.project(grads), CountSketch(SMALL, 32, seed=0).project(unit), rtol=1e-5, atol=1e-6)


def test_per_tensor_keeps_zero_tensors_zero():
    grads = rand_grads(SMALL, 9)
    grads["layer.b"] = torch.zeros(50)
    out = PerTensor()(grads)
    assert torch.equal(out["layer.b"], torch.zeros(50)) and torch.isfinite(out["layer.a"]).all()
    v = ExactProjector(SMALL, "per_tensor").project(grads)
    assert torch.isfinite(v).all() and v.norm().item() ** 2 == pytest.approx(2.0, rel=1e-5)


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="attribution.projector.normalize: unknown 'l1'"):
        CountSketch(SMALL, 8, normalize="l1").project(rand_grads(SMALL, 0))
    assert NoNorm()({"a": torch.ones(3)})["a"].tolist() == [1.0, 1.0, 1.0]


def test_normalisers_are_small_classes_named_as_configs_write_them():
    """NoNorm / PerTensor: the config string is read once (normalizer), the class does the work, `name` is what
    specs keep writing, `needs_norms` tells the hook sketch to compute per-example gradient norms."""
    assert [(c.name, c.needs_norms) for c in (NoNorm, PerTensor)] == [("none", False), ("per_tensor", True)]
    assert type(normalizer("none")) is NoNorm and type(normalizer("per_tensor")) is PerTensor
    per_tensor = PerTensor()
    assert normalizer(per_tensor) is per_tensor
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, -2.0]]), "z": torch.zeros(2)}
    assert NoNorm()(grads) is grads
    out = per_tensor(grads)
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.8]))  # / 5
    assert out["b"].tolist() == [[0.0, -1.0]] and out["z"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"attribution\.projector\.normalize: unknown 'l2' \(none or per_tensor\)"):
        normalizer("l2")
    with pytest.raises(ValueError, match=r"attribution\.kernel\.normalize: unknown 'l2'"):
        normalizer("l2", "attribution.kernel.normalize")


def test_projectors_take_a_normaliser_or_its_string_and_write_its_name():
    grads = rand_grads(SMALL, 3)
    for cls, args in ((CountSketch, (32,)), (GaussianProjector, (8,)), (ExactProjector, ())):
        by_name, by_object = cls(SMALL, *args, normalize="per_tensor"), cls(SMALL, *args, normalize=PerTensor())
        assert torch.equal(by_name.project(grads), by_object.project(grads))
        assert by_name.spec() == by_object.spec() and by_object.spec()["normalize"] == "per_tensor"
        assert cls(SMALL, *args).spec()["normalize"] == "none"


# ----------------------------------------------------------------------------- Gaussian
def test_gaussian_refuses_too_large_matrices():
    shapes = {"w": (1000, 100)}  # P = 100,000
    with pytest.raises(ValueError, match=r"attribution\.projector\.max_dense_elements=1,000,000") as e:
        GaussianProjector(shapes, k=11, max_dense_elements=1_000_000)
    assert "1,100,000" in str(e.value)
    GaussianProjector(shapes, k=10, max_dense_elements=1_000_000)  # exactly at the limit is allowed
    with pytest.raises(ValueError, match="max_dense_elements"):
        GaussianProjector({"emb": (100_000, 4096)}, k=65536)  # the default limit


def test_gaussian_matches_exact_cosines_on_tiny_sizes():
    shapes = {"a": (12, 10), "b": (80,)}
    vecs = [rand_grads(shapes, s) for s in range(6)]
    vecs.append({n: vecs[0][n] + 0.3 * vecs[1][n] for n in shapes})  # a near-duplicate pair
    exact = pair_cosines([ExactProjector(shapes).project(g) for g in vecs])
    p = GaussianProjector(shapes, k=8192, seed=0)
    approx = pair_cosines([p.project(g) for g in vecs])
    assert (approx - exact).abs().max() < 0.06
    assert approx.max() > 0.9
    again = GaussianProjector(shapes, k=8192, seed=0).project(vecs[0])
    assert torch.equal(again, p.project(vecs[0]))
    assert not torch.allclose(GaussianProjector(shapes, k=8192, seed=1).project(vecs[0]), again)
    assert p.spec() == {"kind": "gaussian", "k": 8192, "seed": 0, "normalize": "none"}


def test_gaussian_preserves_norms_on_average():
    shapes = {"a": (200,)}
    g = rand_grads(shapes, 0)
    ratios = [(GaussianProjector(shapes, 64, seed=s).project(g).norm() / g["a"].norm()).item() ** 2 for s in range(100)]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.06)


# ----------------------------------------------------------------------------- make_projector
CONF = ROOT / "conf" / "attribution"


def projector_cfg(kind="sketch", normalize="none", kernel=None, **over):
    """The `attribution` config that attribution/projector=<kind> and attribution/kernel=<kernel> compose (the
    shipped files), with projector overrides; `normalize` picks the kernel as before the groups existed
    (none -> cosine, per_tensor -> rapidin)."""
    kernel = kernel or {"none": "cosine", "per_tensor": "rapidin"}.get(normalize, "cosine")
    projector = OmegaConf.merge(OmegaConf.load(CONF / "projector" / f"{kind}.yaml"), over)
    root = OmegaConf.create(
        {
            "max_length": 256,  # what ${max_length} refers to
            "attribution": {"projector": projector, "kernel": OmegaConf.load(CONF / "kernel" / f"{kernel}.yaml")},
        }
    )
    return root.attribution


def test_make_projector_kinds(setup):
    shapes, n_params = setup["shapes"], sum(p.numel() for _, p in trainable(setup["model"]))
    p = make(setup, kind="rapidin", k=128, seed=3)
    assert isinstance(p, CountSketch) and (p.k, p.seed, p.normalizer.name, p.shapes) == (128, 3, "none", shapes)
    g = make(setup, kind="gaussian", k=4, normalize="per_tensor")
    assert isinstance(g, GaussianProjector) and (g.k, g.normalizer.name, g.shapes) == (4, "per_tensor", shapes)
    e = make(setup, kind="exact")
    assert isinstance(e, ExactProjector) and e.k == n_params
    h = make(setup, kind="sketch", k=256, method="tensorsketch")
    assert isinstance(h, HookSketch) and (h.k, h.method) == (256, "tensorsketch")
    with pytest.raises(ValueError, match=r"attribution\.projector\.max_dense_elements"):
        make(setup, kind="gaussian", k=16, max_dense_elements=100)


def test_make_projector_default_config(setup):
    p = make(setup)
    assert isinstance(p, HookSketch) and p.k == 65536 and p.method == "auto"  # the paper's k
    spec = p.spec()
    assert {k: spec[k] for k in ("kind", "k", "seed", "normalize", "method", "coverage")} == {
        "kind": "sketch",
        "k": 65536,
        "seed": 0,
        "normalize": "none",
        "method": "auto",
        "coverage": 1.0,
    }  # every OLMo-3 parameter reached
    r = make(setup, kind="rapidin")
    assert r.project(setup["grads"][0]).shape == (65536,)


@pytest.mark.parametrize("k", [0, -4, None])
def test_make_projector_rejects_non_positive_k(setup, k):
    with pytest.raises(ValueError, match=r"attribution\.projector\.k must be a positive integer"):
        make(setup, k=k)


def test_make_projector_rejects_unknown_kind_method_and_normalisation(setup):
    """Configs saved before the groups name a kind and a normalisation: unknown ones are refused naming the key."""
    with pytest.raises(ValueError, match=r"attribution\.projector\.kind: unknown 'srht'"):
        make_projector(OmegaConf.create({"projector": {"kind": "srht", "k": 8}}), setup["model"])
    with pytest.raises(ValueError, match=r"attribution\.projector\.method: unknown 'fft'"):
        make(setup, kind="sketch", method="fft")
    with pytest.raises(ValueError, match=r"attribution\.projector\.normalize: unknown 'l1'"):
        make_projector(OmegaConf.create({"projector": {"kind": "sketch", "k": 8, "normalize": "l1"}}), setup["model"])
    bad_kernel = OmegaConf.merge(projector_cfg(kernel="adam"), {"kernel": {"normalize": "l1"}})
    with pytest.raises(ValueError, match=r"attribution\.kernel\.normalize: unknown 'l1'"):
        make_projector(bad_kernel, setup["model"])


# ----------------------------------------------------------------------------- the hook sketch (kind sketch)
def sketch_of_gradients(hook, grads, how):
    """What the hooks must produce: each (materialised, optionally normalised) parameter gradient sketched with
    the sketch's own hash (sketch_flat), summed."""
    grads = normalizer(how)(grads)
    return sum(hook.sketch_flat(n, g.reshape(1, -1).float())[0] for n, g in grads.items())


def model_gradients(model, encoded, pad):
    params = trainable(model)
    model.eval()
    return [example_gradient(model, collate([e], pad), params)[1] for e in encoded]


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_sketch_materialize_is_the_sketch_of_the_per_example_gradients(setup, how):
    model, enc, pad = setup["model"], setup["encoded"], setup["tok"].pad_token_id
    hook = make(setup, kind="sketch", k=1024, normalize=how, method="materialize")
    got = project_examples(model, enc, hook, pad)
    want = torch.stack([sketch_of_gradients(hook, g, how) for g in setup["grads"]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert want.norm(dim=1).min() > 0


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_sketch_materialize_in_blocks_across_chunks_is_the_same_sketch(setup, how):
    """Row blocks that start and end inside k-chunks (and partial last blocks) fold to the same vectors."""
    model, enc, pad = setup["model"], setup["encoded"][:6], setup["tok"].pad_token_id
    whole = make(setup, kind="sketch", k=100, normalize=how, method="materialize")
    whole.block_elements = 2**40
    blocked = make(setup, kind="sketch", k=100, normalize=how, method="materialize")
    blocked.block_elements = 7  # the floor: T rows per block
    want = torch.stack([sketch_of_gradients(whole, g, how) for g in setup["grads"][:6]])
    torch.testing.assert_close(project_examples(model, enc, blocked, pad), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(project_examples(model, enc, whole, pad), want, rtol=1e-4, atol=1e-5)


def test_sketch_materialize_with_linear_biases(setup):
    torch.manual_seed(0)
    biased = build_tiny(OmegaConf.merge(TINY, {"config": {"attention_bias": True}}), setup["tok"])
    with torch.no_grad():
        for n, p in biased.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    assert any(n.endswith("o_proj.bias") for n, _ in trainable(biased))
    enc, pad = setup["encoded"][:4], setup["tok"].pad_token_id
    hook = make_projector(projector_cfg(kind="sketch", k=256, method="materialize"), biased)
    assert hook.coverage() == 1.0
    want = torch.stack([sketch_of_gradients(hook, g, "none") for g in model_gradients(biased, enc, pad)])
    torch.testing.assert_close(project_examples(biased, enc, hook, pad), want, rtol=1e-4, atol=1e-5)


def tied_model(setup):
    torch.manual_seed(0)
    tied = build_tiny(OmegaConf.merge(TINY, {"config": {"tie_word_embeddings": True}}), setup["tok"])
    assert "lm_head.weight" not in dict(trainable(tied))  # one shared parameter
    return tied


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_sketch_materialize_with_tied_embeddings(setup, how):
    """The tied weight's input-embedding and output-layer parts add into one sketch; under per_tensor it is
    divided once by the norm of their sum (||a + b||, cross term from token ids), exactly as the sketch of the
    normalised autograd gradient."""
    tied, enc, pad = tied_model(setup), setup["encoded"][:6], setup["tok"].pad_token_id
    hook = make_projector(projector_cfg(kind="sketch", k=256, method="materialize", normalize=how), tied)
    want = torch.stack([sketch_of_gradients(hook, g, how) for g in model_gradients(tied, enc, pad)])
    torch.testing.assert_close(project_examples(tied, enc, hook, pad), want, rtol=1e-4, atol=1e-5)


def tiny_llama(setup, **config):
    """A tiny LlamaForCausalLM (SmolLM2's architecture) on the test tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = {"pad_token_id": setup["tok"].pad_token_id, **config}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(setup["tok"]), **TINY.config, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def tied_parts(model, example, pad):
    """Autograd's two parts of the tied weight's gradient for one example: a (input embedding) and b (output
    layer), from the gradient with respect to the looked-up embeddings and the whole gradient."""
    batch = collate([example], pad)
    weight = model.get_input_embeddings().weight
    embeds = model.get_input_embeddings()(batch["input_ids"])
    loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    whole, e = torch.autograd.grad(loss, [weight, embeds])
    a = torch.zeros_like(weight).index_add_(0, batch["input_ids"][0], e[0])
    return a, whole - a


@pytest.mark.parametrize(
    "arch, method",
    [
        ("olmo3", "materialize"),
        ("olmo3", "tensorsketch"),
        ("olmo3-tied", "materialize"),
        ("olmo3-tied", "tensorsketch"),
        ("llama-tied-bias", "auto"),
        ("llama-tied-padding-idx", "auto"),
    ],
)
def test_sketch_per_tensor_norms_are_the_autograd_norms(setup, arch, method):
    """The norms the per-tensor division uses -- from the GEMM blocks, TensorSketch's frobenius, the embedding's
    token-equality sum and the tied cross term -- equal autograd's per-tensor gradient norms, example by example,
    in a padded batch."""
    model = {
        "olmo3": lambda: setup["model"],
        "olmo3-tied": lambda: tied_model(setup),
        "llama-tied-bias": lambda: tiny_llama(setup, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        # the embedding's padding_idx (Llama: the pad id; SmolLM2's is its eos) is a token of the examples
        "llama-tied-padding-idx": lambda: tiny_llama(
            setup, tie_word_embeddings=True, pad_token_id=setup["encoded"][0]["input_ids"][1]
        ),
    }[arch]().eval()
    enc, pad = setup["encoded"][:5], setup["tok"].pad_token_id
    hook = make_projector(projector_cfg(kind="sketch", k=512, method=method, normalize="per_tensor"), model)
    assert hook.coverage() == 1.0 and hook.tied == (arch != "olmo3")
    hook.project_batch(model, collate(enc, pad))
    grads = model_gradients(model, enc, pad)
    assert set(hook.last_norms) == set(grads[0])  # every parameter, each normalised once
    for name in grads[0]:
        want = torch.stack([g[name].double().norm() for g in grads]).float()
        torch.testing.assert_close(hook.last_norms[name], want, rtol=2e-4, atol=1e-7, msg=name)
    if hook.tied:  # the cross term matters: ||a + b|| is not sqrt(||a||^2 + ||b||^2)
        name = hook.param_names[id(hook.input_weight)]
        for b, e in enumerate(enc):
            a, out = tied_parts(model, e, pad)
            apart = (a.double().norm() ** 2 + out.double().norm() ** 2).sqrt().item()
            assert abs(hook.last_norms[name][b].item() - apart) > 1e-3 * apart
            assert hook.last_norms[name][b].item() == pytest.approx((a + out).double().norm().item(), rel=2e-4)


@pytest.mark.parametrize("method", ["materialize", "tensorsketch"])
def test_sketch_per_tensor_on_tied_embeddings_tracks_exact_per_tensor_cosines(setup, method):
    """Cosines of sketch + per_tensor against ExactProjector + per_tensor on autograd gradients of the tied model:
    1 - Pearson within the dense-JL expectation's (mean of 3 seeds; ratio as in tests/test_fidelity.py)."""
    tied, enc, pad = tied_model(setup), setup["encoded"][:12], setup["tok"].pad_token_id
    grads = model_gradients(tied, enc, pad)
    shapes = {n: tuple(g.shape) for n, g in grads[0].items()}
    exact = pair_cosines([ExactProjector(shapes, "per_tensor").project(g) for g in grads])
    k = 1024
    rs = []
    for seed in range(3):
        hook = make_projector(projector_cfg(kind="sketch", k=k, seed=seed, method=method, normalize="per_tensor"), tied)
        approx = pair_cosines(list(project_examples(tied, enc, hook, pad)))
        rs.append(torch.corrcoef(torch.stack([approx, exact]))[0, 1].item())
    ratio = (1 - sum(rs) / 3) / (1 - jl_pearson(exact, k))
    assert 0.5 <= ratio <= 1.5, (rs, jl_pearson(exact, k))


class Shared(torch.nn.Module):
    """Two Linear layers sharing one weight (not an embedding tie)."""

    def __init__(self):
        super().__init__()
        self.embed, self.a, self.b = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def get_input_embeddings(self):
        return self.embed


def test_sketch_per_tensor_refuses_other_shared_weights_naming_the_key():
    HookSketch(Shared(), 16, normalize="none")  # a plain sum of both uses is still right
    with pytest.raises(
        ValueError,
        match=r"attribution\.projector\.normalize=per_tensor: parameter a\.weight is "
        r"shared by modules a, b",
    ):
        HookSketch(Shared(), 16, normalize="per_tensor")


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.embed


def test_sketch_flat_inner_products_are_unbiased_over_seeds():
    lin = OneLinear()  # sketch_flat only needs (seed, name, k)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1200, generator=gen) + 0.5  # not centred: without signs, collisions add bias
    noise = torch.randn(1, 1200, generator=gen)
    y = 0.6 * x + 0.8 * noise
    z = noise - (noise @ x.T) / (x @ x.T) * x  # orthogonal to x
    sxy, sxx, sxz = [], [], []
    for seed in range(200):
        hook = HookSketch(lin, 64, seed=seed)
        a, b, c = (hook.sketch_flat("weight", v)[0].double() for v in (x, y, z))
        sxy.append((a @ b).item()), sxx.append((a @ a).item()), sxz.append((a @ c).item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    xy, xx = (x @ y.T).item(), (x @ x.T).item()
    assert abs(mean(sxy) - xy) < 0.05 * (x.norm() * y.norm()).item()
    assert abs(mean(sxx) - xx) < 0.05 * xx
    assert abs(mean(sxz)) < 0.05 * (x.norm() * z.norm()).item()
    assert len(set(round(v, 3) for v in sxx)) > 1  # the seeds give different sketches


@pytest.mark.parametrize("method, ks", [("materialize", (256, 4096)), ("tensorsketch", (128, 1024))])
def test_sketch_cosines_track_exact_cosines(setup, method, ks):
    n = 20 if method == "materialize" else 10  # tensorsketch costs T * k log k per layer
    model, enc, pad = setup["model"], setup["encoded"][:n], setup["tok"].pad_token_id
    exact = pair_cosines([ExactProjector(setup["shapes"]).project(g) for g in setup["grads"][:n]])
    errors, rs = {}, []
    for k in ks:
        errs = []
        for seed in (0,):
            approx = pair_cosines(
                list(project_examples(model, enc, make(setup, kind="sketch", k=k, method=method, seed=seed), pad))
            )
            errs.append((approx - exact).abs().mean().item())
            if k == ks[1]:
                rs.append(torch.corrcoef(torch.stack([approx, exact]))[0, 1].item())
        errors[k] = sum(errs) / len(errs)
    assert min(rs) > 0.9
    assert errors[ks[0]] > errors[ks[1]] and errors[ks[1]] < 0.04


# ----------------------------------------------------------------------------- project_examples
class Scripted:
    """A projector whose project_batch returns fixed rows by example length (to test project_examples itself)."""

    k = 3

    def __init__(self, rows):
        self.rows = rows

    def project_batch(self, model, batch):
        return torch.stack([self.rows[int(n)] for n in batch["attention_mask"].sum(dim=1)])


def test_project_examples_turns_rows_with_any_non_finite_entry_into_nan(setup):
    rows = {
        2: torch.tensor([1.0, 2.0, 3.0]),
        3: torch.tensor([1.0, float("inf"), 0.0]),
        4: torch.tensor([float("nan"), 0.0, 0.0]),
    }
    enc = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 2, 4)]
    out = project_examples(setup["model"], enc, Scripted(rows), setup["tok"].pad_token_id, batch_size=2)
    assert out[1].tolist() == [1.0, 2.0, 3.0]
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()


# ----------------------------------------------------------------------------- project_examples
@pytest.mark.parametrize("kind", ["rapidin", "sketch"])
def test_project_examples_rows_do_not_depend_on_the_other_examples(setup, kind):
    model, enc, pad = setup["model"], setup["encoded"], setup["tok"].pad_token_id
    proj = make(setup, kind=kind, k=512)
    model.train()
    full = project_examples(model, enc[:9], proj, pad, batch_size=4)
    assert model.training  # the mode is restored
    assert full.shape == (9, 512) and full.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(project_examples(model, [enc[4], enc[1]], proj, pad), full[[4, 1]], **tol)
    torch.testing.assert_close(project_examples(model, [enc[3]], proj, pad)[0], full[3], **tol)
    torch.testing.assert_close(project_examples(model, enc[:9], proj, pad, batch_size=1), full, **tol)
    torch.testing.assert_close(project_examples(model, enc[:9][::-1], proj, pad, batch_size=9), full.flip(0), **tol)
    if kind == "rapidin":
        torch.testing.assert_close(full[2], CountSketch(setup["shapes"], 512).project(setup["grads"][2]), **tol)
    assert project_examples(model, [], proj, pad).shape == (0, 512)


def test_sketch_auto_plans_layers_for_fixed_tokens_not_the_batch_padding(setup):
    """`auto` picks tensorsketch or materialize per layer by sequence length: with the batch's padded length the
    600 x 32 output layer at k = 32 would flip at T = 225 between these batches; plan_tokens fixes the plan."""
    model, enc, pad = setup["model"], setup["encoded"], setup["tok"].pad_token_id
    lengths = [len(e["input_ids"]) for e in enc]
    assert min(lengths) < 225 < max(lengths)
    for plan in (128, 256):  # one plan of each method for the output layer
        proj = make(setup, kind="sketch", k=32, plan_tokens=plan)
        assert proj.use_tensorsketch(plan, 32, 600, 4) == (plan < 225)
        full = project_examples(model, enc, proj, pad, batch_size=len(enc))
        torch.testing.assert_close(project_examples(model, enc, proj, pad, batch_size=1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rapidin", "sketch"])
def test_project_examples_nan_row_for_an_example_without_loss_tokens(setup, kind):
    model, enc, pad = setup["model"], setup["encoded"], setup["tok"].pad_token_id
    proj = make(setup, kind=kind, k=64)
    no_loss = {"input_ids": enc[0]["input_ids"], "labels": [-100] * len(enc[0]["input_ids"])}
    out = project_examples(model, [enc[1], no_loss, enc[2]], proj, pad)
    assert torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(out[1]).all()


@pytest.mark.parametrize("kind", ["rapidin", "sketch"])
def test_project_examples_sharded_over_two_ranks_gives_the_same_rows(setup, kind):
    model, enc, pad = setup["model"], setup["encoded"], setup["tok"].pad_token_id
    proj = make(setup, kind=kind, k=128)
    five = enc[:5]  # uneven: rank 0 gets 3 examples, rank 1 gets 2
    single = project_examples(model, five, proj, pad)
    captured = {}

    def capture(padded):
        captured["rank1"] = padded
        return torch.stack([padded, padded])

    project_examples(model, five, proj, pad, rank=1, world=2, gather=capture)
    assert captured["rank1"].shape == (3, 128)
    assert torch.equal(captured["rank1"][2], torch.zeros(128))  # the padding row
    sharded = project_examples(
        model, five, proj, pad, rank=0, world=2, gather=lambda padded: torch.stack([padded, captured["rank1"]])
    )
    torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-6)


def test_two_ranks_resuming_from_shards_agree_on_each_reuse(setup, tmp_path):
    """Two ranks (threads with an all_gather over a barrier) resume a set from its complete shards while rank 1
    lags: rank 0 must not save the store and delete the shards before rank 1 has read them (rank 1 would then
    project alone and wait forever in the all_gather). Both finish with the single-process vectors."""
    import threading
    import time

    from lark.kernel.build import StoreBuilder

    model, enc, pad = setup["model"], setup["encoded"][:6], setup["tok"].pad_token_id
    proj = make(setup, kind="sketch", k=64)
    meta, ids = {"set": "s", "epoch": 1}, [f"e{i}" for i in range(6)]
    StoreBuilder(model, proj, tmp_path, pad, shard_size=2).project(enc, ids, meta)  # the killed run's 3 shards
    single = StoreBuilder(model, proj, tmp_path / "single", pad).build(enc, ids, meta)
    barrier, slots, results, lagging = threading.Barrier(2, timeout=10), [None, None], {}, threading.Event()

    def run(rank):
        def gather(t):
            slots[rank] = t
            barrier.wait()
            out = torch.stack(list(slots))
            barrier.wait()
            return out

        def log(message):  # rank 0 goes on once rank 1 has read its first shard; rank 1 then lags
            if rank == 1:
                lagging.set()
                time.sleep(0.5)
            else:
                lagging.wait(10)

        builder = StoreBuilder(model, proj, tmp_path, pad, shard_size=2, rank=rank, world=2, gather=gather)
        builder.reuse, builder.log = True, log
        results[rank] = builder.build(enc, ids, meta)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert set(results) == {0, 1}, "a rank did not finish"
    for rank in (0, 1):
        torch.testing.assert_close(results[rank], single, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "shards").glob("s.*"))  # gone once the store is complete


def test_example_gradient_is_the_models_mean_loss_gradient(setup):
    model, e, pad = setup["model"], setup["encoded"][0], setup["tok"].pad_token_id
    params = trainable(model)
    loss, grads = example_gradient(model, collate([e], pad), params)
    assert list(grads) == [n for n, _ in params] and all(grads[n].shape == p.shape for n, p in params)
    model.zero_grad()
    ref = model(**collate([e], pad)).loss
    ref.backward()
    assert loss.item() == pytest.approx(ref.item())
    for n, p in params:
        torch.testing.assert_close(grads[n], p.grad)
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- the optimizer correction (adam)
def random_moments(model, seed=0):
    from lark.kernel.optimizer import Moments, shaped

    gen = torch.Generator().manual_seed(seed)
    return Moments(
        {n: shaped(torch.rand(p.shape, generator=gen) * 1e-4 + 1e-6, True) for n, p in trainable(model)}, "optimizer"
    )


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_sketch_with_factored_adam_moments_is_the_sketch_of_the_corrected_gradients(setup, how):
    """Scaling Delta and X before the GEMM (and embedding rows, norm weights) gives exactly the sketch of
    every gradient coordinate times the factored 1 / sqrt(v_hat) (AdamScale.apply, the per-example path)."""
    from lark.kernel.optimizer import AdamScale

    model, enc, pad = setup["model"], setup["encoded"][:6], setup["tok"].pad_token_id
    moments = random_moments(model)
    cfg = OmegaConf.merge(
        projector_cfg(kind="sketch", k=512, method="materialize", kernel="adam"), {"kernel": {"normalize": how}}
    )
    hook = make_projector(cfg, model, moments=moments)
    scale = AdamScale(moments, 1e-8, model)
    want = torch.stack([sketch_of_gradients(hook, scale.apply(g), how) for g in setup["grads"][:6]])
    got = project_examples(model, enc, hook, pad)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    plain = project_examples(model, enc, make(setup, kind="sketch", k=512, method="materialize", normalize=how), pad)
    assert (got - plain).abs().max() > 0.1 * plain.abs().max()  # the correction does change the vectors
    assert hook.spec()["precondition"]["moments"] == moments.fingerprint()


def test_sketch_tensorsketch_layers_take_the_same_correction(setup):
    """TensorSketch of the scaled (Delta, X) tracks the exact corrected cosines like the uncorrected ones do."""
    from lark.kernel.optimizer import AdamScale

    model, enc, pad = setup["model"], setup["encoded"][:8], setup["tok"].pad_token_id
    moments = random_moments(model, 1)
    cfg = projector_cfg(kind="sketch", k=4096, method="tensorsketch", kernel="adam")
    approx = pair_cosines(list(project_examples(model, enc, make_projector(cfg, model, moments=moments), pad)))
    scale = AdamScale(moments, 1e-8, model)
    exact = pair_cosines([ExactProjector(setup["shapes"]).project(scale.apply(g)) for g in setup["grads"][:8]])
    assert torch.corrcoef(torch.stack([approx, exact]))[0, 1] > 0.9


def test_sketch_refuses_full_moments_naming_the_key(setup):
    from lark.kernel.optimizer import Moments

    full = Moments({n: {"v": torch.ones(p.shape)} for n, p in trainable(setup["model"])}, "optimizer")
    hook = make_projector(projector_cfg(kind="sketch", k=64, kernel="adam"), setup["model"], moments=full)
    with pytest.raises(ValueError, match=r"attribution\.kernel\.factored=false"):
        project_examples(setup["model"], setup["encoded"][:1], hook, setup["tok"].pad_token_id)


def test_gold_answer_losses_are_taken_without_dropout(setup):
    """predictions.jsonl's losses, taken during training (the model in train mode): with dropout they changed
    from call to call and drew from the RNG a resumed run does not replay. In eval mode, the same every call; the
    model goes back to train mode."""
    import copy

    from lark.data.formats import Encoder
    from lark.evaluation import gold_answer_losses

    model = copy.deepcopy(setup["model"]).train()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    world = generate_world(seed=1, n_train=24, n_test=4, n_facts=30, n_medical_docs=100, n_entertainment_docs=10)
    fields = [qa_fields(x, "{final_decision}") for x in world.test]
    encoder = Encoder(setup["tok"], CHAT, 256)
    first = gold_answer_losses(model, encoder, fields)
    assert torch.equal(first, gold_answer_losses(model, encoder, fields)) and model.training
