"""The rotated-chunk count sketch's fold as one Triton kernel: CUDA's schedule (attribution.projector.fold=triton,
the default there), without atomics, hashing bucket rotations and signs in registers.

The same sums as lark.kernel.sketch_math.fold_index / fold_slices (the PyTorch references, beside it in the sense
of Liger-Kernel's habit: one kernel file, its reference, a test under the interpreter): out [B, k] float32 += the
rotated-chunk count sketch of part [B, width] (bf16 or float32), the flat coordinates [start, start + width) of a
parameter. Coordinate i of chunk c = i // k lands in bucket (offset_c + i mod k) mod k with sign s_i, where
offset_c = hashed(c, offset_key) % k and s_i = random_signs(i, sign_key) (lark.kernel.hashing: MurmurHash3's
finaliser of index * GOLDEN + key, reproduced here in uint32 arithmetic).

Schedule: program (e, j) owns buckets [j * BLOCK_K, (j + 1) * BLOCK_K) of examples [e * BLOCK_B, (e + 1) *
BLOCK_B). It loads that tile of `out` once, walks the chunks the block touches in order (UNROLL per step: the same
sums, more loads in flight), and for each chunk loads the source range that rotates into its buckets (position
p = bucket - offset_c mod k: contiguous but for one wrap), adds it with its sign hashed from (sign_key, flat
index) in registers (shared by the tile's examples), and stores the tile once. No index tensor, no signed float32
copy, no sign cache (what index_add_ needed: 33% + 18% of the GPU's time at 7B, issue 20), and the sums are added
chunk by chunk in float32 like fold_slices': on a CPU (interpreter) the two agree bit for bit (tested), and on a
GPU the fold repeats itself exactly by construction (not yet run on one), which index_add_'s atomics do not (the
embedding and TensorSketch sketches still add with scatter_add_ / index_add_: a GPU store as a whole can differ
in its last bits from run to run).
Compiled for sm_90 here, without a GPU (cuobjdump): 40 registers at one example per program (86 at UNROLL 4, 144
at 4 examples x UNROLL 4), no spills, 16-bit scalar loads -- a rotation starts anywhere, so no vector load can be
proven aligned.

Fusing the fold into the per-example GEMM's epilogue (considered, not built; nothing here measured it). G_b =
Delta_b^T X_b is written once (bf16) and read once by this kernel; an epilogue would save both passes. But a GEMM
tile of G [BM rows, BN columns] spans BM * BN coordinates of up to BM * in / k + 1 chunks, each rotated by its own
offset, so its sums land in buckets that every other tile also adds into: the epilogue must either add with
atomics into out[b] (k float32 per example, L2-resident: 45M reductions per example for one 7B MLP matrix, and the
run-to-run rounding this kernel removes) or own a bucket tile as here and compute the G entries rotating into it,
which for BLOCK_K <= in are one or two partial rows of G per chunk -- a [1, T] x [T, BLOCK_K] product per chunk
(no tensor-core shape), reading X_b `out` times in all: T times the bytes of reading a materialised G. The atomic
epilogue (a Triton batched GEMM, grid (b, m, n), tl.atomic_add of each rotated, signed tile row) is the candidate
worth measuring on the next GPU run against bmm + this fold (0.55 + 0.44 ms for 8 x 11008 x 4096 on an H200, issue
20's prototype).

Import-safe without triton (CPU wheels of torch do not ship it): available() says whether it can run at all,
usable(device) whether it can run on tensors of that device (CUDA, or any device under TRITON_INTERPRET=1, which
Triton reads when the kernel is decorated, i.e. when this module is imported)."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU torch wheel: the triton schedule is unavailable, the others are not affected
    triton = None

if triton is not None:

    @triton.jit
    def _hashed(index, key):
        """lark.kernel.hashing.hashed in uint32: mix32(index * GOLDEN + key mod 2^32) (MurmurHash3 fmix32)."""
        x = tl.cast(index, tl.uint32) * 0x9E3779B1 + tl.cast(key, tl.uint32)
        x = x ^ (x >> 16)
        x = x * 0x85EBCA6B
        x = x ^ (x >> 13)
        x = x * 0xC2B2AE35
        return x ^ (x >> 16)

    # a block's start, width, chunk range and keys vary per call: not specialised on (one compilation, not dozens)
    @triton.jit(do_not_specialize=["start", "width", "first", "last", "offset_key", "sign_key"])
    def _fold_kernel(
        out_ptr,
        part_ptr,
        n_rows,
        k,
        start,
        width,
        first,
        last,
        offset_key,
        sign_key,
        out_stride,
        part_stride,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        buckets = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok, bucket_ok = rows < n_rows, buckets < k
        tile = out_ptr + rows.to(tl.int64)[:, None] * out_stride + buckets[None, :]
        tile_ok = row_ok[:, None] & bucket_ok[None, :]
        acc = tl.load(tile, mask=tile_ok, other=0.0)
        source = part_ptr + rows.to(tl.int64)[:, None] * part_stride
        for c0 in range(first, last, UNROLL):  # the chunks the block touches, in order (fold_slices' order of sums),
            for u in tl.static_range(UNROLL):  # UNROLL at a time: their loads are independent, may be in flight at once
                c = c0 + u
                offset = (_hashed(c, offset_key) % tl.cast(k, tl.uint32)).to(tl.int32)
                pos = buckets - offset
                pos = tl.where(pos < 0, pos + k, pos)  # the chunk position rotated into each bucket
                index = tl.cast(c, tl.int64) * k + pos  # its flat coordinate (past the block for c >= last: masked)
                ok = bucket_ok & (index >= start) & (index < start + width)
                x = tl.load(source + (index - start)[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)
                positive = (_hashed(index, sign_key) & 1) != 0
                acc += tl.where(positive[None, :], x.to(tl.float32), -x.to(tl.float32))
        tl.store(tile, acc, mask=tile_ok)


INTERPRETED = triton is not None and type(_fold_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1


def available():
    """Whether triton is importable here."""
    return triton is not None


def usable(device):
    """Whether fold() can run on tensors of `device` (a torch.device): CUDA with triton, or under the interpreter."""
    return triton is not None and (INTERPRETED or device.type == "cuda")


def fold(out, part, start, offset_key, sign_key, block_k=1024, examples_per_program=1, unroll=1, num_warps=4):
    """out [B, k] float32 += the rotated-chunk count sketch of part [B, width] (float32 or bf16), the coordinates
    [start, start + width) of a parameter whose chunk offsets and signs are keyed by offset_key and sign_key
    (lark.kernel.hashing.name_key(seed, name, "offset" / "sign")). Tiles: block_k buckets (a power of two, capped
    at k's) of examples_per_program examples per program, walking `unroll` chunks per step (the same sums in the
    same order; more loads in flight). The defaults are issue 20's prototype (0.44 ms on an H200 for 8 x 11008 x
    4096 bf16); benchmarks/fold_profile.py --fold-only times the others. Returns out."""
    if not usable(out.device):
        raise RuntimeError(f"lark.kernel.fold_triton.fold: triton cannot run on {out.device} here")
    (b, k), width = out.shape, part.shape[1]
    if out.dtype != torch.float32 or out.stride(1) != 1 or part.shape[0] != b:
        raise ValueError(
            f"fold: out must be a float32 [B, k] with unit column stride, part [B, width]; got "
            f"{tuple(out.shape)} {out.dtype}, {tuple(part.shape)}"
        )
    part = part if part.stride(1) == 1 else part.contiguous()
    block_k = min(block_k, triton.next_power_of_2(k))
    block_b = min(examples_per_program, triton.next_power_of_2(b))
    grid = (triton.cdiv(b, block_b), triton.cdiv(k, block_k))
    first, last = start // k, -(-(start + width) // k)
    args = (b, k, start, width, first, last, offset_key, sign_key, out.stride(0), part.stride(0))
    _fold_kernel[grid](out, part, *args, BLOCK_B=block_b, BLOCK_K=block_k, UNROLL=unroll, num_warps=num_warps)
    return out
