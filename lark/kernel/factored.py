"""The `factored` projector (LoGra, Choe et al. 2024; EleutherAI's Bergson): each Linear module's per-example
gradient projected from its two factors, never formed.

A Linear layer's per-example weight gradient is G = sum_t delta_t x_t^T [out, in] (x_t its input, delta_t = dL/dy_t).
With a random P_out [r_out, out] and P_in [r_in, in] per module,

    P_out G P_in^T = sum_t (P_out delta_t)(P_in x_t)^T            [r_out, r_in], = (P_out (x) P_in) vec(G)

(vec row by row): two thin GEMMs per layer on the hooks' X [B, T, in] and Delta [B, T, out], then one [r_out, r_in]
product per example. The per-example vector is the concatenation of every parameter's block, in the model's
parameter order (k = sum r_out r_in + the 1-D parameters' slots below). As in the `sketch` projector (whose hooks
this class inherits from lark.kernel.sketch.HookSketch: find_layers, backward, keep_input, coverage) the weights do
not require grad during the pass, so the backward pass runs no weight-gradient GEMM.

The matrices (`matrix`): P = S / sqrt(r), S of +-1 from the counter hash of (seed, parameter name, axis)
(lark.kernel.hashing), made on the model's device when first needed and kept (r x d numbers per side; never saved):
`hadamard` (the default) r distinct rows of a Hadamard matrix with hashed column signs, so a side's error vanishes
as r nears d (at r = 63 of 64: std 0.018 on a unit inner product, against 0.15; the same as independent signs
for r << d; hashing.hadamard_signs), or `rademacher`, independent signs (the earlier default; Bergson draws i.i.d.
normal or +-1 entries). +-1 rather than Gaussian: the same matrix on every device and in every process, exact in
bf16 (the 1 / sqrt(r) is applied to the float32 block), JL variance at most a Gaussian's. E[P^T P] = I on each
side, independently, so E<P_out G P_in^T, P_out H P_in^T> = <G, H> for every module: inner products are unbiased
and cosines are JL estimates, like the other projectors'. Where r >= d on a side that side is the identity.
Not a JL projection to r_out r_in dimensions, though: a one-token (rank-one) gradient's inner product is the product
of two r-dimensional JL estimates, relative error ~ sqrt(1/r_out + 1/r_in) (measured at r = 16 on unit vectors of
cosine ~0.7: std 0.32, against 1/r = 0.06 for a dense projection to r^2 numbers); summing over tokens (rank T)
averages some of it away. That is the price of never forming G (benchmarks/attribution_speed.py measures it).

The other parameters:
- the vocabulary-sized matrices, the input embedding E [V, d] and the output layer, by `vocab`: each one chosen is
  TensorSketched into `vocab_numbers` numbers (null: what a block would take, min(r_out, V) x min(r_in, d)): coordinate
  (i, j) to bucket (h1(i) + h2(j)) mod size with sign s1(i) s2(j), per-axis hashes of the seed and the parameter's
  name (sketch_math.axis_hash), so its error is a dense JL estimate's at that many numbers where a factored block's
  is ~sqrt(1/r_out + 1/r_in) for a one-token gradient. The embedding's gradient sum_s onehot(tok_s) e_s^T has only
  the example's T rows: their d numbers per token are added at their buckets (T x d per example, no FFT, about
  what the factored block costs). The output layer's sum_t delta_t x_t^T goes through sketch_math.tensorsketch
  (count-sketch both factors over the vocabulary and the width, multiply their FFTs: 0-15% of the floor's time
  more on the 8.4M and 42M CPU models, docs/benchmarks.md). A tied weight's two parts share the hashes (keyed
  by the name), so they add into one slot.
  `input` (the default): the input embedding's weight TensorSketched (a tied output layer's part with it, as it
  shares the weight), an untied output layer factored. `tensorsketch`: the embedding and the output layer.
  `factored` (Bergson's): neither, the embedding's P_out columns looked up at the tokens, a tied output layer's
  block added into it. On SmolLM2-135M (tied) `input` took the factored vector's Pearson against exact cosines from
  0.864 to 0.936 at k = 61,200 for 2-3 points of the floor's time (docs/benchmarks.md).
  Why: the optimizer-aware kernels' corrected gradients put most of their norm on these matrices (rare tokens'
  rows, whose second moments are small); on the embedded run factoring the embedding cost half of adam's
  pretraining provenance against the sketch's, and a block's worth of numbers is little for them (adam's PT MRR
  0.086 at 3,969 numbers, 0.108 at 65,536, the sketch's 0.116; docs/validation.md);
- 1-D parameters (norm weights of sketch_math.NORMS, biases): the exact per-example gradient when it has at most
  r_out * r_in numbers (every norm of a small model), else a count sketch of it into r_out * r_in buckets (hash of
  the same seed and name).
Parameters the hooks do not reach (another layer type): refused, naming the modules, unless `partial` (then they are
left out and spec()'s coverage says how much is in).

Kernels: `normalize=per_tensor` (rapidin) divides each parameter's slot by the exact norm of that parameter's
per-example gradient, from X and Delta: ||sum_t delta_t x_t^T||^2 = sum_{t,s} (delta_t.delta_s)(x_t.x_s)
(sketch_math.frobenius) or from G itself where that is cheaper (weight_squares); the embedding's from
sketch_math.embedding_squares (with a tied output layer's cross term, as in the sketch). The Adam correction
(adam, trackstar) with factored moments is diag(row) G diag(col) = (Delta * row)^T (X * col): Delta and X are scaled
before projecting, exactly as the sketch does; embedding rows by AdamScale.rows; 1-D parameters exactly.
"""

