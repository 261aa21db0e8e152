"""The GPU-ready engine of kind=sketch (issue 13): a fold whose number of tensor operations does not grow with
P / k and gives the same vectors as the chunk-by-chunk fold it replaced, hash signs under a byte budget, bf16
numerics, and the benchmarks/fold_profile.py and benchmarks/gpu_check.sh scripts run end to end on the CPU."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_OLMO3
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from lark.data.datamodule import collate
from lark.data.formats import encode
from lark.kernel.build import project_examples
from lark.kernel.factory import make_projector
from lark.kernel.hashing import hashed, name_key, random_signs
from lark.kernel.projectors import ExactProjector, example_gradient, trainable
from lark.kernel.sketch import HookSketch
from lark.models import build_tiny, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


from tests.test_projector import CHAT, one_thread  # noqa: E402,F401  (autouse: one thread, as there)


class OneLinear(torch.nn.Module):
    def __init__(self, n_in=4, n_out=4):
        super().__init__()
        self.embed, self.proj = torch.nn.Embedding(10, n_in), torch.nn.Linear(n_in, n_out, bias=False)

    def get_input_embeddings(self):
        return self.embed


def chunk_by_chunk_fold(hook, out, name, part, start, numel):
    """The fold of projector version 1 as it was shipped (a Python loop over every k-chunk the block touches):
    the reference the new fold must reproduce bit for bit."""
    k = hook.k
    sign = random_signs(torch.arange(numel, dtype=torch.int64), name_key(hook.seed, name, "sign")).to(torch.int8)
    offsets = (
        hashed(torch.arange(-(-numel // k), dtype=torch.int64), name_key(hook.seed, name, "offset")) % k
    ).tolist()
    end = start + part.shape[1]
    for c in range(start // k, -(-end // k)):
        lo, hi = max(start, c * k), min(end, (c + 1) * k)
        pos = (offsets[c] + lo - c * k) % k
        head = min(hi - lo, k - pos)
        s = sign[lo:hi].float()
        out[:, pos : pos + head].addcmul_(part[:, lo - start : lo - start + head], s[:head])
        if hi - lo > head:
            out[:, : hi - lo - head].addcmul_(part[:, lo - start + head : hi - start], s[head:])
    return out


# (k, numel, start, width): whole parameters, blocks starting and ending mid-chunk, one coordinate, a partial last
# chunk, a block wrapping around the end of its chunk's buckets, k larger than the parameter
SHAPES = [
    (16, 100, 0, 100),
    (16, 100, 5, 40),
    (7, 50, 3, 1),
    (64, 1000, 63, 130),
    (100, 10_000, 250, 9_750),
    (100, 10_000, 250, 350),
    (37, 5_000, 1_000, 3_999),
    (4096, 1000, 0, 1000),
]


@pytest.mark.parametrize("k, numel, start, width", SHAPES)
@pytest.mark.parametrize("schedule", ["index", "slices", "auto"])
def test_fold_is_the_chunk_by_chunk_fold_bit_for_bit(k, numel, start, width, schedule):
    hook = HookSketch(OneLinear(), k, seed=3)
    hook.fold_schedule = schedule
    gen = torch.Generator().manual_seed(k + start)
    part, before = torch.randn(3, width, generator=gen), torch.randn(3, k, generator=gen)
    got = hook.fold_into(before.clone(), "w", part, start, numel)
    assert torch.equal(got, chunk_by_chunk_fold(hook, before.clone(), "w", part, start, numel))
    assert not torch.equal(got, before)


def test_fold_of_a_bf16_block_is_the_fold_of_its_float32_values():
    hook = HookSketch(OneLinear(), 64, seed=1)
    hook.fold_schedule = "index"
    part = torch.randn(2, 1000).bfloat16()
    got = hook.fold_into(torch.zeros(2, 64), "w", part, 24, 5000)
    assert got.dtype == torch.float32
    assert torch.equal(got, chunk_by_chunk_fold(hook, torch.zeros(2, 64), "w", part.float(), 24, 5000))


def test_sign_cache_stays_under_its_byte_budget_and_never_changes_a_vector():
    model = OneLinear(64, 32)
    part = torch.randn(2, 2048)
    vectors = []
    for budget in (0, 3000, 2**30):
        hook = HookSketch(model, 128, seed=2, cache_bytes=budget)
        for _ in range(2):  # the second call reads the cache, if any
            vectors.append(hook.fold_into(torch.zeros(2, 128), "w", part, 0, 2048))
            hook.fold_into(torch.zeros(2, 128), "v", part[:, :1000], 0, 1000)
        assert hook.cached_bytes == sum(s.numel() for key, s in hook.cache.items() if key[0] == "sign") <= budget
        assert hook.cached_bytes == {0: 0, 3000: 2048, 2**30: 3048}[budget]  # first come, first kept
    assert all(torch.equal(v, vectors[0]) for v in vectors)


def test_cache_bytes_is_the_config_key():
    from tests.conftest import compose

    cfg = compose(["attribution.projector.cache_bytes=12345"]).attribution
    assert make_projector(cfg, OneLinear()).cache_bytes == 12345
    default = compose().attribution
    assert make_projector(default, OneLinear()).cache_bytes == default.projector.cache_bytes > 0


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations (ATen kernels, i.e. device launches) dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def fold_ops(n_in, n_out, k, start_row=0, cache_bytes=2**30, schedule="index"):
    hook = HookSketch(OneLinear(n_in, n_out), k, seed=0, cache_bytes=cache_bytes)
    hook.fold_schedule = schedule
    part = torch.randn(2, (n_out - start_row) * n_in)
    hook.fold_into(torch.zeros(2, k), "w", part, start_row * n_in, n_in * n_out)  # warm-up: fills the cache
    with OpCounter() as counter:
        hook.fold_into(torch.zeros(2, k), "w", part, start_row * n_in, n_in * n_out)
    return counter.ops


@pytest.mark.parametrize("cache_bytes", [0, 2**30], ids=["signs hashed per block", "signs cached"])
def test_fold_launches_a_fixed_number_of_operations_whatever_p_over_k(cache_bytes):
    """The GPU's schedule (index), run here on the CPU: P / k from 8 to 2048 chunks (two layer widths, two k, a
    block starting mid-chunk) give the same count, which a loop over chunks (2 adds per chunk) would multiply
    by 256."""
    counts = {
        (n_in, n_out, k, r): fold_ops(n_in, n_out, k, r, cache_bytes)
        for n_in, n_out, k, r in [(64, 32, 256, 0), (256, 256, 256, 0), (256, 256, 32, 0), (256, 256, 32, 3)]
    }
    assert len({tuple(sorted(c.items())) for c in counts.values()}) == 1, counts
    ops = counts[64, 32, 256, 0]
    assert ops["aten.index_add_"] == 1 and "aten.addcmul_" not in ops
    assert sum(ops.values()) <= (50 if cache_bytes == 0 else 32)  # mostly the offsets' (and signs') hash


def test_auto_schedule_adds_slices_on_a_cpu():
    ops = fold_ops(64, 32, 512, schedule="auto")  # 2048 coordinates: 4 chunks, <= 2 slices each
    assert 4 <= ops["aten.addcmul_"] <= 8 and "aten.index_add_" not in ops


def test_unknown_fold_schedule_is_refused():
    hook = HookSketch(OneLinear(), 16)
    hook.fold_schedule = "gather"
    with pytest.raises(ValueError, match="fold_schedule"):
        hook.fold_into(torch.zeros(1, 16), "w", torch.ones(1, 16), 0, 16)


# ----------------------------------------------------------------------------- bf16: the GPU path's numerics


@pytest.fixture(scope="module")
def tiny(one_thread):  # noqa: F811 -- the fixture imported above
    from lark.data.formats import document_fields, qa_fields
    from lark.data.world import generate_world

    world = generate_world(seed=0, n_train=40, n_test=20, n_facts=30, n_medical_docs=100, n_entertainment_docs=20)
    tok = train_tokenizer([d["text"] for d in world.medical_docs + world.entertainment_docs], 400)
    torch.manual_seed(0)
    model = build_tiny(
        OmegaConf.create(TINY_OLMO3),
        tok,
    )
    with torch.no_grad():  # norm weights away from their initial 1, as in a trained model
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.eval()
    examples = [qa_fields(x, "{final_decision}") for x in world.test[:5]] + [
        document_fields(d) for d in world.medical_docs[:5]
    ]
    encoded = [encode(tok, e, CHAT, 128) for e in examples]
    params = trainable(model)
    grads = [example_gradient(model, collate([e], tok.pad_token_id), params)[1] for e in encoded]
    return {
        "model": model,
        "encoded": encoded,
        "pad": tok.pad_token_id,
        "grads": grads,
        "shapes": {n: tuple(p.shape) for n, p in params},
    }


def pair_cosines(v):
    u = v.double() / v.double().norm(dim=1, keepdim=True)
    i, j = torch.triu_indices(len(v), len(v), 1)
    return (u @ u.T)[i, j]


class DtypeLog(TorchDispatchMode):
    """(op, dtypes of its tensor arguments) of every operation dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func.overloadpacket), [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "how, method", [("none", "materialize"), ("per_tensor", "materialize"), ("none", "tensorsketch")]
)
def test_bf16_sketch_matches_the_float32_sketch_and_the_exact_cosines(tiny, how, method):
    """The sketch of a bf16 model (forward, backward and per-example GEMMs in bf16, sketches summed in float32)
    against the same weights in float32. Tolerances: each example's bf16 vector has cosine >= 0.999 with its
    float32 vector (measured >= 0.9999 on this model), pair cosines move by <= 0.02 (measured <= 0.005), and
    the max error against the exact cosines grows by <= 0.02 (measured: within +-0.003 either way)."""
    import copy

    from lark.kernel.normalizers import normalizer

    exact = pair_cosines(
        torch.stack([ExactProjector(tiny["shapes"]).project(normalizer(how)(g)) for g in tiny["grads"]])
    )
    bf16 = copy.deepcopy(tiny["model"]).to(torch.bfloat16)
    f32 = project_examples(
        tiny["model"], tiny["encoded"], HookSketch(tiny["model"], 8192, normalize=how, method=method), tiny["pad"]
    )
    hook = HookSketch(bf16, 8192, normalize=how, method=method)
    hook.block_elements = 2**12  # several row blocks per layer, as on a CPU's larger models
    with DtypeLog() as log:
        b16 = project_examples(bf16, tiny["encoded"], hook, tiny["pad"])
    assert b16.dtype == torch.float32 and torch.isfinite(b16).all()
    # the model's GEMMs and the per-example ones (bmm; TensorSketch's are float32 FFTs and Gram matrices) in bf16
    gemms = [d for op, d in log.calls if op in ("aten.mm", "aten.addmm")]
    assert gemms and all(torch.bfloat16 in d and torch.float32 not in d for d in gemms)
    if method == "materialize":  # per-example GEMMs in bf16; per_tensor's embedding-norm Gram e e^T is float32
        bmms = [d for op, d in log.calls if op == "aten.bmm"]
        assert any(d == [torch.bfloat16] * 2 for d in bmms)
        assert all(d == [torch.bfloat16] * 2 or (how == "per_tensor" and d == [torch.float32] * 2) for d in bmms)
    folds = [d for op, d in log.calls if op in ("aten.index_add_", "aten.addcmul_", "aten.add_", "aten.scatter_add_")]
    assert folds and all(d[0] == torch.float32 for d in folds)  # sums in float32
    assert torch.nn.functional.cosine_similarity(b16.double(), f32.double(), dim=1).min() >= 0.999
    assert (pair_cosines(b16) - pair_cosines(f32)).abs().max() <= 0.02
    assert (pair_cosines(b16) - exact).abs().max() <= (pair_cosines(f32) - exact).abs().max() + 0.02


