"""The hook sketch's math as plain functions on tensors (lark.kernel.sketch.HookSketch wires hooks to them).

Shapes: B examples, T tokens, k buckets; a Linear layer maps `in` features to `out`, its per-example weight
gradient is G_b = sum_t delta_t x_t^T = Delta_b^T X_b [out, in], flattened row by row (index i * in + j).
Hash keys are lark.kernel.hashing.name_key(seed, parameter name, purpose): every function here is a pure
function of its tensors and keys, and the same keys always give the same buckets and signs.

- The rotated-chunk count sketch (fold_index, fold_slices and, on CUDA, lark.kernel.fold_triton.fold: schedules of
  the same sums, fold_schedule picks one): a parameter's flat index is cut into k-long chunks; chunk c is rotated
  by a random offset_c (bucket of coordinate i = (offset_c + i mod k) mod k, c = i // k) and each coordinate gets
  a random sign, all from a counter-based hash of (seed, parameter name, index). Two coordinates of different
  chunks collide with probability 1/k and those of one chunk never do, so inner products keep the count sketch's
  unbiasedness and (at most) its variance, at the cost of contiguous adds instead of a scatter.
- TensorSketch (Pham & Pagh 2013) of G without forming it: coordinate (i, j) goes to bucket (h1(i) + h2(j)) mod k
  with sign s1(i) s2(j). Variance close to a count sketch's.
- Embedding rows: dL/dE[v] = sum over positions t with token v of dL/d(embedding_t), sketched token by token with
  the same bucket and sign as the rotated-chunk sketch gives coordinate (v, column): the V x d gradient is never
  formed, and a tied output layer adds into the same buckets.
- Norm layers of the NORMS classes (1-D weights, out = w * xhat + b): the exact per-example gradient
  sum_t g_t * xhat_t (xhat = (out - b) / w).
- Per-tensor norms (normalize=per_tensor) without forming anything bigger than the sketch does: materialised
  layers sum the squares of their blocks while they are in cache (block_squares), TensorSketch layers use
  ||G||^2 = sum_{t,s} (x_t.x_s)(delta_t.delta_s) (frobenius), embeddings sum_{s,s'} [tok_s = tok_s'] e_s.e_s'
  (e_s = dL/d embedding_s). A tied input/output embedding's gradient is a + b (embedding part, output-layer part),
  divided once by ||a + b||^2 = ||a||^2 + ||b||^2 + 2<a, b>, where <a, b> = sum_s e_s . b[tok_s] and the rows
  b[tok_s] = sum_t delta[t, tok_s] x_t come from the output layer's (X, Delta) (rows_at_tokens): O(T^2 d) per
  example, V x d never formed.
- SketchPass: the sums of one pass, where each parameter's sketch is added and divided by its norm.
"""

import importlib

import torch
import torch.nn.functional as F

from lark.data.formats import IGNORE
from lark.errors import ConfigError
from lark.kernel import fold_triton
from lark.kernel.hashing import hashed, random_signs


# ------------------------------------------------------------------------------ the rotated-chunk count sketch
def chunk_offsets(first, last, key, k, device):
    """[last - first] int64 random rotations in [0, k) of the k-long chunks first .. last - 1 of a flat index."""
    index = torch.arange(first, last, dtype=torch.int64, device=device)
    return hashed(index, key) % k


def rotated_buckets(flat_index, key, k):
    """Buckets (same shape, int64) of flat coordinates: chunk c = index // k is rotated by its offset."""
    chunk, pos = flat_index // k, flat_index % k
    return (hashed(chunk, key) % k + pos) % k


def fold_index(out, part, sign, offsets, start, work):
    """out [B, k] += the rotated-chunk count sketch of part [B, width], the coordinates [start, start + width) of
    a parameter, in a fixed number of tensor operations whatever width / k: one index_add_ of the signed block at
    its buckets. sign [width] (+1 / -1, int8), offsets [chunks] of the chunks start // k onwards; work: a float32
    [B, width] array for the signed block (so a bf16 block is signed in bf16 and added in float32).

    On a CPU index_add_ adds in index order, i.e. chunk by chunk like fold_slices: both give the same float32 sums
    bit for bit; on a GPU its atomic adds may round the last bit differently from run to run."""
    k, width = out.shape[1], part.shape[1]
    first = start // k
    bucket = torch.arange(k, device=part.device) + offsets.unsqueeze(1)  # [chunks, k]
    bucket = torch.where(bucket >= k, bucket - k, bucket).view(-1)[start - first * k :][:width]
    signed = torch.mul(part, sign, out=work)
    return out.index_add_(1, bucket, signed)


