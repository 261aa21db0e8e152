"""The math of token-wise contributions (lark.kernel.tokens writes the files): a projector's transpose, the
kernel's per-example scaling, and the per-token directional derivatives of an example's loss.

An example's projected vector is linear in its gradient: r = P D N g with g = sum_t g_t, g_t the gradient of loss
token t's share (its loss / the number of loss tokens), D the optimizer correction (adam, trackstar; a fixed
diagonal) and N the per-tensor normalisation (rapidin: each parameter divided by the norm of this example's whole
D g). So for any w [k], <w, P D N g_t> = <u, g_t> with u = N D P^T w in parameter space (N, D diagonal), and
<u, g_t> for every token t at once is one forward-mode pass: the derivative of the per-token losses along u
(`token_derivatives`). No per-token backward pass, no per-token vector.

P^T w per projector (`transpose`), from the projector's own hashes and matrices:
- sketch (HookSketch): coordinate i of a parameter reads its bucket's value times its sign, w[bucket(i)] s(i)
  (the rotated-chunk count sketch; the input embedding and a tied output layer share the parameter's hash);
  a TensorSketch layer: U[i, j] = w[(h1(i) + h2(j)) mod k] s1(i) s2(j).
- factored: each matrix's block B = scale P_out G P_in^T, so U = scale P_out^T W P_in (W the slot as r_out x r_in);
  a 1-D parameter's slot is itself or its count sketch.
- rapidin, gaussian, exact (per-example projectors with project(grads)): autograd through project() at zero.
"""

import copy

import torch
from torch.func import functional_call, jvp

from lark.data.formats import IGNORE
from lark.kernel.factored import FactoredProjector, rademacher_signs
from lark.kernel.hashing import hashed, name_key, random_signs
from lark.kernel.normalizers import NoNorm
from lark.kernel.projectors import PerExample, example_gradient, trainable
from lark.kernel.sketch import HookSketch
from lark.kernel.sketch_math import rotated_buckets


# ------------------------------------------------------------------------------ P^T w
def transpose(projector, model, w):
    """{parameter name: P^T w in the parameter's shape (float32)} for w [k] float32: the parameters the projector
    reads (the others get no entry: their coordinates never reach the vector)."""
    if isinstance(projector, FactoredProjector):
        return factored_transpose(projector, model, w)
    if isinstance(projector, HookSketch):
        return sketch_transpose(projector, model, w)
    if isinstance(projector, PerExample):
        return autograd_transpose(projector, model, w)
    raise TypeError(f"attribution.tokens=topk: no transpose for the projector {type(projector).__name__}")


def flat_transpose(seed, name, numel, w):
    """[numel] P^T w of the rotated-chunk count sketch of one parameter (HookSketch.sketch_flat's hash)."""
    index = torch.arange(numel, dtype=torch.int64, device=w.device)
    bucket = rotated_buckets(index, name_key(seed, name, "offset"), w.shape[0])
    return w[bucket] * random_signs(index, name_key(seed, name, "sign"))


def sketch_transpose(projector, model, w):
    """P^T w of the `sketch` projector: flat hashes, TensorSketch's for the layers it sketches that way."""
    out = {}
    tensorsketch = {}
    for mod in projector.linears.values():
        n_out, n_in = mod.weight.shape
        uses_ts = projector.use_tensorsketch(projector.plan_tokens, n_in, n_out, mod.weight.element_size())
        if uses_ts and mod.weight is not projector.input_weight:
            tensorsketch[id(mod.weight)] = (n_out, n_in)
    for name, p in trainable(model):
        if id(p) not in projector.covered_ids():
            continue
        if id(p) in tensorsketch:
            n_out, n_in = tensorsketch[id(p)]
            (b1, s1), (b2, s2) = (projector.axis_hash(name, a, n, w.device) for a, n in ((0, n_out), (1, n_in)))
            bucket = (b1.unsqueeze(1) + b2.unsqueeze(0)) % w.shape[0]
            out[name] = w[bucket] * s1.unsqueeze(1) * s2.unsqueeze(0)
        else:
            out[name] = flat_transpose(projector.seed, name, p.numel(), w).view(p.shape)
    return out


