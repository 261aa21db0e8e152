"""The `sketch` projector: per-example gradient sketches from forward/backward hooks, batched like training.

For a Linear layer y_t = W x_t (+ b), one example's weight gradient is G = sum_t delta_t x_t^T, where x_t is the
layer input and delta_t = dL/dy_t. The hooks see X [B, T, in] and Delta [B, T, out] for a whole batch; the
model's own weight-gradient GEMMs are switched off (parameters do not require grad during the pass) and each
layer's contribution to the global k-dim count sketch is computed from (X, Delta) directly, by the functions of
lark.kernel.sketch_math (the math, with shapes, is described there):

- `materialize`: G_b = Delta_b^T X_b by batched GEMMs, then the "rotated-chunk" count sketch (sketch_flat): the
  same unbiasedness and (at most) the variance of `rapidin`'s fully hashed count sketch, but not the same vectors.
  On a CPU, G is produced a block of rows at a time, small enough to stay in cache (`block_elements`), and each
  block is folded while it is there: no round trip of G through main memory, and a workspace of about 2^19
  numbers (at least T rows) instead of B * out * in (a per-example G is B times a training step's weight
  gradient). On a GPU one block usually holds the layer.
- `tensorsketch`: TensorSketch (Pham & Pagh 2013) of G without forming it. Cost T * k log k per example instead
  of T * in * out: the cheaper choice for large layers (7B: in * out = 16.7M >> k log k = 1M).
- `auto`: per layer, the one that moves fewer bytes at `plan_tokens` tokens (see use_tensorsketch).

The input embedding is sketched position by position (the V x d gradient is never formed; a tied output layer
adds into the same buckets); norm layers of the classes in sketch_math.NORMS get their exact per-example
gradient. Everything the hooks do not reach is reported by `coverage()` (lark.kernel.selfcheck refuses a model
below 100%, naming the modules); for the OLMo-3 family and SmolLM2's Llama it is 100%.

`normalize="per_tensor"` (lark.kernel.normalizers.PerTensor): each parameter's sketch is divided by the norm of
that parameter's per-example gradient, computed without forming anything bigger than the sketch does
(sketch_math: block_squares, frobenius, embedding_squares); a tied input/output embedding's two parts are
sketched into one vector and divided once by the norm of their sum. Other weights shared between modules are
refused.

Optimizer correction (`precondition`, lark.kernel.optimizer.AdamScale, kernels adam/trackstar): with factored
moments the per-coordinate factor of a matrix is row_i * col_j, so G_b's correction is diag(row) G_b diag(col) =
(Delta_b * row)^T (X_b * col): Delta and X are scaled before the GEMM (or TensorSketch), nothing else is formed;
embedding gradients get row[token] * col per position, 1-D parameters (norms, biases) the exact division.

HookSketch wires the hooks to sketch_math and owns what lives longer than one call (hash caches, work arrays);
what the hooks of one pass share (the running sum, saved layer inputs, the tied weight's parts) is a
sketch_math.SketchPass.
"""

import math

import torch

from lark.kernel import fold_triton
from lark.kernel.hashing import name_key, random_signs
from lark.kernel.normalizers import normalizer
from lark.kernel.sketch_math import (
    NORMS,
    BlockedGemm,
    SketchPass,
    axis_hash,
    chunk_offsets,
    embedding_sketch,
    embedding_squares,
    fold_index,
    fold_schedule,
    fold_slices,
    frobenius,
    norm_gradients,
    per_example_loss,
    rows_at_tokens,
    tensorsketch,
    without_padding,
)

METHODS = ("auto", "materialize", "tensorsketch")