@pytest.mark.parametrize("how", ["none", "per_tensor"])
def test_both_fold_schedules_give_the_same_vectors_end_to_end(tiny, how):
    """The GPU's schedule (one index_add_ per block) and the CPU's (slices), whole layers and cache-sized row
    blocks, end to end through project_examples: equal bit for bit for one blocking (per_tensor's norms add up
    per block, so two blockings agree to rounding)."""
    rows = {}
    for schedule in ("slices", "index"):
        for block in (2**40, 2**12):
            hook = HookSketch(tiny["model"], 1000, normalize=how, method="materialize")
            hook.fold_schedule, hook.block_elements = schedule, block
            rows[schedule, block] = project_examples(tiny["model"], tiny["encoded"], hook, tiny["pad"])
    for block in (2**40, 2**12):
        assert torch.equal(rows["index", block], rows["slices", block])
    torch.testing.assert_close(rows["index", 2**12], rows["index", 2**40], rtol=1e-5, atol=1e-6)
    if how == "none":
        assert torch.equal(rows["index", 2**12], rows["index", 2**40])
    assert rows["index", 2**40].norm(dim=1).min() > 0


# ----------------------------------------------------------------------------- the benchmark scripts
def run_script(*args, env=None):
    import os

    done = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_fold_profile_counts_the_same_fold_operations_at_two_k():
    """benchmarks/fold_profile.py on a tiny stack: the GPU schedule's fold operations per batch are the same at
    P / k x 8 apart; the chunk-by-chunk fold's grow with P / k."""
    import re

    out = run_script(
        sys.executable,
        "benchmarks/fold_profile.py",
        "--quick",
        "--layers",
        "1",
        "--hidden",
        "32",
        "--mlp",
        "64",
        "--heads",
        "2",
        "--seq",
        "8",
        "--repeats",
        "1",
        "--ks",
        "512",
        "64",
        "--dtype",
        "float32",
        "--threads",
        "1",
    )
    summary = dict(re.findall(r"(\w+)=([\d.]+)", out.strip().splitlines()[-1]))
    assert out.strip().splitlines()[-1].startswith("SUMMARY"), out
    assert int(summary["fold_ops_gpu_k512"]) == int(summary["fold_ops_gpu_k64"]) > 0
    assert int(summary["fold_ops_chunk_loop_k64"]) > 4 * int(summary["fold_ops_chunk_loop_k512"])
    assert 0 < float(summary["speed_vs_train_step"]) < 10 and 0 <= float(summary["fold_share"]) < 1