def factored_transpose(projector, model, w):
    """P^T w of the `factored` projector, slot by slot in its concatenation order."""
    params, out, start = dict(trainable(model)), {}, 0
    for name, (size, ranks) in projector.slots.items():
        slot, start, p = w[start : start + size], start + size, params[name]
        if ranks is not None:
            n_out, n_in = p.shape
            sides = []
            for axis, n, r in (("out", n_out, ranks[0]), ("in", n_in, ranks[1])):
                key = name_key(projector.seed, name, f"factored-{axis}")
                sides.append(None if r >= n else rademacher_signs(r, n, key, w.device))
            scale = 1 / ((sides[0] is not None and ranks[0] or 1) * (sides[1] is not None and ranks[1] or 1)) ** 0.5
            u = slot.view(ranks) * scale
            u = u if sides[0] is None else sides[0].T @ u
            out[name] = u if sides[1] is None else u @ sides[1]
        elif p.numel() <= size:
            out[name] = slot.clone().view(p.shape)
        else:
            index = torch.arange(p.numel(), dtype=torch.int64, device=w.device)
            bucket = hashed(index, name_key(projector.seed, name, "factored-bucket")) % size
            sign = random_signs(index, name_key(projector.seed, name, "factored-sign"))
            out[name] = (slot[bucket] * sign).view(p.shape)
    return out


def autograd_transpose(projector, model, w):
    """P^T w of a per-example projector: the gradient of <w, project(g)> at g = 0 (without its normaliser, which
    `scaling` applies, and without its optimizer correction, likewise)."""
    plain = copy.copy(projector)
    plain.normalizer = NoNorm()
    zeros = {n: torch.zeros(p.shape, device=w.device, requires_grad=True) for n, p in trainable(model)}
    grads = torch.autograd.grad((plain.project(zeros) * w).sum(), list(zeros.values()), allow_unused=True)
    return {n: g for n, g in zip(zeros, grads) if g is not None}


# ------------------------------------------------------------------------------ N and D
def scaling(projector, model, example):
    """{parameter: the diagonal N D of one example} (float32, the parameter's shape or broadcastable): the
    optimizer correction D (projector.precondition) times, when the projector normalises per tensor, 1 / ||D g||
    of that parameter's gradient for this example (one backward pass). example: a batch of one."""
    params = trainable(model)
    pre = projector.precondition
    scale = {
        n: pre.scale(n, p.shape, p.device) if pre is not None else torch.ones((), device=p.device) for n, p in params
    }
    if projector.normalizer.needs_norms:
        _, grads = example_gradient(model, example, params)
        for n, g in grads.items():
            norm = torch.linalg.vector_norm((g.double() * scale[n].double()))
            scale[n] = scale[n] / norm.clamp_min(1e-30).float()
    return scale


# ------------------------------------------------------------------------------ per-token derivatives
def token_losses(model, params, example):
    """[T] each loss token's share of the example's loss (its cross-entropy / the number of loss tokens), at the
    position of the token it predicts (0 elsewhere): the loss lark.kernel.sketch_math.per_example_loss splits.
    params: {name: tensor} overriding the model's trainable parameters."""
    ids, labels = example["input_ids"], example["labels"]
    logits = functional_call(model, params, (ids,), {"attention_mask": example["attention_mask"]}).logits
    targets = labels[0, 1:]
    mask = targets != IGNORE
    losses = (
        torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets.clamp_min(0), reduction="none")
        * mask
        / mask.sum().clamp_min(1)
    )
    return torch.nn.functional.pad(losses, (1, 0))


def token_derivatives(model, example, tangents):
    """[m, T] <u_i, g_t>: the derivative of each loss token's share along each tangent u_i ({name: tensor}, the
    model's trainable parameters; missing ones are 0), by forward-mode autodiff with eager attention (PyTorch's
    fused attention kernels have no forward-mode derivative; both compute the same attention). An input embedding
    with a padding_idx gets no tangent on that row, as its gradient never has one."""
    params = {n: p.detach() for n, p in trainable(model)}
    embedding = model.get_input_embeddings()
    pad = getattr(embedding, "padding_idx", None)
    emb_name = next((n for n, p in params.items() if p is embedding.weight), None)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    rows = []
    try:
        for tangent in tangents:
            full = {n: tangent[n].to(p.dtype) if n in tangent else torch.zeros_like(p) for n, p in params.items()}
            if pad is not None and emb_name in full:
                full[emb_name] = full[emb_name].clone()
                full[emb_name][pad] = 0
            _, derivative = jvp(lambda p: token_losses(model, p, example), (params,), (full,))
            rows.append(derivative.detach().float())
    finally:
        model.set_attn_implementation(before)
    return torch.stack(rows) if rows else torch.zeros(0, example["input_ids"].shape[1])


# ------------------------------------------------------------------------------ text pieces
def pieces(tokenizer, ids):
    """(text, [(start, end)] per token): text = the decoded ids (special tokens kept: what the model saw) and
    token i's piece text[start:end]. A token that decodes to part of a character (byte-level BPE) gets an empty
    piece and the character goes to the token that completes it."""
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    text, spans, done = decode(ids), [], 0
    for i in range(len(ids)):
        prefix = decode(ids[: i + 1]) if i + 1 < len(ids) else text
        end = len(prefix) if text.startswith(prefix) and "\ufffd" not in prefix[done:] else done
        spans.append((done, end))
        done = end
    return text, spans