class HookSketch:
    """The `sketch` projector (attribution/projector=sketch): project_batch(model, batch) -> [B, k] from the hooks
    of one forward and backward pass; spec() is what stores record of it."""

    kind = "sketch"
    self_check = True  # lark.kernel.selfcheck checks the hooks against autograd on the model before a run

    def __init__(
        self,
        model,
        k,
        seed=0,
        normalize="none",
        method="auto",
        plan_tokens=512,
        cache_bytes=2**30,
        precondition=None,
        fold="auto",
    ):
        self.normalizer = normalizer(normalize)  # lark.kernel.normalizers: NoNorm or PerTensor (or its string)
        if method not in METHODS:
            raise ValueError(f"attribution.projector.method: unknown '{method}' ({', '.join(METHODS)})")
        self.k, self.seed, self.method = int(k), int(seed), method
        self.plan_tokens = int(plan_tokens)  # T that `auto` plans each layer for: not the batch's, so an
        # example's vector never depends on how its batch is padded
        self.find_layers(model)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.input_weight = model.get_input_embeddings().weight
        self.tied = out is not None and out.weight is self.input_weight
        if self.normalizer.needs_norms:
            self.refuse_other_shared_weights(out)
        self.precondition = precondition  # lark.kernel.optimizer.AdamScale or None
        self.last_norms = {}  # each parameter's per-example gradient norms of the last pass (per_tensor: what the
        # division used), for checking against autograd
        self.cache, self.workspace, self.scratches = {}, None, {}
        self.max_workspace = 2**28  # elements of the per-example GEMM workspace on a GPU (1 GiB of float32)
        self.block_elements = 2**19  # on a CPU: G blocks of 2 MiB (float32), folded while they are in cache
        self.cache_bytes = int(cache_bytes)  # attribution.projector.cache_bytes: signs kept between batches
        self.cached_bytes = 0
        self.fold_schedule = fold_schedule(fold)  # attribution.projector.fold: fold_into's schedule (FOLDS)

    def find_layers(self, model):
        """The modules the hooks reach, all of whose parameters are trainable: Linear layers, norms of the NORMS
        classes with 1-D parameters, the input embedding."""
        self.param_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        input_embedding = model.get_input_embeddings()
        self.linears, self.norms, self.embeddings = {}, {}, {}
        for mod_name, mod in model.named_modules():
            params = dict(mod.named_parameters(recurse=False))
            if not params or not all(id(p) in self.param_names for p in params.values()):
                continue
            if isinstance(mod, torch.nn.Linear):
                self.linears[mod_name] = mod
            elif mod is input_embedding:
                self.embeddings[mod_name] = mod
            elif (
                isinstance(mod, NORMS)
                and set(params) <= {"weight", "bias"}
                and all(p.dim() == 1 for p in params.values())
            ):
                self.norms[mod_name] = mod
        trainable, covered = [p for p in model.parameters() if p.requires_grad], self.covered_ids()
        self.n_trainable = sum(p.numel() for p in trainable)
        self.covered = sum(p.numel() for p in trainable if id(p) in covered)

    def covered_ids(self):
        """ids of the parameters whose gradient the hooks reach."""
        groups = (self.linears, self.norms, self.embeddings)
        return {id(p) for group in groups for m in group.values() for p in m.parameters(recurse=False)}

    def refuse_other_shared_weights(self, output_layer):
        """per_tensor needs the norm of each parameter's whole gradient; a parameter used by several modules
        (other than the input embedding tied to the output layer, whose cross term embedding_squares computes) would
        be normalised per use."""
        uses = {}
        for group in (self.linears, self.norms, self.embeddings):
            for mod_name, mod in group.items():
                if mod is output_layer and self.tied:
                    continue
                for p in mod.parameters(recurse=False):
                    uses.setdefault(id(p), []).append(mod_name)
        shared = {self.param_names[i]: m for i, m in uses.items() if len(m) > 1}
        if shared:
            name, mods = next(iter(shared.items()))
            raise ValueError(
                f"attribution.projector.normalize=per_tensor: parameter {name} is shared by modules "
                f"{', '.join(mods)}; kind=sketch normalises a shared weight only between the input "
                "embedding and a tied output layer (use kind=rapidin)"
            )

    def coverage(self):
        """Share of trainable parameters whose gradient the sketch includes."""
        return self.covered / max(1, self.n_trainable)

    def spec(self):
        spec = {
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "normalize": self.normalizer.name,
            "method": self.method,
            "plan_tokens": self.plan_tokens,
            "hash": "murmur3-fmix32",
            "coverage": round(self.coverage(), 6),
        }
        return {**spec, "precondition": self.precondition.spec()} if self.precondition is not None else spec

    def corrected(self, name, value):
        """A 1-D parameter's per-example gradients [B, n] times the optimizer correction (if any)."""
        return value if self.precondition is None else value * self.precondition.vector(name, value.device)

    # -- hashes and work arrays, kept between batches -------------------------------------------------------
    def signs(self, name, numel, start, end, device):
        """Random signs (int8) of coordinates [start, end) of a parameter of `numel` coordinates, from the counter
        hash of (seed, name, index). A parameter's whole sign vector is kept while the cache has room
        (`cache_bytes`, 1 byte per coordinate, first come first kept: the pass visits layers in a fixed cycle,
        which evicting would turn into a miss every time); beyond it, only the block asked for is hashed, on the
        spot."""
        key = ("sign", name, numel, str(device))
        sign = self.cache.get(key)
        if sign is None and self.cached_bytes + numel <= self.cache_bytes:
            sign = self.cache[key] = self.hash_signs(name, 0, numel, device)
            self.cached_bytes += numel
        return sign[start:end] if sign is not None else self.hash_signs(name, start, end, device)

    def hash_signs(self, name, start, end, device):
        index = torch.arange(start, end, dtype=torch.int64, device=device)
        return random_signs(index, name_key(self.seed, name, "sign")).to(torch.int8)

    def offsets(self, name, first, last, device):
        """Random rotation of the k-long chunks first..last - 1 of a parameter's flat index ([chunks] int64)."""
        return chunk_offsets(first, last, name_key(self.seed, name, "offset"), self.k, device)

    def axis_hash(self, name, axis, size, device):
        """TensorSketch's per-axis bucket and sign (size numbers: cached, a few MB even for a 100k vocabulary)."""
        key = ("axis", name, axis, size, str(device))
        if key not in self.cache:
            keys = (name_key(self.seed, name, f"ts-bucket-{axis}"), name_key(self.seed, name, f"ts-sign-{axis}"))
            self.cache[key] = axis_hash(size, *keys, self.k, device)
        return self.cache[key]

    def scratch(self, role, shape, device):
        """A reused float32 work array (fresh allocations of a block's size cost page faults on a CPU)."""
        need = math.prod(shape)
        buf = self.scratches.get(role)
        if buf is None or buf.numel() < need or buf.device != device:
            buf = self.scratches[role] = torch.empty(need, device=device)
        return buf[:need].view(shape)

    def buffer(self, shape, x):
        """A reused [B, rows, in] workspace for the per-example GEMM: fresh allocations of this size cost more in
        page faults than the GEMM itself on a CPU."""
        need = math.prod(shape)
        ws = self.workspace
        if ws is None or ws.numel() < need or ws.device != x.device or ws.dtype != x.dtype:
            self.workspace = torch.empty(need, device=x.device, dtype=x.dtype)
        return self.workspace[:need].view(shape)

    # -- the count sketch of a flat gradient ----------------------------------------------------------------
    def sketch_flat(self, name, flat):
        """[B, numel] per-example gradients -> [B, k]: a count sketch whose buckets are k-long chunks of the flat
        index, each rotated by a random offset, with an independent random sign per coordinate. Two coordinates
        of different chunks collide with probability 1/k and those of one chunk never do, so inner products keep
        the count sketch's unbiasedness and (at most) its variance -- at the cost of contiguous adds, not a
        scatter."""
        out = torch.zeros(flat.shape[0], self.k, device=flat.device)
        return self.fold_into(out, name, flat, 0, flat.shape[1])

    def fold_into(self, out, name, part, start, numel):
        """out [B, k] += sketch_flat of the coordinates [start, start + width) of a parameter of `numel`
        coordinates, given as part [B, width] (a block of rows of a layer's per-example gradients).

        Three schedules of the same sums (`fold_schedule`, the key attribution.projector.fold; auto: triton on
        CUDA where triton is installed, else index; slices on a CPU):
        - triton (lark.kernel.fold_triton.fold): one kernel per block, no atomics, bucket offsets and signs hashed
          in registers (no sign cache, no signed copy). Adds chunk by chunk like slices.
        - index (sketch_math.fold_index): a fixed number of tensor operations per block whatever width / k. A
          GPU's block is a whole layer, and a loop over its chunks would launch P / k ~ 10^5 small kernels per
          batch at 7B (benchmarks/fold_profile.py counts them).
        - slices (sketch_math.fold_slices): each chunk the block touches as at most two contiguous adds. On a
          CPU an operation costs microseconds, not a launch, its blocks are cache-sized (a few chunks), and
          index_add_ costs 3-9x more per coordinate (measured: docs/benchmarks.md).
        On a CPU all three give the same float32 sums bit for bit (tested; triton under TRITON_INTERPRET=1)."""
        k, width = self.k, part.shape[1]
        schedule = fold_schedule(self.fold_schedule, part.device)
        if schedule == "triton":
            keys = (name_key(self.seed, name, "offset"), name_key(self.seed, name, "sign"))
            return fold_triton.fold(out, part, start, *keys)
        sign = self.signs(name, numel, start, start + width, part.device)
        offsets = self.offsets(name, start // k, -(-(start + width) // k), part.device)
        if schedule == "index":
            return fold_index(out, part, sign, offsets, start, self.scratch("signed", part.shape, part.device))
        return fold_slices(out, part, sign, offsets, start)

    # -- one layer's per-example gradients ------------------------------------------------------------------
    def use_tensorsketch(self, t, n_in, n_out, element_size):
        """`auto`: TensorSketch where it moves fewer bytes per example -- about 8 passes over [T, k] float32
        arrays -- than materialising: writing and reading G (out * in elements) plus the GEMM that is already
        the price of a training step's weight gradient. On a 7B model at T = 512 only the 100k-vocabulary
        output layer qualifies; on small CPU models, none (docs/scaling.md)."""
        if self.method != "auto":
            return self.method == "tensorsketch"
        return 8 * 4 * t * self.k < 3 * n_in * n_out * element_size

    def per_example_gemm(self, delta, x):
        """The layer's per-example weight gradients as blocks of rows (see BlockedGemm): on a CPU blocks of
        `block_elements` (cache-sized), on a GPU of up to `max_workspace` (usually the whole layer)."""
        budget = self.block_elements if x.device.type == "cpu" else self.max_workspace
        rows = max(budget // (delta.shape[0] * x.shape[-1]), x.shape[1], 1)  # at least T rows: thinner GEMMs
        return BlockedGemm(delta, x, min(rows, delta.shape[-1]), self.buffer)  # re-read X for too little work

    def add_linear(self, run, mod, x, delta):
        """A Linear layer's bias and weight, from its input x [B, T, in] and output gradient delta [B, T, out].
        The per-example GEMM runs in the model's dtype (bf16 tensor cores on a GPU); sketches add up in float32."""
        w_name = self.param_names[id(mod.weight)]
        if mod.bias is not None:
            b_name = self.param_names[id(mod.bias)]
            run.add(b_name, "flat", self.corrected(b_name, delta.float().sum(dim=1)))
        if self.precondition is not None:  # diag(row) G diag(col) = (Delta * row)^T (X * col)
            row, col = self.precondition.factors(w_name, x.device)
            delta, x = delta * row.to(delta.dtype), x * col.to(x.dtype)
        tied = mod.weight is self.input_weight  # must share the embedding's flat hash to add up
        if tied and self.normalizer.needs_norms:
            run.output_rows = rows_at_tokens(run.tokens, delta, x)
        if tied or not self.use_tensorsketch(self.plan_tokens, x.shape[-1], delta.shape[-1], x.element_size()):
            run.add(w_name, "flat", self.per_example_gemm(delta, x))
            return
        hashes = (
            self.axis_hash(w_name, 0, delta.shape[-1], delta.device),
            self.axis_hash(w_name, 1, x.shape[-1], x.device),
        )
        squares = frobenius(delta.float(), x.float()) if self.normalizer.needs_norms else None
        run.add(w_name, "sketch", tensorsketch(delta, x, *hashes, self.k), squares)

    def add_norm(self, run, mod, out, grad):
        """A norm layer's bias and weight, from its output and output gradient [B, T, n] (norm_gradients)."""
        bias = getattr(mod, "bias", None)
        weight_grad, bias_grad = norm_gradients(grad, out, mod.weight, bias)
        if bias is not None:
            b_name = self.param_names[id(bias)]
            run.add(b_name, "flat", self.corrected(b_name, bias_grad))
        w_name = self.param_names[id(mod.weight)]
        run.add(w_name, "flat", self.corrected(w_name, weight_grad))

    def add_embedding(self, run, mod, grad):
        """The input embedding's weight, from d loss / d embedding [B, T, d] of the looked-up rows."""
        name = self.param_names[id(mod.weight)]
        if self.precondition is not None:
            grad = self.precondition.rows(name, run.tokens, grad)
        grad = without_padding(grad, run.tokens, getattr(mod, "padding_idx", None))
        keys = (name_key(self.seed, name, "offset"), name_key(self.seed, name, "sign"))
        sketch = embedding_sketch(run.tokens, grad, *keys, self.k)
        squares = embedding_squares(run.tokens, grad, run.output_rows) if self.normalizer.needs_norms else None
        run.add(name, "sketch", sketch, squares)

    # -- the pass -------------------------------------------------------------------------------------------
    def project_batch(self, model, batch):
        """[B, k] sketches of the per-example gradients of the mean loss over each example's loss tokens.

        Each layer is sketched inside the backward pass, as soon as its output gradient arrives, and its saved
        input is released then: no more than one layer's (X, Delta) is held beyond what the floor holds."""
        return self.sketch_pass(model, batch).total

    def sketch_pass(self, model, batch, by_parameter=False):
        """The SketchPass of one batch: its total [B, k] (NaN rows for examples whose loss is not finite, reported
        and left out like rapidin's), and with by_parameter each parameter's share."""
        tied_name = self.param_names[id(self.input_weight)] if self.tied else None
        run = SketchPass(
            batch["input_ids"], self.k, self.normalizer, self.fold_into, self.scratch, tied_name, by_parameter
        )
        losses, embeds_grad = self.backward(model, batch, run)
        embedding = model.get_input_embeddings()
        if embedding in self.embeddings.values() and embeds_grad is not None:
            self.add_embedding(run, embedding, embeds_grad)
        run.finish()
        run.total[~torch.isfinite(losses.detach())] = float("nan")
        self.last_norms = run.norms
        return run

    def backward(self, model, batch, run):
        """Forward and backward with the hooks on and the parameters' own gradients off (no weight-gradient GEMMs:
        the hooks do that work). Returns the losses [B] and d loss / d embedding [B, T, d] (or None)."""
        handles = [
            mod.register_forward_hook(self.keep_input(run, name))
            for group in (self.linears, self.norms)
            for name, mod in group.items()
        ]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
            losses = per_example_loss(logits, batch["labels"])
            del logits
            losses.nan_to_num(0.0).sum().backward()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for h in handles:
                h.remove()
        return losses, embeds.grad

    def keep_input(self, run, name):
        """A forward hook saving a layer's input (norms: and output, xhat = out / w) and hooking its output's
        gradient to consume them."""

        def hook(mod, args, output):
            run.saved[name] = (args[0].detach(), output.detach() if name in self.norms else None)
            if output.requires_grad:
                output.register_hook(lambda g: self.consume(run, name, run.saved.pop(name), g.detach()))

        return hook

    def consume(self, run, name, inputs, grad):
        """Add one layer's per-example sketches (called from the layer's output-gradient hook)."""
        x, out = inputs
        if name in self.linears:
            self.add_linear(run, self.linears[name], x, grad)
        else:
            self.add_norm(run, self.norms[name], out, grad)