def fold_slices(out, part, sign, offsets, start):
    """The same sums as fold_index (same arguments, no work array): each chunk the block touches as at most two
    contiguous adds -- the CPU's schedule, where an operation costs microseconds, not a launch."""
    k, width = out.shape[1], part.shape[1]
    sign = sign.float()
    for c, offset in enumerate(offsets.tolist(), start=start // k):
        lo, hi = max(start, c * k), min(start + width, (c + 1) * k)  # this chunk's share of the block
        pos = (offset + lo - c * k) % k  # where lo lands
        head = min(hi - lo, k - pos)
        out[:, pos : pos + head].addcmul_(part[:, lo - start : lo - start + head], sign[lo - start : lo - start + head])
        if hi - lo > head:  # wraps around to [0, ...)
            out[:, : hi - lo - head].addcmul_(
                part[:, lo - start + head : hi - start], sign[lo - start + head : hi - start]
            )
    return out


FOLDS = ("auto", "triton", "index", "slices")  # attribution.projector.fold: HookSketch.fold_into's schedules


def fold_schedule(fold, device=None):
    """The fold schedule (FOLDS) that `fold` means for blocks on `device`: auto is slices on a CPU, triton on CUDA
    where triton is installed (lark.kernel.fold_triton), index elsewhere. ConfigError for an unknown name, or for
    triton where it cannot run. device None: only the name is checked."""
    if fold not in FOLDS:
        raise ConfigError(f"attribution.projector.fold: unknown '{fold}' ({', '.join(FOLDS)}; fold_schedule)")
    if device is None:
        return fold
    if fold == "auto":
        return "slices" if device.type == "cpu" else "triton" if fold_triton.usable(device) else "index"
    if fold == "triton" and not fold_triton.usable(device):
        why = "triton is not installed" if not fold_triton.available() else f"the blocks are on {device}"
        raise ConfigError(
            f"attribution.projector.fold=triton: {why} (it runs on CUDA, on a CPU only under TRITON_INTERPRET=1, "
            "for tests); use fold=auto, index or slices"
        )
    return fold


def block_squares(part):
    """[B] squared norms of the rows of a [B, width] block (accumulated in float32)."""
    return torch.linalg.vector_norm(part, dim=1, dtype=None if part.dtype == torch.float32 else torch.float32).square()


class BlockedGemm:
    """A layer's per-example weight gradients Delta_b^T X_b (delta [B, T, out], x [B, T, in]) produced `rows`
    output rows at a time into buffers from `buffer(shape, like)` (a reused workspace): yields ([B, rows * in]
    block, flat index of its first coordinate). Each block must be consumed before the next overwrites it."""

    def __init__(self, delta, x, rows, buffer):
        self.delta, self.x, self.rows, self.buffer = delta, x, rows, buffer
        self.numel = delta.shape[-1] * x.shape[-1]

    def __iter__(self):
        b, n_in = self.x.shape[0], self.x.shape[-1]
        for r0 in range(0, self.delta.shape[-1], self.rows):
            d = self.delta[..., r0 : r0 + self.rows]
            out = self.buffer((b, d.shape[-1], n_in), self.x)
            yield torch.bmm(d.transpose(1, 2), self.x, out=out).flatten(1), r0 * n_in


def blocks_of(value):
    """(blocks, numel) of a per-example gradient given whole ([B, numel]) or as a BlockedGemm."""
    return (value, value.numel) if isinstance(value, BlockedGemm) else ([(value, 0)], value.shape[1])


# ------------------------------------------------------------------------------ TensorSketch
def axis_hash(size, bucket_key, sign_key, k, device):
    """TensorSketch's bucket [size] (int64 in [0, k)) and sign [size] (float32 +1 / -1) of one axis."""
    index = torch.arange(size, dtype=torch.int64, device=device)
    return hashed(index, bucket_key) % k, random_signs(index, sign_key)


def embedding_tensorsketch(tokens, rows, out_hash, in_hash, size):
    """[B, size] TensorSketch of the row-sparse sum_s onehot(tokens_s) rows_s^T [V, d] (sketch_math.tensorsketch's
    buckets and signs, out_hash over the vocabulary), from its T rows alone. tokens [B, T], rows [B, T, d]."""
    (b1, s1), (b2, s2) = out_hash, in_hash
    bucket = (b1[tokens].unsqueeze(-1) + b2).remainder_(size)  # [B, T, d]
    signed = rows.float() * (s1[tokens].unsqueeze(-1) * s2)
    return torch.zeros(rows.shape[0], size, device=rows.device).scatter_add_(1, bucket.flatten(1), signed.flatten(1))


def tensorsketch(delta, x, out_hash, in_hash, k):
    """TensorSketch of G_b = sum_t delta_t x_t^T for each example: delta [B, T, out], x [B, T, in] -> [B, k].
    Coordinate (i, j) goes to bucket (h1(i) + h2(j)) mod k with sign s1(i) s2(j) (out_hash = (h1, s1), in_hash
    = (h2, s2), from axis_hash): count-sketch delta_t and x_t into k dims, multiply their FFTs, sum over tokens,
    one inverse FFT per example -- T k log k per example instead of T in out."""
    delta, x = delta.float(), x.float()
    (b1, s1), (b2, s2) = out_hash, in_hash
    cs1 = torch.zeros(*delta.shape[:2], k, device=delta.device).index_add_(2, b1, delta * s1)
    cs2 = torch.zeros(*x.shape[:2], k, device=x.device).index_add_(2, b2, x * s2)
    product = (torch.fft.rfft(cs1, dim=-1) * torch.fft.rfft(cs2, dim=-1)).sum(dim=1)
    return torch.fft.irfft(product, n=k, dim=-1)


def frobenius(delta, x):
    """[B] ||sum_t delta_t x_t^T||_F^2 without forming it: sum_{t,s} (x_t . x_s)(delta_t . delta_s).
    delta [B, T, out], x [B, T, in] (float32)."""
    return ((x @ x.transpose(1, 2)) * (delta @ delta.transpose(1, 2))).sum(dim=(1, 2)).clamp_min(0)


# ------------------------------------------------------------------------------ the input embedding
def without_padding(grad, tokens, padding_idx):
    """grad [B, T, d] with the positions of token padding_idx zeroed: nn.Embedding never gives that row a
    gradient (Llama: the pad id, = eos in SmolLM2)."""
    return grad if padding_idx is None else grad.masked_fill((tokens == padding_idx).unsqueeze(-1), 0)


def embedding_sketch(tokens, grad, offset_key, sign_key, k):
    """[B, k] rotated-chunk count sketch of the embedding gradient from token ids [B, T] and e = d loss / d
    embedding [B, T, d]: position s adds e_s at the buckets and signs of coordinates (tokens[s], 0 .. d - 1), so
    the V x d gradient is never formed (and a tied output layer's gradient adds into the same buckets)."""
    d = grad.shape[-1]
    flat_index = tokens.unsqueeze(-1) * d + torch.arange(d, device=tokens.device)  # [B, T, d]
    bucket = rotated_buckets(flat_index, offset_key, k)
    sign = random_signs(flat_index, sign_key)
    out = torch.zeros(grad.shape[0], k, device=grad.device)
    return out.scatter_add_(1, bucket.flatten(1), (grad.float() * sign).flatten(1))


def embedding_squares(tokens, grad, output_rows=None):
    """[B] squared norm of the embedding gradient a: rows of one token id add up, so ||a||^2 = sum_{s,s'}
    [tok_s = tok_s'] e_s . e_s' (tokens [B, T], grad e [B, T, d]). With a tied output layer's rows at the tokens
    (output_rows [B, T, d], rows_at_tokens) it is ||a||^2 + 2 <a, b> (the output layer adds its own ||b||^2):
    <a, b> = sum_s e_s . b[tok_s]."""
    e = grad.float()
    same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
    squares = ((e @ e.transpose(1, 2)) * same).sum(dim=(1, 2))
    if output_rows is not None:
        squares = squares + 2 * (output_rows * e).sum(dim=(1, 2))
    return squares


def rows_at_tokens(tokens, delta, x):
    """Rows of a tied output layer's per-example gradient b = sum_t delta_t x_t^T at the input tokens, [B, T, d]:
    row s is b[tok_s] = sum_t delta[t, tok_s] x_t. tokens [B, T], delta [B, T, V], x [B, T, d]. O(T^2 d) per
    example; V x d is never formed."""
    index = tokens.unsqueeze(1).expand(-1, delta.shape[1], -1)  # [B, T (t), T (s)]
    return delta.gather(2, index).float().transpose(1, 2) @ x.float()


# ------------------------------------------------------------------------------ norms and the loss
# Hugging Face families whose RMSNorm the hooks know: {family: class in transformers.models.<family>}. Each computes
# weight * xhat over the last axis (checked against its forward; Gemma's (1 + weight) * xhat is not that form).
HF_NORMS = {
    "olmo3": "Olmo3RMSNorm",  # OLMo-3: the paper's model and the tiny test model
    "olmo2": "Olmo2RMSNorm",
    "llama": "LlamaRMSNorm",  # SmolLM2
    "mistral": "MistralRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm",
}


def hf_norms():
    """The classes of HF_NORMS that the installed transformers has (a family it lacks is left out)."""
    found = []
    for family, name in HF_NORMS.items():
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        found += [getattr(module, name)] if hasattr(module, name) else []
    return tuple(found)


# The norm layers whose 1-D weight (and bias) the hooks sketch: every class here computes out = weight * xhat
# (+ bias) over the last axis, whose exact per-example gradient is norm_gradients. The extension point
# for a new architecture: add its norm class here if it has that form (another form needs its own gradient). A norm
# of a class not listed is not hooked: HookSketch.coverage() < 1, and lark.kernel.selfcheck refuses the model naming it.
NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm, *hf_norms())


