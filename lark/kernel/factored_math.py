"""The `factored` projector's math on tensors (lark.kernel.factored): its random sides, a side's product, the exact
squared norm of a factored gradient, a 1-D parameter's slot, and the blocks by position its hooks keep for the
token pass (lark.kernel.tokens_kept)."""

from dataclasses import dataclass

import torch

from lark.kernel.sketch_math import axis_hash, frobenius, norm_gradients, tensorsketch

GEMM_COLUMNS = 16  # a side's S^T is zero-padded to a multiple of this many columns (not a knob: same numbers)


class Side:
    """One random side of a module, kept between batches: S^T [d, r'] (S [r, d] of +-1 in the model's dtype)
    zero-padded to r' = a multiple of GEMM_COLUMNS, the operand of x @ S^T. The padding changes no number, only
    speed: a skinny GEMM whose column count is not a multiple of 16 runs at half speed or worse (MKL, 2 cores:
    [1024, 2048] @ [2048, 31] 2.0 ms, @ [2048, 32] 1.0 ms; r = 31 is what k = 65,536 gives the 42M model)."""

    def __init__(self, signs):
        self.r, d = signs.shape
        width = -(-self.r // GEMM_COLUMNS) * GEMM_COLUMNS
        self.operand = signs.new_zeros(d, width)
        self.operand[:, : self.r] = signs.T

    def rows(self, index):
        """P's columns at `index` (e.g. the tokens of an embedding's out side) [..., r]."""
        return self.operand[index][..., : self.r]


def project_side(x, side):
    """x [..., d] -> x S^T [..., r] in x's dtype (a Side, x in the side's dtype), or x itself when side is None
    (identity)."""
    return x if side is None else (x @ side.operand)[..., : side.r]


def weight_squares(delta, x):
    """[B] exact ||sum_t delta_t x_t^T||_F^2: the Gram identity (sketch_math.frobenius, T^2 (in + out) per example)
    when it is cheaper than forming G (T in out), else from G itself. delta [B, T, out], x [B, T, in]."""
    t, n_out, n_in = delta.shape[1], delta.shape[-1], x.shape[-1]
    if t * (n_in + n_out) < n_in * n_out:
        return frobenius(delta.float(), x.float())
    return torch.bmm(delta.float().transpose(1, 2), x.float()).square().sum(dim=(1, 2))


def vector_slot(value, size, bucket_key, sign_key):
    """A 1-D parameter's per-example gradients value [B, n] -> [B, size]: themselves when n <= size, else their
    count sketch (coordinate i to bucket hash(i) mod size with sign s(i); unbiased inner products)."""
    n = value.shape[1]
    if n <= size:
        return value.float()
    bucket, sign = axis_hash(n, bucket_key, sign_key, size, value.device)
    return torch.zeros(value.shape[0], size, device=value.device).index_add_(1, bucket, value.float() * sign)


# ------------------------------------------------------------------------------ blocks by position
@dataclass
class Factors:
    """A factored matrix's block by position: sum_s scale a_s c_s^T, a [..., T, r_out], c [..., T, r_in]."""

    a: torch.Tensor
    c: torch.Tensor
    scale: float

    def numel(self):
        return self.a.numel() + self.c.numel()


@dataclass
class Rows:
    """The TensorSketched input embedding's block by position (sketch_math.embedding_tensorsketch): position s adds
    scale * e_s [d] at buckets (h1(tok_s) + h2(j)) mod size with signs s1(tok_s) s2(j); tokens [..., T], e [..., T,
    d] (d numbers per position where its slot takes size)."""

    tokens: torch.Tensor
    e: torch.Tensor
    out_hash: tuple
    in_hash: tuple
    size: int
    scale: float = 1.0

    def numel(self):
        return self.e.numel()

    def product(self, slot):
        """[m, T]: each position's part <slot_j, its sketch> for the slot's rows slot [m, size]."""
        (b1, s1), (b2, s2) = self.out_hash, self.in_hash
        bucket = (b1[self.tokens].unsqueeze(-1) + b2).remainder_(self.size)  # [T, d]
        return (slot[:, bucket] * (self.e * (s1[self.tokens].unsqueeze(-1) * s2))).sum(-1) * self.scale


def sketch_positions(delta, x, out_hash, in_hash, size):
    """[B, T, size]: the TensorSketch of each position's delta_s x_s^T (sketch_math.tensorsketch of one token)."""
    one = delta.flatten(0, 1).unsqueeze(1), x.flatten(0, 1).unsqueeze(1)  # each position an example of one token
    return tensorsketch(*one, out_hash, in_hash, size).view(*delta.shape[:2], size)


def norm_positions(grad, out, weight, bias=None):
    """(weight's [B, T, n], bias's [B, T, n] or None): a norm layer's gradients position by position
    (sketch_math.norm_gradients of each position; per-head axes summed)."""
    b, t = grad.shape[:2]
    found = norm_gradients(grad.flatten(0, 1).unsqueeze(1), out.flatten(0, 1).unsqueeze(1), weight, bias)
    return tuple(None if g is None else g.view(b, t, -1) for g in found)
