"""lark.kernel.factored (attribution/projector=factored): the factored vector is (P_out (x) P_in) vec(G) of autograd's
per-example gradient, its per-tensor norms are autograd's, its matrices depend on (seed, name) only, and
`python train.py attribution/projector=factored` runs with every kernel."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL, TINY_OLMO3, tiny_with_norms
from omegaconf import OmegaConf

from lark.data.datamodule import collate
from lark.data.formats import encode_text
from lark.kernel.build import project_examples
from lark.kernel.factored import MATRICES, FactoredProjector, rank_for
from lark.kernel.factory import make_projector
from lark.kernel.hashing import hadamard_signs, hashed, name_key, rademacher_signs, random_signs
from lark.kernel.normalizers import normalizer
from lark.kernel.optimizer import AdamScale, Moments, shaped
from lark.kernel.projectors import example_gradient, trainable
from lark.models import build_tiny

CONF = ROOT / "conf" / "attribution"


@pytest.fixture(scope="module")
def setup():
    """A tiny OLMo-3 (norm weights away from 1) and the world's texts, encoded with padding-worthy lengths."""
    tok, model, texts = tiny_with_norms()
    encoded = [encode_text(tok, t, 24 + 9 * i) for i, t in enumerate(texts[:4])]
    return {"tok": tok, "model": model, "encoded": encoded}