import functools
import math

import torch

from lark.kernel.factored_math import (
    Factors,
    Rows,
    Side,
    norm_positions,
    project_side,
    sketch_positions,
    vector_slot,
    weight_squares,
)
from lark.kernel.hashing import hadamard_signs, name_key, rademacher_signs
from lark.kernel.normalizers import normalizer
from lark.kernel.sketch import HookSketch
from lark.kernel.sketch_math import (
    axis_hash,
    embedding_squares,
    embedding_tensorsketch,
    norm_gradients,
    rows_at_tokens,
    tensorsketch,
    without_padding,
)

# ------------------------------------------------------------------------------ the math, shapes in docstrings
MATRICES = {"hadamard": hadamard_signs, "rademacher": rademacher_signs}  # attribution.projector.matrix
VOCAB = ("tensorsketch", "input", "factored")  # attribution.projector.vocab


def layout_size(matrices, vectors, r_out, r_in):
    """k of a layout: matrices [(out, in)] get min(r_out, out) * min(r_in, in), vectors [n] min(n, r_out r_in)."""
    budget = r_out * r_in
    return sum(min(r_out, o) * min(r_in, i) for o, i in matrices) + sum(min(n, budget) for n in vectors)


def rank_for(k, matrices, vectors):
    """The largest r (r_out = r_in = r) whose layout fits in k numbers (one r for every module, as Bergson's)."""
    if layout_size(matrices, vectors, 1, 1) > k:
        raise ValueError(
            f"attribution.projector.k={k} is below one number per parameter tensor "
            f"({layout_size(matrices, vectors, 1, 1)}) for attribution/projector=factored"
        )
    low, high = 1, max([max(s) for s in matrices] + [1])  # layout_size grows with r: bisect for the last fit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if layout_size(matrices, vectors, mid, mid) <= k else (low, mid - 1)
    return low


class FactoredPass:
    """What the hooks of one pass share: tokens [B, T], saved layer inputs, each parameter's block [B, size] and
    (per_tensor) its gradients' squared norms [B], summed over the modules that use it (a tied weight: two), and,
    when `positions` is a dict, each parameter's blocks position by position (lark.kernel.tokens_kept's pieces)."""

    def __init__(self, tokens, positions=None):
        self.tokens, self.saved, self.blocks, self.squares, self.output_rows = tokens, {}, {}, {}, None
        self.positions = positions

    def keep(self, name, piece):
        """Adds a parameter's piece by position (a tied weight: one per module), when positions are kept."""
        if self.positions is not None:
            self.positions.setdefault(name, []).append(piece())

    def add(self, name, block, squares=None):
        self.blocks[name] = block if name not in self.blocks else self.blocks[name] + block
        if squares is not None:
            self.squares[name] = self.squares.get(name, 0) + squares


