"""The fused fold (lark.kernel.fold_triton, CUDA's default schedule) against its PyTorch references fold_slices and
fold_index, on a CPU under Triton's interpreter (issue 20, item 2), and the `attribution.projector.fold` key.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when lark.kernel.fold_triton is first imported, and
this pytest process has imported it already (through lark.kernel.sketch) without it. So the interpreted folds run
in one child process (this file run as a module with TRITON_INTERPRET=1; FOLDS and the tiny model are rebuilt there
from seeds) and come back as tensors; the references and the asserts run here."""

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lark.errors import ConfigError
from lark.kernel import fold_triton
from lark.kernel.factory import make_projector
from lark.kernel.hashing import name_key, random_signs
from lark.kernel.sketch import HookSketch
from lark.kernel.sketch_math import chunk_offsets, fold_index, fold_schedule, fold_slices

ROOT = Path(__file__).resolve().parents[1]

# (k, numel, start, width, B, dtype, block_k, examples_per_program, unroll): a block starting mid-chunk that
# wraps, a block narrower than k, one spanning 33 chunks, a whole parameter, k not a power of two (a part-empty
# last tile, more examples per program than rows), an odd k, k larger than the parameter, one coordinate, and flat
# indices beyond 2^32 (int64 index arithmetic, the hash of the index mod 2^32); unrolled walks ending mid-step
CASES = [
    (64, 1000, 63, 130, 3, torch.float32, 16, 1, 2),
    (64, 100, 5, 40, 1, torch.bfloat16, 64, 1, 1),
    (64, 10_000, 250, 2_000, 3, torch.bfloat16, 64, 4, 4),
    (128, 640, 0, 640, 1, torch.float32, 128, 1, 1),
    (100, 10_000, 250, 350, 3, torch.float32, 32, 4, 1),
    (37, 5_000, 1_000, 600, 2, torch.float32, 16, 2, 2),
    (4096, 1_000, 0, 1_000, 1, torch.float32, 1024, 1, 1),
    (7, 50, 3, 1, 1, torch.float32, 8, 1, 1),
    (64, 5_000_000_400, 5_000_000_005, 300, 2, torch.bfloat16, 32, 2, 3),
]
# (dtype, normalize, HookSketch.block_elements): whole layers, and blocks of 12 rows x 16 (192 coordinates: most
# start mid-chunk)
MODEL_RUNS = [("float32", "none", 2**40)] + [
    (d, n, 2**8) for d in ("float32", "bfloat16") for n in ("none", "per_tensor")
]

# benchmarks/fold_profile.py --fold-only at a tiny shape, run in the child: its triton rows (CUDA's tile shapes to
# time) checked against the index row
PROFILE_ARGS = ["--fold-only", "--fold-shape", "2", "16", "20", "--ks", "64", "8", "--repeats", "1", "--dtype",
                "bfloat16", "--device", "cpu"]  # fmt: skip


def case_inputs(i):
    """(out before the fold, part, offset key, sign key) of CASES[i], from seeds."""
    k, _, _, width, b, dtype, *_ = CASES[i]
    gen = torch.Generator().manual_seed(i)
    part, before = torch.randn(b, width, generator=gen).to(dtype), torch.randn(b, k, generator=gen)
    return before, part, name_key(i, "w", "offset"), name_key(i, "w", "sign")


def tiny_model(dtype):
    """A random-init one-layer OLMo-3 (untied output layer, norms away from 1) and a batch of 2 x 12 tokens: every
    parameter a few k = 256 chunks (the interpreter runs a chunk of a program in ~20 ms)."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    torch.manual_seed(0)
    config = Olmo3Config(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=None, eos_token_id=1, tie_word_embeddings=False)  # fmt: skip
    model = Olmo3ForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(2, 48, (2, 12), generator=torch.Generator().manual_seed(1))
    return model.to(getattr(torch, dtype)).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                    "labels": ids}  # fmt: skip


def project(fold, dtype, normalize, block):
    """[B, k] sketch of the tiny model's batch with fold schedule `fold`, and the bytes of signs it cached."""
    model, batch = tiny_model(dtype)
    hook = HookSketch(model, 256, seed=5, normalize=normalize, method="materialize", fold=fold)
    hook.block_elements = block
    return hook.project_batch(model, batch), hook.cached_bytes