def test_gpu_check_runs_end_to_end_on_the_cpu():
    """benchmarks/gpu_check.sh --device cpu on the tiny OLMo-3 config, in bf16 (the GPU run's dtype): every row
    of the table, a SUMMARY line, and the sketch's fidelity against the exact cosines (k >> P here, so errors are
    the sketch's collisions and bf16 rounding only)."""
    import re

    out = run_script(
        "bash",
        "benchmarks/gpu_check.sh",
        "--device",
        "cpu",
        "--configs",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--repeats",
        "1",
        "--rapidin-repeats",
        "1",
        "--fidelity-examples",
        "3",
        "--parts",
        "engine",  # the end-to-end part: tests/test_gpu_check.py
        env={"PYTHON": sys.executable},
    )
    rows = re.findall(
        r"^tiny\s+(\S.*?)\s+(-|\d+)\s+([\d.]+)\s+([\d.]+)\s+(nan|[\d.]+)\s+(nan|[\d.]+)\s+"
        r"(nan|[\d.]+)\s+(nan|[\d.]+)$",
        out,
        re.M,
    )
    labels = [r[0] for r in rows]
    assert labels == [
        "train step (AdamW)",
        "floor (no weight GEMMs)",
        "sketch none",
        "sketch per_tensor",
        "sketch none (all signs cached)",
        "rapidin per_tensor",
        "factored none",
        "factored per_tensor",
        "factored none 16x16",
    ], out
    for label, k, ex, speed, *_, err_max, err_mean in rows[1:]:
        assert float(ex) > 0 and float(speed) > 0, (label, out)
        if k != "-":  # a projector: its k, and its cosines near the exact ones (16 x 16 per module: k = 4,672)
            bound = 0.1 if label.startswith("factored") else 0.05
            assert 0 <= float(err_mean) <= float(err_max) < bound and int(k) > 4000, (label, out)
    assert re.search(r"^SUMMARY device=cpu config=tiny sketch_vs_train_step=[\d.]+ .*seconds=\d+$", out, re.M)


