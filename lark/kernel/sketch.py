"""The `sketch` projector: per-example gradient sketches from forward/backward hooks, batched like training.

For a Linear layer y_t = W x_t (+ b), one example's weight gradient is G = sum_t delta_t x_t^T, where x_t is the
layer input and delta_t = dL/dy_t. The hooks see X [B, T, in] and Delta [B, T, out] for a whole batch; the
model's own weight-gradient GEMMs are switched off (parameters do not require grad during the pass) and each
layer's contribution to the global k-dim count sketch is computed from (X, Delta) directly:

- `materialize`: G_b = Delta_b^T X_b by batched GEMMs, then a "rotated-chunk" count sketch (sketch_flat): the
  flat index is cut into k-long chunks, each rotated by a random offset, with a random sign per coordinate, all
  from a counter-based hash of (seed, parameter name, index). Contiguous adds instead of a scatter; the same
  unbiasedness and (at most) the variance of `rapidin`'s fully hashed count sketch, but not the same vectors.
  On a CPU, G is produced a block of rows at a time, small enough to stay in cache (`block_elements`), and each
  block is folded while it is there: no round trip of G through main memory, and a workspace of about 2^19
  numbers (at least T rows) instead of B * out * in (a per-example G is B times a training step's weight
  gradient). On a GPU one block usually holds the layer.
- `tensorsketch`: TensorSketch (Pham & Pagh 2013) of G without forming it: coordinate (i, j) goes to bucket
  (h1(i) + h2(j)) mod k with sign s1(i) s2(j); count-sketch delta_t and x_t into k dims, multiply their FFTs,
  sum over tokens, one inverse FFT per example. Cost T * k log k per example instead of T * in * out: the
  cheaper choice for large layers (7B: in * out = 16.7M >> k log k = 1M). Variance close to a count sketch's.
- `auto`: per layer, the one that moves fewer bytes at `plan_tokens` tokens (see use_tensorsketch).

Embedding rows: dL/dE[v] = sum over positions t with token v of dL/d(embedding_t): sketched token by token with
the same bucket and sign as sketch_flat gives coordinate (v, column) -- the V x d gradient is never formed
(and a tied output layer adds into the same buckets). RMSNorm/LayerNorm weights (1-D, out = w * xhat + b):
exact per-example gradient sum_t g_t * xhat_t (xhat = (out - b) / w), then sketched. Everything the hooks do not
reach is reported by `coverage()`; for the OLMo-3 family it is 100%.

`normalize="per_tensor"` (RapidIn's per-tensor L2 normalisation): each parameter's sketch is divided by the norm of
that parameter's per-example gradient, which is computed without forming anything bigger than the sketch does --
materialised layers sum the squares of their blocks while they are in cache, TensorSketch layers use
||G||^2 = sum_{t,s} (x_t.x_s)(delta_t.delta_s) (frobenius), embeddings sum_{s,s'} [tok_s = tok_s'] e_s.e_s'
(e_s = dL/d embedding_s). A tied input/output embedding's gradient is a + b (embedding part, output-layer part),
sketched into one vector and divided once by ||a + b||^2 = ||a||^2 + ||b||^2 + 2<a, b>, where
<a, b> = sum_s e_s . b[tok_s] and the rows b[tok_s] = sum_t delta[t, tok_s] x_t come from the output layer's
(X, Delta): O(T^2 d) per example, V x d never formed. Other weights shared between modules are refused.

Optimizer correction (`precondition`, lark.kernel.optimizer.AdamScale, kernels adam/trackstar): with factored
moments the
per-coordinate factor of a matrix is row_i * col_j, so G_b's correction is diag(row) G_b diag(col) =
(Delta_b * row)^T (X_b * col): Delta and X are scaled before the GEMM (or TensorSketch), nothing else is formed;
embedding gradients get row[token] * col per position, 1-D parameters (norms, biases) the exact division.
"""

import math

import torch
import torch.nn.functional as F

from lark.data.formats import IGNORE
from lark.kernel.hashing import hashed, name_key, random_signs