def interpreted():
    """What the child process computes: the triton fold of every case, and the tiny model's sketches."""
    folds = []
    for i, (_, _, start, _, _, _, block_k, per_program, unroll) in enumerate(CASES):
        before, part, okey, skey = case_inputs(i)
        folds.append(fold_triton.fold(before, part, start, okey, skey, block_k, per_program, unroll))
    script = importlib.util.spec_from_file_location("fold_profile", ROOT / "benchmarks" / "fold_profile.py")
    profile, text = importlib.util.module_from_spec(script), io.StringIO()
    script.loader.exec_module(profile)
    with contextlib.redirect_stdout(text):
        profile.main(PROFILE_ARGS)
    return {"folds": folds, "models": [project("triton", *run) for run in MODEL_RUNS], "profile": text.getvalue()}


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    if not fold_triton.available():
        pytest.skip("triton is not installed (the dev extra installs it)")
    out = tmp_path_factory.mktemp("fold_triton") / "interpreted.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.test_fold_triton", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return torch.load(out)


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"k{c[0]}-start{c[2]}-width{c[3]}-B{c[4]}" for c in CASES])
def test_triton_fold_is_the_reference_fold_bit_for_bit(child, i):
    """Same float32 sums, added chunk by chunk in the same order as fold_slices (and, on a CPU, fold_index)."""
    k, _, start, width, *_ = CASES[i]
    before, part, okey, skey = case_inputs(i)
    sign = random_signs(torch.arange(start, start + width), skey).to(torch.int8)
    offsets = chunk_offsets(start // k, -(-(start + width) // k), okey, k, "cpu")
    slices = fold_slices(before.clone(), part, sign, offsets, start)
    index = fold_index(before.clone(), part, sign, offsets, start, torch.empty(part.shape))
    got = child["folds"][i]
    assert got.dtype == torch.float32 and got.shape == before.shape
    assert torch.equal(got, slices) and torch.equal(got, index)
    assert not torch.equal(got, before)


@pytest.mark.parametrize("j", range(len(MODEL_RUNS)), ids=["-".join(map(str, r)) for r in MODEL_RUNS])
def test_sketch_with_the_triton_fold_is_the_sketch_with_slices(child, j):
    """A tiny OLMo-3 projected end to end (project_batch: every Linear layer and norm through fold_into, whole or in
    blocks starting mid-chunk, bf16 or float32, per_tensor or not) with fold=triton equals fold=slices exactly,
    and the triton fold keeps no sign cache."""
    got, cached = child["models"][j]
    want, _ = project("slices", *MODEL_RUNS[j])
    assert cached == 0
    assert torch.isfinite(want).all() and want.norm(dim=1).min() > 0
    assert torch.equal(got, want)


def test_fold_profile_times_every_schedule_and_they_agree(child):
    """The rows benchmarks/fold_profile.py --fold-only will time on CUDA: every schedule (triton at seven tile
    shapes and unrolls, here interpreted and marked so) gives the index row's vector exactly; SUMMARY names each
    schedule."""
    lines = child["profile"].splitlines()
    rows = [line for line in lines if line.startswith(("index", "slices", "triton"))]
    assert len(rows) == 10 and sum("(interpreted)" in r for r in rows) == 7
    assert all(float(r.split()[-1]) == 0 for r in rows)
    assert re.search(r"^SUMMARY fold device=cpu batch=2 .*index_ms=[\d.]+ slices_ms=[\d.]+ triton_interpreted_ms=",
                     lines[-1])  # fmt: skip


@pytest.mark.parametrize("part, block_b, block_k, unroll", [("*bf16", 1, 1024, 1), ("*fp32", 4, 512, 2)])
def test_the_kernel_compiles_for_a_gpu_without_atomics(part, block_b, block_k, unroll):
    """What the interpreter cannot check: Triton's compiler takes the kernel to an sm_90 (H100/H200) cubin here,
    without a GPU, and its PTX has no atomic instruction."""
    if not fold_triton.available() or fold_triton.INTERPRETED:
        pytest.skip("needs triton's compiler (installed, not under TRITON_INTERPRET=1)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = dict.fromkeys(["n_rows", "k", "width", "first", "last", "out_stride", "part_stride"], "i32")
    signature = {"out_ptr": "*fp32", "part_ptr": part, **ints, "start": "i64", "offset_key": "i64", "sign_key": "i32"}
    signature = {name: signature.get(name, "constexpr") for name in fold_triton._fold_kernel.arg_names}
    source = ASTSource(
        fold_triton._fold_kernel, signature, constexprs={"BLOCK_B": block_b, "BLOCK_K": block_k, "UNROLL": unroll}
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and "ld.global" in ptx and "st.global" in ptx
    assert not re.search(r"\b(atom|red)\.", ptx)  # no atomic add, no reduction to global memory


def test_fold_is_a_config_key_resolved_per_device():
    from tests.conftest import compose

    for fold in ("slices", "index", "auto"):
        cfg = compose([f"attribution.projector.fold={fold}"]).attribution
        assert make_projector(cfg, tiny_model("float32")[0]).fold_schedule == fold
    assert compose().attribution.projector.fold == "auto"
    assert fold_schedule("auto", torch.device("cpu")) == "slices"
    cuda = "triton" if fold_triton.available() else "index"
    assert fold_schedule("auto", torch.device("cuda")) == cuda
    assert fold_schedule("index", torch.device("cuda")) == "index"


def test_a_bad_fold_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"attribution\.projector\.fold: unknown 'gather'"):
        HookSketch(tiny_model("float32")[0], 16, fold="gather")
    if fold_triton.INTERPRETED:
        pytest.skip("this process runs triton's interpreter: triton folds CPU tensors")
    hook = HookSketch(tiny_model("float32")[0], 16, fold="triton")  # the model may move to CUDA before it folds
    with pytest.raises(ConfigError, match=r"attribution\.projector\.fold=triton: .*cpu.*TRITON_INTERPRET=1"):
        hook.fold_into(torch.zeros(1, 16), "w", torch.ones(1, 16), 0, 16)


def test_without_triton_the_module_imports_and_auto_falls_back(monkeypatch):
    """A CPU torch wheel ships no triton: fold_triton imports (a child process where `import triton` fails), auto
    is index on CUDA, and fold=triton is refused by its key."""
    code = "import sys; sys.modules['triton'] = None; from lark.kernel import fold_triton as f; print(f.available())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
    monkeypatch.setattr(fold_triton, "triton", None)  # what the import guard leaves here
    assert not fold_triton.usable(torch.device("cuda"))
    assert fold_schedule("auto", torch.device("cuda")) == "index"
    with pytest.raises(ConfigError, match=r"attribution\.projector\.fold=triton: triton is not installed"):
        fold_schedule("triton", torch.device("cuda"))


if __name__ == "__main__":  # the child of the `child` fixture, under TRITON_INTERPRET=1
    assert fold_triton.INTERPRETED, "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    torch.save(interpreted(), sys.argv[1])