# ----------------------------------------------------------------------------- sketch_math against dense references
def dense_rotated_sketch(numel, k, offset_key, sign_key):
    """The rotated-chunk count sketch as a [numel, k] float64 matrix, coordinate by coordinate: coordinate i (chunk
    c = i // k) goes to bucket (offset_c + i mod k) mod k with its sign."""
    matrix = torch.zeros(numel, k, dtype=torch.float64)
    for i in range(numel):
        offset = int(hashed(torch.tensor([i // k]), offset_key)) % k
        matrix[i, (offset + i % k) % k] = float(random_signs(torch.tensor([i]), sign_key))
    return matrix


@pytest.mark.parametrize("k, numel, start, width", [(8, 50, 0, 50), (8, 50, 5, 30), (7, 40, 13, 1), (16, 10, 0, 10)])
def test_fold_schedules_are_the_dense_rotated_chunk_sketch(k, numel, start, width):
    from lark.kernel.sketch_math import chunk_offsets, fold_index, fold_slices, rotated_buckets

    offset_key, sign_key = name_key(0, "w", "offset"), name_key(0, "w", "sign")
    dense = dense_rotated_sketch(numel, k, offset_key, sign_key)
    part = torch.randn(3, width, generator=torch.Generator().manual_seed(numel + start))
    sign = random_signs(torch.arange(start, start + width), sign_key).to(torch.int8)
    offsets = chunk_offsets(start // k, -(-(start + width) // k), offset_key, k, "cpu")
    by_index = fold_index(torch.zeros(3, k), part, sign, offsets, start, torch.empty(3, width))
    by_slices = fold_slices(torch.zeros(3, k), part, sign, offsets, start)
    want = part.double() @ dense[start : start + width]
    torch.testing.assert_close(by_index.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(by_index, by_slices)  # the same sums in the same order on a CPU
    buckets = rotated_buckets(torch.arange(numel), offset_key, k)  # the embedding's buckets: the same rotation
    assert torch.equal(buckets, dense.abs().argmax(dim=1))


def test_tensorsketch_is_the_dense_tensor_sketch_of_the_per_example_gradient():
    """Coordinate (i, j) of G_b = Delta_b^T X_b goes to bucket (h1(i) + h2(j)) mod k with sign s1(i) s2(j)."""
    from lark.kernel.sketch_math import axis_hash, frobenius, tensorsketch

    gen, k = torch.Generator().manual_seed(0), 11
    delta, x = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 4, generator=gen)
    (b1, s1), (b2, s2) = axis_hash(3, 11, 12, k, "cpu"), axis_hash(4, 13, 14, k, "cpu")
    g = (delta.transpose(1, 2) @ x).double()  # [2, out, in]
    want = torch.zeros(2, k, dtype=torch.float64)
    for i in range(3):
        for j in range(4):
            want[:, (b1[i] + b2[j]) % k] += s1[i] * s2[j] * g[:, i, j]
    torch.testing.assert_close(tensorsketch(delta, x, (b1, s1), (b2, s2), k).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frobenius(delta, x).double(), g.square().sum(dim=(1, 2)), rtol=1e-5, atol=1e-5)


def test_block_squares_and_blocked_gemm_rebuild_the_per_example_gradient():
    from lark.kernel.sketch_math import BlockedGemm, block_squares, blocks_of

    gen = torch.Generator().manual_seed(1)
    delta, x = torch.randn(2, 4, 5, generator=gen), torch.randn(2, 4, 3, generator=gen)
    gemm = BlockedGemm(delta, x, 2, lambda shape, like: torch.empty(shape, dtype=like.dtype))
    flat = (delta.transpose(1, 2) @ x).flatten(1)  # [2, 15]
    blocks, numel = blocks_of(gemm)
    seen = [(part.clone(), start) for part, start in blocks]
    assert numel == 15 and [s for _, s in seen] == [0, 6, 12] and [p.shape[1] for p, _ in seen] == [6, 6, 3]
    torch.testing.assert_close(torch.cat([p for p, _ in seen], dim=1), flat)
    torch.testing.assert_close(block_squares(flat), flat.double().square().sum(dim=1).float())
    assert block_squares(flat.bfloat16()).dtype == torch.float32
    assert blocks_of(flat)[1] == 15 and list(blocks_of(flat)[0])[0][1] == 0


def embedding_gradient(tokens, grad, vocab):
    """dL/dE [B, V, d] materialised: row v sums the positions of token v."""
    out = torch.zeros(tokens.shape[0], vocab, grad.shape[-1], dtype=torch.float64)
    for b in range(tokens.shape[0]):
        out[b].index_add_(0, tokens[b], grad[b].double())
    return out


def test_embedding_sketch_and_squares_are_those_of_the_materialised_gradient():
    """Repeated tokens add up in one row; the padding row gets nothing; a tied output layer's part b adds the
    cross term 2 <a, b> (rows_at_tokens = b at the input tokens)."""
    from lark.kernel.sketch_math import embedding_sketch, embedding_squares, rows_at_tokens, without_padding

    gen, vocab, d, k = torch.Generator().manual_seed(2), 6, 3, 5
    tokens = torch.tensor([[1, 4, 1, 0], [2, 2, 2, 5]])
    grad = without_padding(torch.randn(2, 4, d, generator=gen), tokens, padding_idx=0)
    assert torch.equal(grad[0, 3], torch.zeros(d)) and grad[1].abs().min() > 0
    offset_key, sign_key = name_key(0, "e", "offset"), name_key(0, "e", "sign")
    a = embedding_gradient(tokens, grad, vocab)  # [2, V, d]
    want = a.flatten(1) @ dense_rotated_sketch(vocab * d, k, offset_key, sign_key)
    torch.testing.assert_close(embedding_sketch(tokens, grad, offset_key, sign_key, k).double(), want)
    torch.testing.assert_close(embedding_squares(tokens, grad).double(), a.square().sum(dim=(1, 2)))
    delta, x = torch.randn(2, 4, vocab, generator=gen), torch.randn(2, 4, d, generator=gen)
    b = (delta.transpose(1, 2) @ x).double()  # the output layer's per-example gradient [2, V, d]
    rows = rows_at_tokens(tokens, delta, x)
    torch.testing.assert_close(rows.double(), torch.stack([b[i][tokens[i]] for i in range(2)]))
    tied = embedding_squares(tokens, grad, rows).double() + b.square().sum(dim=(1, 2))
    torch.testing.assert_close(tied, (a + b).square().sum(dim=(1, 2)))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_gradients_are_autograds_per_example_gradients(norm):
    from lark.kernel.sketch_math import NORMS, norm_gradients

    torch.manual_seed(3)
    layer = torch.nn.LayerNorm(4) if norm == "layernorm" else torch.nn.RMSNorm(4)
    assert isinstance(layer, NORMS)
    bias = getattr(layer, "bias", None)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        if bias is not None:
            bias.normal_()
    h, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)  # g: d loss / d out
    weight_grad, bias_grad = norm_gradients(g, layer(h).detach(), layer.weight, bias)
    params = [p for p in (layer.weight, bias) if p is not None]
    for b in range(2):
        want = torch.autograd.grad((layer(h[b : b + 1]) * g[b : b + 1]).sum(), params)
        torch.testing.assert_close(weight_grad[b], want[0], rtol=1e-4, atol=1e-5)
        if norm == "layernorm":
            torch.testing.assert_close(bias_grad[b], want[1])
    assert (bias_grad is None) == (norm == "rmsnorm")


def test_per_example_loss_is_the_loss_of_each_example_alone():
    """A batch of one gives HF's loss (mean over the shifted loss tokens); an example without loss tokens is NaN."""
    from lark.kernel.sketch_math import per_example_loss

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 7, generator=gen)
    labels = torch.tensor([[-100, 2, 3, -100, 1], [4, 4, 4, 4, 4], [5, -100, -100, -100, -100]])
    got = per_example_loss(logits, labels)
    for b in range(2):
        want = torch.nn.functional.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100)
        torch.testing.assert_close(got[b], want)
    assert torch.isnan(got[2])  # its only label is the first token, which nothing predicts


def test_a_pass_by_parameter_sums_to_the_pass_and_divides_a_tied_weight_once():
    """SketchPass: each parameter's share adds up to the total; under per_tensor a tied weight's two parts are
    divided once, by the norm of their sum, at finish()."""
    from lark.kernel.normalizers import NoNorm, PerTensor
    from lark.kernel.sketch_math import SketchPass

    hook = HookSketch(OneLinear(), 8, seed=0)
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(2, 12, generator=gen) for _ in range(3))
    totals = {}
    for by_parameter in (False, True):
        run = SketchPass(
            torch.zeros(2, 3, dtype=torch.long), 8, NoNorm(), hook.fold_into, hook.scratch, None, by_parameter
        )
        run.add("a", "flat", a), run.add("b", "flat", b), run.finish()
        totals[by_parameter] = run.total
        if by_parameter:
            torch.testing.assert_close(run.parts["a"], hook.sketch_flat("a", a))
    torch.testing.assert_close(totals[True], totals[False])
    run = SketchPass(torch.zeros(2, 3, dtype=torch.long), 8, PerTensor(), hook.fold_into, hook.scratch, "t")
    # a tied weight's parts: the output layer's (flat: its squares come from the fold) and the embedding's (a
    # sketch, with ||c||^2 + 2 <b, c> as embedding_squares gives it): nothing is added before finish()
    run.add("t", "flat", b)
    run.add("t", "sketch", hook.sketch_flat("t", c), c.square().sum(dim=1) + 2 * (b * c).sum(dim=1))
    assert run.total.abs().max() == 0
    run.add("a", "flat", a)
    run.finish()
    norm = (b + c).norm(dim=1, keepdim=True)  # ||b + c||, once
    want = hook.sketch_flat("a", a / a.norm(dim=1, keepdim=True)) + hook.sketch_flat("t", (b + c) / norm)
    torch.testing.assert_close(run.total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.norms["t"], norm[:, 0])
    torch.testing.assert_close(run.norms["a"], a.norm(dim=1))


def test_projecting_leaves_the_model_in_its_mode_after_an_error(tiny):
    """project_examples runs in eval mode (no dropout) and gives the model back in the mode it came in: after a
    batch that raises too (it left a training model in eval mode, its dropout off for the rest of the epoch)."""

    class Failing(HookSketch):
        def project_batch(self, model, batch):
            assert not model.training  # dropout off while projecting
            raise RuntimeError("a batch that fails")

    model = tiny["model"]
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(RuntimeError, match="a batch that fails"):
            project_examples(model, tiny["encoded"], Failing(model, 256), tiny["pad"])
        assert model.training is mode
    model.eval()