def tiny_llama(tok, **config):
    """A tiny Llama (SmolLM2's architecture) with biases and a tied embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    sizes = {k: v for k, v in TINY_OLMO3["config"].items()}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **sizes, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def attribution(kernel="cosine", **projector):
    projector = OmegaConf.merge(OmegaConf.load(CONF / "projector" / "factored.yaml"), projector)
    return OmegaConf.create({"projector": projector, "kernel": OmegaConf.load(CONF / "kernel" / f"{kernel}.yaml")})


def documented_hash(n, seed, name, purpose, size):
    """(bucket [n] in [0, size), sign [n]) of coordinates 0..n-1 by the documented counter hash under the keys
    (seed, name, "<purpose>-bucket" / "<purpose>-sign"): built here from lark.kernel.hashing's primitives, not by
    the projector."""
    index = torch.arange(n, dtype=torch.int64)
    bucket = hashed(index, name_key(seed, name, f"{purpose}-bucket")) % size
    return bucket, random_signs(index, name_key(seed, name, f"{purpose}-sign")).double()


def explicit(proj, grads):
    """The factored vector of one example's autograd gradients {name: G}, formed the slow way in float64 from the
    hash primitives and the sign matrices (tested on their own above), never from the projector's own hashing: each
    matrix's (P_out (x) P_in) vec(G) / sqrt(r_out r_in) (the identity where r >= d), each TensorSketched matrix's
    coordinate (i, j) at bucket (h_out(i) + h_in(j)) mod size with sign s_out(i) s_in(j), each 1-D parameter itself
    or, when longer than its slot, its count sketch."""
    parts = []
    for name, (size, ranks) in proj.slots.items():
        g = grads[name].double()
        if ranks == "tensorsketch":
            (b1, s1), (b2, s2) = (
                documented_hash(n, proj.seed, name, f"factored-ts-{axis}", size)
                for axis, n in zip(("out", "in"), g.shape)
            )
            bucket, sign = (b1.unsqueeze(1) + b2.unsqueeze(0)) % size, s1.unsqueeze(1) * s2.unsqueeze(0)
            parts.append(torch.zeros(size, dtype=torch.float64).index_add_(0, bucket.flatten(), (g * sign).flatten()))
        elif ranks is None:
            flat = g.reshape(-1)
            if flat.numel() > size:
                bucket, sign = documented_hash(flat.numel(), proj.seed, name, "factored", size)
                flat = torch.zeros(size, dtype=torch.float64).index_add_(0, bucket, flat * sign)
            parts.append(flat)
        else:
            signs = {"hadamard": hadamard_signs, "rademacher": rademacher_signs}[proj.matrix]
            p_out, p_in = (
                torch.eye(n, dtype=torch.float64)
                if r >= n
                else signs(r, n, name_key(proj.seed, name, f"factored-{axis}"), "cpu").double()
                for axis, n, r in (("out", g.shape[0], proj.r_out), ("in", g.shape[1], proj.r_in))
            )
            parts.append(torch.kron(p_out, p_in) @ g.reshape(-1) / (p_out.shape[0] * p_in.shape[0]) ** 0.5)
    return torch.cat(parts)


def autograd_gradients(model, encoded, pad):
    params = trainable(model)
    return [example_gradient(model, collate([e], pad), params)[1] for e in encoded]


@pytest.mark.parametrize("vocab", ["tensorsketch", "input", "factored"])
@pytest.mark.parametrize("how", ["none", "per_tensor"])
@pytest.mark.parametrize("arch, r", [("olmo3", 8), ("olmo3", 4), ("llama-tied-bias", 8)])
def test_factored_vector_is_the_kronecker_projection_of_the_autograd_gradient(setup, arch, r, how, vocab):
    """A padded batch's factored vectors = (P_out (x) P_in) vec(G) of each example's autograd gradient G (r = 4:
    the 64-wide norms are count-sketched into 16 numbers; r = 8: kept exactly), per-tensor normalised or not; the
    embedding and output layer TensorSketched (vocab=tensorsketch: a tied weight's two parts in one slot), only the
    input embedding's weight (input: with a tied output layer's part), or factored like the rest."""
    model = setup["model"] if arch == "olmo3" else tiny_llama(setup["tok"], tie_word_embeddings=True, mlp_bias=True)
    pad, encoded = setup["tok"].pad_token_id, setup["encoded"]
    kernel = {"none": "cosine", "per_tensor": "rapidin"}[how]
    proj = make_projector(attribution(kernel, r_in=r, r_out=r, vocab=vocab), model)
    sketched = [n for n, (_, how_) in proj.slots.items() if how_ == "tensorsketch"]
    assert len(sketched) == {"factored": 0, "input": 1, "tensorsketch": 1 + (arch == "olmo3")}[vocab]
    assert isinstance(proj, FactoredProjector) and proj.coverage() == 1.0 and proj.tied == (arch != "olmo3")
    got = project_examples(model, encoded, proj, pad, batch_size=4)
    grads = autograd_gradients(model, encoded, pad)
    want = torch.stack([explicit(proj, normalizer(how)(g)) for g in grads]).float()
    assert got.shape == (len(encoded), proj.k) and proj.k == sum(size for size, _ in proj.slots.values())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want.norm(dim=1).min() > 0


@pytest.mark.parametrize("arch, vocab", [("olmo3", "tensorsketch"), ("llama-tied-bias", "input")])
def test_vocab_numbers_sizes_the_tensorsketched_slots(setup, arch, vocab):
    """vocab_numbers=1000: each TensorSketched vocabulary matrix gets 1000 numbers instead of a block's 64 (r = 8),
    k grows by as much, the spec says so, and the vectors are still the explicit TensorSketch / Kronecker
    projection of autograd's gradient; a value below 1 is refused by its key."""
    model = setup["model"] if arch == "olmo3" else tiny_llama(setup["tok"], tie_word_embeddings=True, mlp_bias=True)
    pad, encoded = setup["tok"].pad_token_id, setup["encoded"]
    plain = make_projector(attribution(r_in=8, r_out=8, vocab=vocab), model)
    proj = make_projector(attribution(r_in=8, r_out=8, vocab=vocab, vocab_numbers=1000), model)
    sketched = [n for n, (size, how) in proj.slots.items() if how == "tensorsketch"]
    assert sketched and all(proj.slots[n][0] == 1000 and plain.slots[n][0] == 64 for n in sketched)
    assert proj.k == plain.k + len(sketched) * (1000 - 64) and proj.spec()["vocab_numbers"] == 1000
    got = project_examples(model, encoded, proj, pad, batch_size=4)
    want = torch.stack([explicit(proj, g) for g in autograd_gradients(model, encoded, pad)]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"attribution\.projector\.vocab_numbers must be a positive integer"):
        make_projector(attribution(vocab_numbers=0), model)