class HookSketch:
    kind = "sketch"

    def __init__(
        self, model, k, seed=0, normalize="none", method="auto", plan_tokens=512, cache_bytes=2**30, precondition=None
    ):
        if normalize not in ("none", "per_tensor"):
            raise ValueError(f"attribution.projector.normalize: unknown '{normalize}' (none or per_tensor)")
        if method not in ("auto", "materialize", "tensorsketch"):
            raise ValueError(f"attribution.projector.method: unknown '{method}' (auto, materialize, tensorsketch)")
        self.k, self.seed, self.normalize, self.method = int(k), int(seed), normalize, method
        self.plan_tokens = int(plan_tokens)  # T that `auto` plans each layer for: not the batch's, so an
        # example's vector never depends on how its batch is padded
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        input_embedding = model.get_input_embeddings()
        self.linears, self.norms, self.embeddings = {}, {}, {}
        for mod_name, mod in model.named_modules():
            params = dict(mod.named_parameters(recurse=False))
            if not params or not all(id(p) in names for p in params.values()):
                continue
            if isinstance(mod, torch.nn.Linear):
                self.linears[mod_name] = mod
            elif mod is input_embedding:
                self.embeddings[mod_name] = mod
            elif (
                "norm" in type(mod).__name__.lower()
                and set(params) <= {"weight", "bias"}
                and all(p.dim() == 1 for p in params.values())
            ):
                self.norms[mod_name] = mod
        self.param_names = names
        self.total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        covered = {
            id(p)
            for group in (self.linears, self.norms, self.embeddings)
            for m in group.values()
            for p in m.parameters(recurse=False)
        }
        self.covered = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) in covered)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.tied = out is not None and out.weight is input_embedding.weight
        if normalize == "per_tensor":
            self.refuse_other_shared_weights(out)
        self.input_weight = input_embedding.weight
        self.precondition = precondition  # lark.kernel.optimizer.AdamScale or None
        # per_tensor: the tied weight's two parts (output layer, input embedding) add up in `pending` and are
        # divided once by the norm of their sum (see finish); `last_norms` keeps each parameter's per-example
        # gradient norms of the last batch (what the per-tensor division used), for checking against autograd
        self.pending, self.output_rows, self.last_norms = {}, None, {}
        self.cache, self.workspace, self.scratches = {}, None, {}
        self.max_workspace = 2**28  # elements of the per-example GEMM workspace on a GPU (1 GiB of float32)
        self.block_elements = 2**19  # on a CPU: G blocks of 2 MiB (float32), folded while they are in cache
        self.cache_bytes = int(cache_bytes)  # attribution.projector.cache_bytes: signs kept between batches
        self.cached_bytes = 0
        self.fold_schedule = "auto"  # fold_into: auto (slices on a CPU, index elsewhere) | index | slices

    def refuse_other_shared_weights(self, output_layer):
        """per_tensor needs the norm of each parameter's whole gradient; a parameter used by several modules
        (other than the input embedding tied to the output layer, whose cross term embedding_sketch computes) would
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
        return self.covered / max(1, self.total)

    def spec(self):
        spec = {
            "kind": self.kind,
            "k": self.k,
            "seed": self.seed,
            "normalize": self.normalize,
            "method": self.method,
            "plan_tokens": self.plan_tokens,
            "hash": "murmur3-fmix32",
            "coverage": round(self.coverage(), 6),
        }
        return {**spec, "precondition": self.precondition.spec()} if self.precondition is not None else spec

    def corrected(self, name, value):
        """A 1-D parameter's per-example gradients [B, n] times the optimizer correction (if any)."""
        return value if self.precondition is None else value * self.precondition.vector(name, value.device)

    # -- hashing -------------------------------------------------------------------------------------------
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
        index = torch.arange(first, last, dtype=torch.int64, device=device)
        return hashed(index, name_key(self.seed, name, "offset")) % self.k

    def buckets(self, name, flat_index):
        """Bucket of flat coordinates: chunk c = index // k is rotated by offset(c)."""
        chunk, pos = flat_index // self.k, flat_index % self.k
        return (hashed(chunk, name_key(self.seed, name, "offset")) % self.k + pos) % self.k

    def axis_hash(self, name, axis, size, device):
        """TensorSketch's per-axis bucket and sign (size numbers: cached, a few MB even for a 100k vocabulary)."""
        key = ("axis", name, axis, size, str(device))
        if key not in self.cache:
            index = torch.arange(size, dtype=torch.int64, device=device)
            bucket = hashed(index, name_key(self.seed, name, f"ts-bucket-{axis}")) % self.k
            sign = random_signs(index, name_key(self.seed, name, f"ts-sign-{axis}"))
            self.cache[key] = (bucket, sign)
        return self.cache[key]

    # -- per-layer sketches -----------------------------------------------------------------------------------
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

        Two schedules of the same sums (`fold_schedule`; auto: slices on a CPU, index elsewhere):
        - index: a fixed number of tensor operations per block whatever width / k -- one index_add_ of the
          signed block at its buckets (chunk c = i // k is rotated by offset_c: bucket (offset_c + i mod k)
          mod k). A GPU's block is a whole layer, and a loop over its chunks would launch P / k ~ 10^5 small
          kernels per batch at 7B (benchmarks/fold_profile.py counts them).
        - slices: each chunk the block touches as at most two contiguous adds. On a CPU an operation costs
          microseconds, not a launch, its blocks are cache-sized (a few chunks), and index_add_ costs 3-9x
          more per coordinate (measured: docs/benchmarks.md).
        On a CPU index_add_ adds in index order, i.e. chunk by chunk like the slices: both give the same
        float32 sums bit for bit (tested); on a GPU its atomic adds may round the last bit differently from
        run to run."""
        k, width = self.k, part.shape[1]
        first, last = start // k, -(-(start + width) // k)
        sign = self.signs(name, numel, start, start + width, part.device)
        offsets = self.offsets(name, first, last, part.device)
        schedule = self.fold_schedule
        if schedule == "auto":
            schedule = "slices" if part.device.type == "cpu" else "index"
        if schedule == "index":
            bucket = torch.arange(k, device=part.device) + offsets.unsqueeze(1)  # [chunks, k]
            bucket = torch.where(bucket >= k, bucket - k, bucket).view(-1)[start - first * k :][:width]
            signed = torch.mul(part, sign, out=self.scratch("signed", part.shape, part.device))
            return out.index_add_(1, bucket, signed)
        if schedule != "slices":
            raise ValueError(f"HookSketch.fold_schedule: unknown '{schedule}' (auto, index or slices)")
        sign = sign.float()
        for c, offset in enumerate(offsets.tolist(), start=first):
            lo, hi = max(start, c * k), min(start + width, (c + 1) * k)  # this chunk's share of the block
            pos = (offset + lo - c * k) % k  # where lo lands
            head = min(hi - lo, k - pos)
            out[:, pos : pos + head].addcmul_(
                part[:, lo - start : lo - start + head], sign[lo - start : lo - start + head]
            )
            if hi - lo > head:  # wraps around to [0, ...)
                out[:, : hi - lo - head].addcmul_(
                    part[:, lo - start + head : hi - start], sign[lo - start + head : hi - start]
                )
        return out

    def scratch(self, role, shape, device):
        """A reused float32 work array (fresh allocations of a block's size cost page faults on a CPU)."""
        need = math.prod(shape)
        buf = self.scratches.get(role)
        if buf is None or buf.numel() < need or buf.device != device:
            buf = self.scratches[role] = torch.empty(need, device=device)
        return buf[:need].view(shape)

    def use_tensorsketch(self, t, n_in, n_out, element_size):
        """`auto`: TensorSketch where it moves fewer bytes per example -- about 8 passes over [T, k] float32
        arrays -- than materialising: writing and reading G (out * in elements) plus the GEMM that is already
        the price of a training step's weight gradient. On a 7B model at T = 512 only the 100k-vocabulary
        output layer qualifies; on small CPU models, none (docs/scaling.md)."""
        if self.method != "auto":
            return self.method == "tensorsketch"
        return 8 * 4 * t * self.k < 3 * n_in * n_out * element_size

    def tensorsketch(self, name, delta, x):
        """TensorSketch of sum_t delta_t x_t^T for each example: [B, T, out], [B, T, in] -> [B, k]."""
        delta, x = delta.float(), x.float()
        b1, s1 = self.axis_hash(name, 0, delta.shape[-1], delta.device)
        b2, s2 = self.axis_hash(name, 1, x.shape[-1], x.device)
        cs1 = torch.zeros(*delta.shape[:2], self.k, device=delta.device).index_add_(2, b1, delta * s1)
        cs2 = torch.zeros(*x.shape[:2], self.k, device=x.device).index_add_(2, b2, x * s2)
        product = (torch.fft.rfft(cs1, dim=-1) * torch.fft.rfft(cs2, dim=-1)).sum(dim=1)
        return torch.fft.irfft(product, n=self.k, dim=-1)

    def linear_sketch(self, mod_name, mod, x, delta):
        """The per-example GEMM runs in the model's dtype (bf16 tensor cores on a GPU); sketches add up in float32."""
        w_name = self.param_names[id(mod.weight)]
        parts = {}
        if mod.bias is not None:
            b_name = self.param_names[id(mod.bias)]
            parts[b_name] = ("flat", self.corrected(b_name, delta.float().sum(dim=1)))
        if self.precondition is not None:  # diag(row) G diag(col) = (Delta * row)^T (X * col)
            row, col = self.precondition.factors(w_name, x.device)
            delta, x = delta * row.to(delta.dtype), x * col.to(x.dtype)
        tied = mod.weight is self.input_weight  # must share the embedding's flat hash to add up
        if tied and self.normalize == "per_tensor":
            self.output_rows = self.rows_at_tokens(delta, x)
        if not tied and self.use_tensorsketch(self.plan_tokens, x.shape[-1], delta.shape[-1], x.element_size()):
            parts[w_name] = ("sketch", self.tensorsketch(w_name, delta, x), self.frobenius(delta.float(), x.float()))
        else:
            parts[w_name] = ("flat", self.per_example_gemm(delta, x))
        return parts

    def per_example_gemm(self, delta, x):
        """The layer's per-example weight gradients as blocks of rows (see BlockedGemm): on a CPU blocks of
        `block_elements` (cache-sized), on a GPU of up to `max_workspace` (usually the whole layer)."""
        budget = self.block_elements if x.device.type == "cpu" else self.max_workspace
        rows = max(budget // (delta.shape[0] * x.shape[-1]), x.shape[1], 1)  # at least T rows: thinner GEMMs
        return BlockedGemm(self, delta, x, min(rows, delta.shape[-1]))  # re-read X for too little work

    def buffer(self, shape, x):
        """A reused [B, rows, in] workspace for the per-example GEMM: fresh allocations of this size cost more in
        page faults than the GEMM itself on a CPU."""
        need = math.prod(shape)
        if (
            self.workspace is None
            or self.workspace.numel() < need
            or self.workspace.device != x.device
            or self.workspace.dtype != x.dtype
        ):
            self.workspace = torch.empty(need, device=x.device, dtype=x.dtype)
        return self.workspace[:need].view(shape)

    @staticmethod
    def frobenius(delta, x):
        """||sum_t delta_t x_t^T||_F^2 per example without forming it: sum_{t,s} (x_t.x_s)(delta_t.delta_s)."""
        return ((x @ x.transpose(1, 2)) * (delta @ delta.transpose(1, 2))).sum(dim=(1, 2)).clamp_min(0)

    def rows_at_tokens(self, delta, x):
        """Rows of a tied output layer's per-example gradient b = sum_t delta_t x_t^T at the input tokens,
        [B, T, d]: row s is b[tok_s] = sum_t delta[t, tok_s] x_t. O(T^2 d) per example; V x d is never formed."""
        tokens = self.tokens.unsqueeze(1).expand(-1, delta.shape[1], -1)  # [B, T (t), T (s)]
        return delta.gather(2, tokens).float().transpose(1, 2) @ x.float()

    def embedding_sketch(self, mod, tokens, grad):
        """Count sketch of the embedding gradient from token ids [B, T] and d loss/d embedding [B, T, d]."""
        name = self.param_names[id(mod.weight)]
        if getattr(mod, "padding_idx", None) is not None:  # nn.Embedding never gives that row a gradient (Llama:
            grad = grad.masked_fill((tokens == mod.padding_idx).unsqueeze(-1), 0)  # the pad id, = eos in SmolLM2)
        d = grad.shape[-1]
        flat_index = tokens.unsqueeze(-1) * d + torch.arange(d, device=tokens.device)  # [B, T, d]
        bucket = self.buckets(name, flat_index)
        sign = random_signs(flat_index, name_key(self.seed, name, "sign"))
        out = torch.zeros(grad.shape[0], self.k, device=grad.device)
        out.scatter_add_(1, bucket.flatten(1), (grad.float() * sign).flatten(1))
        squares = None
        if self.normalize == "per_tensor":  # rows of one token id add up: sum_{s,s'} [tok_s = tok_s'] e_s.e_s'
            e = grad.float()
            same = tokens.unsqueeze(2) == tokens.unsqueeze(1)
            squares = ((e @ e.transpose(1, 2)) * same).sum(dim=(1, 2))
            if self.output_rows is not None:  # tied: ||a + b||^2 = ||a||^2 + 2<a, b> (+ ||b||^2 from the output
                squares = squares + 2 * (self.output_rows * e).sum(dim=(1, 2))  # layer): <a, b> = sum_s e_s.b[tok_s]
                self.output_rows = None
        return name, out, squares

    # -- the pass -------------------------------------------------------------------------------------------
    def project_batch(self, model, batch):
        """[B, k] sketches of the per-example gradients of the mean loss over each example's loss tokens.

        Each layer is sketched inside the backward pass, as soon as its output gradient arrives, and its saved
        input is released then: no more than one layer's (X, Delta) is held beyond what the floor holds."""
        saved, handles = {}, []
        total = torch.zeros(batch["input_ids"].shape[0], self.k, device=batch["input_ids"].device)
        self.tokens, self.pending, self.output_rows, self.last_norms = batch["input_ids"], {}, None, {}

        def keep_input(name):
            def hook(mod, args, output):  # norms need their output (xhat = out / w); linears only the input
                saved[name] = (args[0].detach(), output.detach() if name in self.norms else None)
                if output.requires_grad:
                    output.register_hook(lambda g: self.consume(total, name, saved.pop(name), g.detach()))

            return hook

        for group in (self.linears, self.norms):
            for name, mod in group.items():
                handles.append(mod.register_forward_hook(keep_input(name)))
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)  # no weight-gradient GEMMs: the hooks do that work
            embedding = model.get_input_embeddings()
            embeds = embedding(batch["input_ids"]).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
            losses = per_example_loss(logits, batch["labels"])
            del logits
            losses.nan_to_num(0.0).sum().backward()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            for h in handles:
                h.remove()
        if embedding in self.embeddings.values() and embeds.grad is not None:
            grad = (
                embeds.grad
                if self.precondition is None
                else self.precondition.rows(self.param_names[id(embedding.weight)], batch["input_ids"], embeds.grad)
            )
            name, sketch, squares = self.embedding_sketch(embedding, batch["input_ids"], grad)
            self.add(total, name, "sketch", sketch, squares)
        self.finish(total)
        total[~torch.isfinite(losses.detach())] = float("nan")  # reported and left out, like rapidin's
        return total

    def consume(self, total, name, inputs, grad):
        """Add one layer's per-example sketches to `total` (called from the layer's output-gradient hook)."""
        x, out = inputs
        if name in self.linears:
            for pname, part in self.linear_sketch(name, self.linears[name], x, grad).items():
                self.add(total, pname, *part)
            return
        mod, g, out = self.norms[name], grad.float(), out.float()
        bias = getattr(mod, "bias", None)
        if bias is not None:
            b_name = self.param_names[id(bias)]
            self.add(total, b_name, "flat", self.corrected(b_name, g.flatten(1, -2).sum(1)))
            out = out - bias.detach().float()
        xhat = out / mod.weight.detach().float()
        w_name = self.param_names[id(mod.weight)]
        self.add(total, w_name, "flat", self.corrected(w_name, (g * xhat).flatten(1, -2).sum(1)))

    def add(self, total, name, kind, value, squares=None):
        """total += the sketch of one parameter's per-example gradients: kind "flat" = [B, numel] or a
        BlockedGemm, folded here; kind "sketch" = a [B, k] sketch, with `squares` its gradients' squared norms.
        Under per_tensor each parameter is divided by its norm -- a gradient that comes whole (one block) before
        it is folded, straight into total; one in several blocks after, from a reused [B, k] buffer -- and a tied
        weight's two parts are only summed here, and divided by the norm of their sum in finish()."""
        if self.normalize != "per_tensor":
            if kind == "flat":
                self.fold(total, name, value)
            else:
                total += value
            return
        if self.tied and name == self.param_names[id(self.input_weight)]:
            layer, so_far = self.pending.get(name) or (torch.zeros_like(total), 0)
            if kind == "flat":
                squares = self.fold(layer, name, value)
            else:
                layer += value
            self.pending[name] = (layer, so_far + squares)
            return
        if kind != "flat":
            total.addcmul_(value, self.inverse_norm(name, squares).unsqueeze(1))
            return
        gemm = isinstance(value, BlockedGemm)
        blocks, numel = (value, value.numel) if gemm else ([(value, 0)], value.shape[1])
        layer, squares = None, 0
        for part, start in blocks:
            if start == 0 and part.shape[1] == numel:  # whole: divide (the GEMM's own buffer in place), fold
                inverse = self.inverse_norm(name, self.squares(part)).unsqueeze(1)
                self.fold_into(total, name, part.mul_(inverse) if gemm else part * inverse, 0, numel)
                return
            layer = self.scratch("layer", total.shape, total.device).zero_() if layer is None else layer
            self.fold_into(layer, name, part, start, numel)
            squares = squares + self.squares(part)
        total.addcmul_(layer, self.inverse_norm(name, squares).unsqueeze(1))

    def fold(self, out, name, value):
        """out [B, k] += sketch_flat of a per-example gradient (given whole or as BlockedGemm blocks); returns
        the gradients' squared norms [B] under per_tensor (from the blocks while they are in cache), else None."""
        blocks, numel = (value, value.numel) if isinstance(value, BlockedGemm) else ([(value, 0)], value.shape[1])
        squares = 0 if self.normalize == "per_tensor" else None
        for part, start in blocks:
            self.fold_into(out, name, part, start, numel)
            if squares is not None:
                squares = squares + self.squares(part)
        return squares

    @staticmethod
    def squares(part):
        """[B] squared norms of the rows of a [B, width] block (accumulated in float32)."""
        return torch.linalg.vector_norm(
            part, dim=1, dtype=None if part.dtype == torch.float32 else torch.float32
        ).square()

    def inverse_norm(self, name, squares):
        """1 / ||gradient|| per example from its squared norm (a zero gradient stays zero, as in
        normalize_tensors); the norm is kept in last_norms."""
        norm = squares.clamp_min(0).sqrt()
        self.last_norms[name] = norm
        return 1 / norm.clamp_min(1e-30)

    def finish(self, total):
        """Normalise and add the parts of tied weights collected over the pass (per_tensor only)."""
        for name, (layer, squares) in self.pending.items():
            total.addcmul_(layer, self.inverse_norm(name, squares).unsqueeze(1))
        self.pending = {}


class BlockedGemm:
    """A layer's per-example weight gradients Delta_b^T X_b produced `rows` output rows at a time into one
    reused buffer: yields ([B, rows * in] block, flat index of its first coordinate). Each block must be consumed
    before the next overwrites it (add does)."""

    def __init__(self, sketch, delta, x, rows):
        self.sketch, self.delta, self.x, self.rows = sketch, delta, x, rows
        self.numel = delta.shape[-1] * x.shape[-1]

    def __iter__(self):
        b, n_in = self.x.shape[0], self.x.shape[-1]
        for r0 in range(0, self.delta.shape[-1], self.rows):
            d = self.delta[..., r0 : r0 + self.rows]
            out = self.sketch.buffer((b, d.shape[-1], n_in), self.x)
            yield torch.bmm(d.transpose(1, 2), self.x, out=out).flatten(1), r0 * n_in


def per_example_loss(logits, labels):
    """[B] mean next-token loss over each example's loss tokens (what HF computes for a batch of one); NaN for an
    example without loss tokens. Labels are shifted instead of logits, so the logits are never copied."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    counts = (targets != IGNORE).sum(dim=1)
    return losses.view_as(targets).sum(dim=1) / counts  # 0 / 0 = NaN: reported, not scored