# ------------------------------------------------------------------------------ the projector
class FactoredProjector(HookSketch):
    """The `factored` projector (attribution/projector=factored): project_batch(model, batch) -> [B, k] from the
    hooks of one forward and backward pass with the weight-gradient GEMMs off; spec() is what stores record."""

    kind = "factored"
    self_check = False  # lark.kernel.selfcheck checks the count sketch; tests/test_factored.py checks this one

    def __init__(
        self,
        model,
        k=65536,
        seed=0,
        normalize="none",
        r_in=None,
        r_out=None,
        partial=False,
        precondition=None,
        vocab="input",
        matrix="hadamard",
        vocab_numbers=None,
    ):
        if vocab not in VOCAB:
            raise ValueError(f"attribution.projector.vocab: unknown '{vocab}' ({' | '.join(VOCAB)})")
        if matrix not in MATRICES:
            raise ValueError(f"attribution.projector.matrix: unknown '{matrix}' ({' | '.join(MATRICES)})")
        self.normalizer = normalizer(normalize)  # lark.kernel.normalizers: NoNorm or PerTensor (or its string)
        self.seed, self.precondition, self.partial, self.vocab = int(seed), precondition, bool(partial), vocab
        digits = str(vocab_numbers)  # (an int, or its digits from a benchmark's key=value)
        if vocab_numbers is not None and not (digits.isdigit() and int(digits) >= 1):
            raise ValueError(
                f"attribution.projector.vocab_numbers must be a positive integer or null, got {vocab_numbers!r}"
            )
        self.matrix, self.vocab_numbers = matrix, None if vocab_numbers is None else int(digits)
        self.find_layers(model)  # HookSketch's: linears, norms, embeddings, param_names, coverage
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.input_weight = model.get_input_embeddings().weight
        self.tied = out is not None and out.weight is self.input_weight
        self.vocab_weights = {id(self.input_weight)} | ({id(out.weight)} if out is not None else set())
        if self.normalizer.needs_norms:
            self.refuse_other_shared_weights(out)
        if not self.partial:
            self.refuse_unreached(model)
        self.slots = self.plan(model, k, r_in, r_out)
        self.k = sum(size for size, _ in self.slots.values())
        self.cache, self.last_norms, self.last_positions = {}, {}, None
        self.keep_positions = False  # set by lark.kernel.tokens_kept while a store pass keeps the position split

    def refuse_unreached(self, model):
        covered = self.covered_ids()
        missing = sorted(
            {f"{n.rsplit('.', 1)[0]}" for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered}
        )
        if missing:
            raise ValueError(
                f"attribution/projector=factored: the hooks do not reach {', '.join(missing[:5])} (Linear layers, "
                "norms of lark.kernel.sketch_math.NORMS and the input embedding are); set "
                "attribution.projector.partial=true to leave them out, or use attribution/projector=rapidin"
            )

    def plan(self, model, k, r_in, r_out):
        """{parameter: (slot size, how)} in parameter order, how = (r_out, r_in) of a factored matrix, None (a 1-D
        parameter: itself or its count sketch) or "tensorsketch" (a vocabulary matrix); sets r_out, r_in."""
        for key, r in (("r_in", r_in), ("r_out", r_out)):
            if r is not None and not (isinstance(r, int) and r > 0):
                raise ValueError(f"attribution.projector.{key} must be a positive integer or null, got {r!r}")
        if (r_in is None) != (r_out is None):
            raise ValueError("attribution.projector.r_in and r_out: give both (ranks per module) or neither (from k)")
        covered = self.covered_ids()
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in covered]
        matrices = [tuple(p.shape) for _, p in params if p.dim() == 2]
        vectors = [p.numel() for _, p in params if p.dim() != 2]
        if r_in is None:
            r_in = r_out = rank_for(int(k), matrices, vectors)
        self.r_out, self.r_in = r_out, r_in
        slots = {}
        for name, p in params:
            if (self.vocab == "tensorsketch" and id(p) in self.vocab_weights) or (
                self.vocab == "input" and p is self.input_weight  # (tied: with its output layer's part)
            ):
                block = min(r_out, p.shape[0]) * min(r_in, p.shape[1])  # vocab_numbers null: a block's worth
                slots[name] = (self.vocab_numbers or block, "tensorsketch")
            elif p.dim() == 2:
                ranks = (min(r_out, p.shape[0]), min(r_in, p.shape[1]))
                slots[name] = (ranks[0] * ranks[1], ranks)
            else:
                slots[name] = (min(p.numel(), r_out * r_in), None)
        return slots

    def spec(self):
        spec = {
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "normalize": self.normalizer.name,
            "r_out": self.r_out,
            "r_in": self.r_in,
            "matrix": self.matrix,
            "vocab": self.vocab,
            "vocab_numbers": self.vocab_numbers,
            "hash": "murmur3-fmix32",
            "coverage": round(self.coverage(), 6),
        }
        return {**spec, "precondition": self.precondition.spec()} if self.precondition is not None else spec

    # -- matrices, kept between batches -----------------------------------------------------------------------
    def signs(self, name, axis, size, device, dtype=torch.float32):
        """P's signs [r, size] on one axis ("out" or "in") of a matrix parameter, in the model's dtype (+-1 is exact
        in any), or None where r >= size (made anew: `matrices` keeps each as a Side)."""
        r = self.r_out if axis == "out" else self.r_in
        if r >= size:
            return None
        return MATRICES[self.matrix](r, size, name_key(self.seed, name, f"factored-{axis}"), device).to(dtype)

    def matrices(self, name, n_out, n_in, like):
        """(P_out's Side, P_in's Side, 1 / sqrt of the random sides' r) of a matrix parameter, on the device and in
        the dtype of the tensor `like` (None for a side where r >= d: the identity)."""
        sides = []
        for axis, n in (("out", n_out), ("in", n_in)):
            key = ("side", name, axis, n, str(like.device), like.dtype)
            if key not in self.cache:
                signs = self.signs(name, axis, n, like.device, like.dtype)
                self.cache[key] = None if signs is None else Side(signs)
            sides.append(self.cache[key])
        rows = math.prod(side.r for side in sides if side is not None)
        return *sides, 1 / math.sqrt(rows)

    def slot_keys(self, name):
        """The hash keys (bucket, sign) of a count-sketched 1-D parameter's slot."""
        return name_key(self.seed, name, "factored-bucket"), name_key(self.seed, name, "factored-sign")

    def vocab_hash(self, name, axis, size, device):
        """A TensorSketched vocabulary matrix's (bucket, sign) on one axis ("out" or "in"; sketch_math.axis_hash
        into its slot size), cached: out + in numbers."""
        key = ("ts", name, axis, size, str(device))
        if key not in self.cache:
            keys = (
                name_key(self.seed, name, f"factored-ts-{axis}-bucket"),
                name_key(self.seed, name, f"factored-ts-{axis}-sign"),
            )
            self.cache[key] = axis_hash(size, *keys, self.slots[name][0], device)
        return self.cache[key]

    def vocab_hashes(self, name, shape, device):
        """(out hash, in hash) of a TensorSketched matrix of `shape`, or None when its slot is not one."""
        if self.slots[name][1] != "tensorsketch":
            return None
        return tuple(self.vocab_hash(name, axis, n, device) for axis, n in zip(("out", "in"), shape))

    def vector(self, name, value):
        """(slot [B, size], squared norms [B] or None) of a 1-D parameter's per-example gradients [B, n]."""
        value = self.corrected(name, value)
        squares = value.float().square().sum(dim=1) if self.normalizer.needs_norms else None
        return vector_slot(value, self.slots[name][0], *self.slot_keys(name)), squares

    def vector_positions(self, name, value):
        """[B, T, size]: a 1-D parameter's slot position by position, from its gradients there [B, T, n]."""
        slots = vector_slot(self.corrected(name, value.flatten(0, 1)), self.slots[name][0], *self.slot_keys(name))
        return slots.view(*value.shape[:2], -1)

    # -- one module's blocks ----------------------------------------------------------------------------------
    def add_linear(self, run, mod, x, delta):
        """A Linear layer's bias and weight, from its input x [B, T, in] and output gradient delta [B, T, out]."""
        if mod.bias is not None:
            b_name = self.param_names[id(mod.bias)]
            run.add(b_name, *self.vector(b_name, delta.float().sum(dim=1)))
            run.keep(b_name, lambda: self.vector_positions(b_name, delta.float()))
        w_name = self.param_names[id(mod.weight)]
        if self.precondition is not None:  # diag(row) G diag(col) = (Delta * row)^T (X * col)
            row, col = self.precondition.factors(w_name, x.device)
            delta, x = delta * row.to(delta.dtype), x * col.to(x.dtype)
        if mod.weight is self.input_weight and self.normalizer.needs_norms:  # the tied embedding's cross term
            run.output_rows = rows_at_tokens(run.tokens, delta, x)
        squares = weight_squares(delta, x) if self.normalizer.needs_norms else None
        hashes = self.vocab_hashes(w_name, mod.weight.shape, x.device)
        if hashes is not None:
            run.add(w_name, tensorsketch(delta, x, *hashes, self.slots[w_name][0]), squares)
            run.keep(w_name, lambda: sketch_positions(delta, x, *hashes, self.slots[w_name][0]))
            return
        p_out, p_in, scale = self.matrices(w_name, delta.shape[-1], x.shape[-1], x)
        a, c = project_side(delta, p_out).float(), project_side(x, p_in).float()
        run.add(w_name, torch.bmm(a.transpose(1, 2), c).flatten(1).mul_(scale), squares)
        run.keep(w_name, lambda: Factors(a, c, scale))

    def add_norm(self, run, mod, out, grad):
        """A norm layer's bias and weight, from its output and output gradient [B, T, n] (exact, then slotted)."""
        bias = getattr(mod, "bias", None)
        weight_grad, bias_grad = norm_gradients(grad, out, mod.weight, bias)
        positions = functools.cache(lambda: norm_positions(grad, out, mod.weight, bias))  # (made once, if kept)
        for p, g, which in ((bias, bias_grad, 1), (mod.weight, weight_grad, 0)):
            if p is not None:
                name = self.param_names[id(p)]
                run.add(name, *self.vector(name, g))
                run.keep(name, lambda n=name, w=which: self.vector_positions(n, positions()[w]))

    def add_embedding(self, run, mod, grad):
        """The input embedding's weight [V, d], from e = d loss / d embedding [B, T, d] of the looked-up rows: their
        TensorSketch, or sum_s (P_out[:, tok_s]) (P_in e_s)^T, P_out's columns taken at the tokens (vocab=factored)."""
        name, tokens = self.param_names[id(mod.weight)], run.tokens
        if self.precondition is not None:
            grad = self.precondition.rows(name, tokens, grad)
        grad = without_padding(grad, tokens, getattr(mod, "padding_idx", None))
        squares = embedding_squares(tokens, grad, run.output_rows) if self.normalizer.needs_norms else None
        hashes = self.vocab_hashes(name, mod.weight.shape, grad.device)
        if hashes is not None:
            run.add(name, embedding_tensorsketch(tokens, grad, *hashes, self.slots[name][0]), squares)
            run.keep(name, lambda: Rows(tokens, grad.float(), *hashes, self.slots[name][0]))
            return
        vocab = mod.weight.shape[0]
        p_out, p_in, scale = self.matrices(name, vocab, grad.shape[-1], grad)
        rows = torch.nn.functional.one_hot(tokens, vocab) if p_out is None else p_out.rows(tokens)  # [B, T, r]
        rows, c = rows.float(), project_side(grad, p_in).float()
        run.add(name, torch.bmm(rows.transpose(1, 2), c).flatten(1).mul_(scale), squares)
        run.keep(name, lambda: Factors(rows, c, scale))

    # -- the pass ---------------------------------------------------------------------------------------------
    def project_batch(self, model, batch):
        """[B, k] factored projections of the per-example gradients of the mean loss over each example's loss
        tokens (NaN rows for examples whose loss is not finite). With keep_positions, each parameter's pieces by
        position go to last_positions (lark.kernel.tokens_kept), last_norms its per-tensor norms."""
        run = FactoredPass(batch["input_ids"], {} if self.keep_positions else None)
        losses, embeds_grad = self.backward(model, batch, run)  # HookSketch's: weights frozen, hooks on
        embedding = model.get_input_embeddings()
        if embedding in self.embeddings.values() and embeds_grad is not None:
            self.add_embedding(run, embedding, embeds_grad)
        out = self.concatenated(run, batch["input_ids"].shape[0], batch["input_ids"].device)
        out[~torch.isfinite(losses.detach())] = float("nan")
        self.last_positions = run.positions
        return out

    def concatenated(self, run, n, device):
        """[n, k]: every parameter's slot in order (per_tensor: divided by its gradients' norms, kept in
        last_norms; a zero gradient stays zero); a parameter that got no gradient is zeros."""
        parts, self.last_norms = [], {}
        for name, (size, _) in self.slots.items():
            block = run.blocks.get(name)
            if block is None:
                parts.append(torch.zeros(n, size, device=device))
                continue
            if self.normalizer.needs_norms:
                norm = run.squares[name].clamp_min(0).sqrt()
                self.last_norms[name] = norm
                block = block / norm.clamp_min(1e-30).unsqueeze(1)
            parts.append(block)
        return torch.cat(parts, dim=1)