@pytest.mark.parametrize("arch", ["olmo3", "llama-tied-bias"])
def test_per_tensor_norms_are_the_autograd_norms(setup, arch):
    """What the rapidin kernel divides each slot by -- from X and Delta, the embedding's token sum and the tied
    cross term, never a formed G of a large layer -- equals the norm of autograd's per-tensor gradient."""
    model = setup["model"] if arch == "olmo3" else tiny_llama(setup["tok"], tie_word_embeddings=True, mlp_bias=True)
    pad, encoded = setup["tok"].pad_token_id, setup["encoded"]
    proj = make_projector(attribution("rapidin", r_in=4, r_out=4), model)
    proj.project_batch(model, collate(encoded, pad))
    grads = autograd_gradients(model, encoded, pad)
    assert set(proj.last_norms) == set(grads[0])
    for name in grads[0]:
        want = torch.stack([g[name].double().norm() for g in grads]).float()
        torch.testing.assert_close(proj.last_norms[name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_adam_correction_is_the_projection_of_the_corrected_gradient(setup):
    """With factored moments, scaling Delta and X (and the embedding rows) before projecting equals projecting
    AdamScale.apply of autograd's gradient."""
    model, pad, encoded = setup["model"], setup["tok"].pad_token_id, setup["encoded"][:3]
    gen = torch.Generator().manual_seed(0)
    moments = Moments(
        {n: shaped(torch.rand(p.shape, generator=gen) + 0.1, True) for n, p in trainable(model)}, "optimizer"
    )
    proj = make_projector(attribution("adam", r_in=8, r_out=8), model, moments=moments)
    assert proj.spec()["precondition"]["moments"] == moments.fingerprint()
    scale = AdamScale(moments, 1e-8, model)
    want = torch.stack([explicit(proj, scale.apply(g)) for g in autograd_gradients(model, encoded, pad)]).float()
    torch.testing.assert_close(project_examples(model, encoded, proj, pad), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matrix", sorted(MATRICES))
def test_matrices_depend_on_seed_and_name_only_in_a_fresh_process(matrix):
    signs = MATRICES[matrix]
    here = signs(16, 300, name_key(3, "model.layers.0.mlp.up_proj.weight", "factored-in"), "cpu")
    code = (
        "from lark.kernel.factored import MATRICES; from lark.kernel.hashing import name_key; "
        f"s = MATRICES['{matrix}'](16, 300, name_key(3, 'model.layers.0.mlp.up_proj.weight', 'factored-in'), 'cpu'); "
        "print(','.join(str(int(v)) for v in s.flatten().tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert [int(v) for v in out.stdout.strip().split(",")] == here.flatten().int().tolist()
    other = signs(16, 300, name_key(4, "model.layers.0.mlp.up_proj.weight", "factored-in"), "cpu")
    assert not torch.equal(here, other) and set(here.unique().tolist()) == {-1.0, 1.0}
    assert abs(here.mean().item()) < 0.05  # balanced signs: E[P^T P] = I after the 1/sqrt(r)


@pytest.mark.parametrize("cols", [64, 300])
def test_hadamard_rows_are_distinct_rows_of_an_orthogonal_matrix(cols):
    """All n rows (n = 64 or 512, the power of two >= cols) give S^T S = n I exactly; fewer rows are a prefix of
    the same order (r = 16 is the first 16 rows of r = 32), all distinct."""
    n, key = 1 << (cols - 1).bit_length(), name_key(0, "w", "factored-in")
    full = hadamard_signs(n, cols, key, "cpu")
    torch.testing.assert_close(full.T @ full, n * torch.eye(cols), rtol=0, atol=0)
    assert torch.equal(hadamard_signs(16, cols, key, "cpu"), hadamard_signs(32, cols, key, "cpu")[:16])
    assert full.unique(dim=0).shape[0] == n and set(full.unique().tolist()) == {-1.0, 1.0}


def test_hadamard_rows_err_far_less_than_independent_signs_when_r_nears_d():
    """The sampling without replacement that hadamard buys: at r = 63 of d = 64 a unit inner product's JL estimate
    errs ~8x less (std 0.02 against 0.15 over 200 keys)."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 64, generator=gen).unbind()
    x, y = x / x.norm(), (0.7 * x / x.norm() + 0.3 * y / y.norm())
    exact, std = (x @ y).item(), {}
    for matrix, signs in MATRICES.items():
        s = torch.stack([signs(63, 64, key, "cpu") for key in range(200)])  # [keys, 63, 64]
        std[matrix] = ((s @ x) * (s @ y)).sum(dim=1).div(63).sub(exact).std().item()
    assert std["hadamard"] < 0.04 < 0.1 < std["rademacher"]


def test_hadamard_factored_cosines_are_closer_to_exact_at_r_near_d():
    """On the tiny model at r = 63 (its 64-wide sides nearly exact under hadamard) the factored cosines' mean error
    against autograd's exact ones is less than half rademacher's (measured 0.004 and 0.013); an unknown matrix is
    refused by its key."""
    tok, model, texts = tiny_with_norms()
    encoded, pad = [encode_text(tok, t, 40) for t in texts[:12]], tok.pad_token_id
    flat = [torch.cat([g[n].double().flatten() for n in sorted(g)]) for g in autograd_gradients(model, encoded, pad)]
    flat = torch.nn.functional.normalize(torch.stack(flat), dim=1)
    upper = torch.triu_indices(len(encoded), len(encoded), 1).unbind()
    error = {}
    for matrix in MATRICES:
        proj = make_projector(attribution(r_in=63, r_out=63, matrix=matrix), model)
        assert proj.spec()["matrix"] == matrix
        v = torch.nn.functional.normalize(project_examples(model, encoded, proj, pad).double(), dim=1)
        error[matrix] = (v @ v.T - flat @ flat.T)[upper].abs().mean().item()
    assert error["hadamard"] < 0.5 * error["rademacher"], error
    with pytest.raises(ValueError, match=r"attribution\.projector\.matrix: unknown 'gaussian'"):
        make_projector(attribution(matrix="gaussian"), model)


def test_rank_from_k_is_the_largest_that_fits_and_too_small_k_is_refused(setup):
    matrices, vectors = [(64, 32), (32, 64), (400, 32)], [32, 32]
    assert rank_for(3 * 16 + 32, matrices, vectors) == 4  # r = 4: 48 + 2 * 16 = 80
    assert rank_for(3 * 16 + 31, matrices, vectors) == 3
    proj = make_projector(attribution(k=4096), setup["model"])
    assert proj.k <= 4096 and proj.r_in == proj.r_out
    assert make_projector(attribution(k=4096, seed=1), setup["model"]).k == proj.k
    bigger = make_projector(attribution(k=8192), setup["model"])
    assert bigger.r_in > proj.r_in and bigger.k <= 8192
    with pytest.raises(ValueError, match=r"attribution\.projector\.k=3 is below one number per parameter tensor"):
        make_projector(attribution(k=3), setup["model"])
    with pytest.raises(ValueError, match=r"attribution\.projector\.r_in and r_out: give both"):
        make_projector(attribution(r_in=8), setup["model"])


def test_spec_differs_from_the_sketch_and_reports_coverage(setup):
    proj = make_projector(attribution("rapidin", r_in=16, r_out=16), setup["model"])
    spec = proj.spec()
    assert spec["kind"] == "factored" and spec["coverage"] == 1.0 and spec["normalize"] == "per_tensor"
    assert (spec["r_out"], spec["r_in"], spec["matrix"], spec["k"]) == (16, 16, "hadamard", proj.k)


def test_unreached_parameters_are_refused_unless_partial(setup):
    model = build_tiny(OmegaConf.create(TINY_OLMO3), setup["tok"]).eval()
    model.model.extra = torch.nn.Conv1d(2, 2, 1)  # a layer type the hooks do not know
    with pytest.raises(ValueError, match=r"do not reach model\.extra .*attribution\.projector\.partial=true"):
        make_projector(attribution(r_in=4, r_out=4), model)
    proj = make_projector(attribution(r_in=4, r_out=4, partial=True), model)
    assert 0.99 < proj.spec()["coverage"] < 1 and "model.extra.weight" not in proj.slots


# ------------------------------------------------------------------------------ end to end through train.py
KERNELS = ["cosine", "rapidin", "adam", "trackstar", "tracin_cp"]


@pytest.fixture(scope="module")
def factored_runs(tmp_path_factory):
    """`python train.py attribution/projector=factored attribution/kernel=<each>` on the small run, one epoch."""
    root = tmp_path_factory.mktemp("factored")
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1", "logger=none"]
    runs = {}
    for kernel in KERNELS:
        runs[kernel] = root / kernel
        extra = ["attribution.checkpoints=[1]"] if kernel in ("trackstar", "tracin_cp") else []
        out = subprocess.run(
            [
                sys.executable,
                "train.py",
                *overrides,
                *extra,
                "attribution/projector=factored",
                f"attribution/kernel={kernel}",
                f"hydra.run.dir={runs[kernel]}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_factored_runs_end_to_end_with_every_kernel(factored_runs, kernel):
    from safetensors import safe_open

    folder = factored_runs[kernel] / "attribution" / "epoch_001"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["kernel"]["name"] == kernel
    with safe_open(str(folder / "stores" / "test_queries.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert meta["projector"]["kind"] == "factored" and meta["projector"]["coverage"] == 1.0
    assert meta["projector"]["k"] <= 512 and meta["projector"]["kernel"]["name"] == kernel
    with safe_open(str(folder / "scores" / f"{metrics['ft_source']}.safetensors"), "pt") as f:
        scores = f.get_tensor("scores")
    assert scores.shape[0] == 12 and torch.isfinite(scores).all() and scores.abs().max() <= 1 + 1e-3
    if kernel == "tracin_cp":
        assert (factored_runs[kernel] / "attribution" / "tracin_cp" / "metrics.json").is_file()