def norm_gradients(grad, out, weight, bias=None):
    """Exact per-example gradients of a norm layer out = weight * xhat (+ bias) (RMSNorm, LayerNorm):
    d/d weight = sum_t g_t * xhat_t with xhat = (out - bias) / weight, d/d bias = sum_t g_t. grad = d loss / d out
    and out [B, ..., n], weight and bias [n] -> (weight's [B, n], bias's [B, n] or None)."""
    g, out = grad.float(), out.float()
    bias_grad = None
    if bias is not None:
        bias_grad = g.flatten(1, -2).sum(1)
        out = out - bias.detach().float()
    xhat = out / weight.detach().float()
    return (g * xhat).flatten(1, -2).sum(1), bias_grad


def per_example_loss(logits, labels):
    """[B] mean next-token loss over each example's loss tokens (what HF computes for a batch of one); NaN for an
    example without loss tokens. logits [B, T, V], labels [B, T]. Labels are shifted instead of logits, so the
    logits are never copied."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(dim=1)
    return losses.view_as(targets).sum(dim=1) / counts  # 0 / 0 = NaN: reported, not scored


# ------------------------------------------------------------------------------ the sums of one pass
class SketchPass:
    """What the hooks of one HookSketch pass share (created per batch, handed to every hook, dropped after), and
    how each parameter's sketch is added into the pass's sum:

    - total [B, k]: the sum every parameter's sketch is added into; with by_parameter, each parameter's sketch
      goes to its own [B, k] in `parts` instead (summed into total by finish(); lark.kernel.selfcheck compares
      them one by one);
    - tokens [B, T]: the input ids (the embedding's buckets; a tied output layer's rows at them);
    - saved: {module name: (input, output)} from a layer's forward hook until its output-gradient hook;
    - with a normaliser that needs_norms (per_tensor): each parameter's sketch divided by the norm of its
      per-example gradient; pending {tied weight: ([B, k] sketch, [B] squared norm)}, the tied weight's two parts,
      divided once by the norm of their sum in finish(); output_rows [B, T, d], the tied output layer's rows at
      the input tokens (rows_at_tokens, for the embedding's cross term); norms {parameter: [B]}, what each
      parameter was divided by.
    fold(out, name, part, start, numel) and scratch(role, shape, device) are the sketch's (HookSketch.fold_into,
    with its hash caches, and its reused work arrays); tied_name is the parameter name of a tied input/output
    embedding (None when there is none)."""

    def __init__(self, tokens, k, normalizer, fold, scratch, tied_name=None, by_parameter=False):
        self.tokens, self.normalizer, self.tied_name = tokens, normalizer, tied_name
        self.fold_into, self.scratch = fold, scratch
        self.total = torch.zeros(tokens.shape[0], k, device=tokens.device)
        self.parts = {} if by_parameter else None
        self.saved, self.pending, self.norms, self.output_rows = {}, {}, {}, None

    def into(self, name):
        """The [B, k] that parameter `name`'s sketch is added to."""
        if self.parts is None:
            return self.total
        if name not in self.parts:
            self.parts[name] = torch.zeros_like(self.total)
        return self.parts[name]

    def add(self, name, kind, value, squares=None):
        """Add the sketch of one parameter's per-example gradients: kind "flat" = [B, numel] or a BlockedGemm,
        folded here; kind "sketch" = a [B, k] sketch, with `squares` its gradients' squared norms. Under per_tensor
        each parameter is divided by its norm (add_normalized), and a tied weight's two parts are only summed
        here, and divided by the norm of their sum in finish()."""
        out = self.into(name)
        if not self.normalizer.needs_norms:
            if kind == "flat":
                self.fold(out, name, value)
            else:
                out += value
        elif name == self.tied_name:
            layer, so_far = self.pending.get(name) or (torch.zeros_like(self.total), 0)
            if kind == "flat":
                squares = self.fold(layer, name, value)
            else:
                layer += value
            self.pending[name] = (layer, so_far + squares)
        elif kind == "flat":
            self.add_normalized(out, name, value)
        else:
            out.addcmul_(value, self.inverse_norm(name, squares).unsqueeze(1))

    def add_normalized(self, out, name, value):
        """out += a flat gradient's sketch divided by its norm: a gradient that comes whole (one block) before it
        is folded, straight into out; one in several blocks after, from a reused [B, k] buffer."""
        gemm = isinstance(value, BlockedGemm)
        blocks, numel = blocks_of(value)
        layer, squares = None, 0
        for part, start in blocks:
            if start == 0 and part.shape[1] == numel:  # whole: divide (the GEMM's own buffer in place), fold
                inverse = self.inverse_norm(name, block_squares(part)).unsqueeze(1)
                self.fold_into(out, name, part.mul_(inverse) if gemm else part * inverse, 0, numel)
                return
            layer = self.scratch("layer", out.shape, out.device).zero_() if layer is None else layer
            self.fold_into(layer, name, part, start, numel)
            squares = squares + block_squares(part)
        out.addcmul_(layer, self.inverse_norm(name, squares).unsqueeze(1))

    def fold(self, out, name, value):
        """out [B, k] += the sketch of a per-example gradient (given whole or as BlockedGemm blocks); returns the
        gradients' squared norms [B] under per_tensor (from the blocks while they are in cache), else None."""
        blocks, numel = blocks_of(value)
        squares = 0 if self.normalizer.needs_norms else None
        for part, start in blocks:
            self.fold_into(out, name, part, start, numel)
            if squares is not None:
                squares = squares + block_squares(part)
        return squares

    def inverse_norm(self, name, squares):
        """1 / ||gradient|| per example from its squared norm (a zero gradient stays zero, as in PerTensor); the
        norm is kept in norms."""
        norm = squares.clamp_min(0).sqrt()
        self.norms[name] = norm
        return 1 / norm.clamp_min(1e-30)

    def finish(self):
        """Normalise and add the parts of tied weights collected over the pass (per_tensor only); with
        by_parameter, sum the parameters' shares into total."""
        for name, (layer, squares) in self.pending.items():
            self.into(name).addcmul_(layer, self.inverse_norm(name, squares).unsqueeze(1))
        for part in (self.parts or {}).values():
            self.total += part
