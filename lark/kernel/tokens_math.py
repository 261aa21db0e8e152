"""The math of token-wise contributions (lark.kernel.tokens writes the files): a projector's transpose, the
kernel's per-example scaling, and the per-token directional derivatives of an example's loss.

An example's projected vector is linear in its gradient: r = P D N g with g = sum_t g_t, g_t the gradient of loss
token t's share (its loss / the number of loss tokens), D the optimizer correction (adam, trackstar; a fixed
diagonal) and N the per-tensor normalisation (rapidin: each parameter divided by the norm of this example's whole
D g). So for any w [k], <w, P D N g_t> = <u, g_t> with u = N D P^T w in parameter space (N, D diagonal), and
<u, g_t> for every token t at once is one forward-mode pass: the derivative of the per-token losses along u
(`token_derivatives`), one pass per tangent u. Or, per loss token t, one backward pass gives g_t, dotted with every
tangent at once (`token_products`): the cheaper way when an example has fewer loss tokens than tangents (a query's
short answer against its many partners). Either way no per-token vector of the projection is formed.

P^T w per projector (`transpose`), from the projector's own hashes and matrices:
- sketch (HookSketch): coordinate i of a parameter reads its bucket's value times its sign, w[bucket(i)] s(i)
  (the rotated-chunk count sketch; the input embedding and a tied output layer share the parameter's hash);
  a TensorSketch layer: U[i, j] = w[(h1(i) + h2(j)) mod k] s1(i) s2(j).
- factored: each matrix's block B = scale P_out G P_in^T, so U = scale P_out^T W P_in (W the slot as r_out x r_in);
  a TensorSketched vocabulary matrix reads as the sketch's TensorSketch layers do, in its slot; a 1-D parameter's
  slot is itself or its count sketch.
- rapidin, gaussian, exact (per-example projectors with project(grads)): autograd through project() at zero.
"""

import contextlib
import copy
import itertools
import math
import os

import torch
from torch.func import functional_call, jvp, vmap

from lark.data.formats import IGNORE
from lark.kernel.factored import FactoredProjector
from lark.kernel.hashing import hashed, random_signs
from lark.kernel.normalizers import NoNorm
from lark.kernel.projectors import PerExample, example_gradient, trainable
from lark.kernel.sketch import HookSketch

# ------------------------------------------------------------------------------ P^T w
TRANSPOSABLE = (FactoredProjector, HookSketch, PerExample)  # the projector classes Transpose knows


class Transpose:
    """P^T of a projector: transpose(w) for w [m, k] float32 -> {parameter name: [m, *shape]}, the parameters the
    projector reads (the others get no entry: their coordinates never reach the vector). Each parameter's reader
    (its buckets and signs, or matrices) is made once, on the model's device."""

    def __init__(self, projector, model):
        self.projector, self.model = projector, model
        device = next(model.parameters()).device
        if isinstance(projector, FactoredProjector):
            self.readers = factored_readers(projector, model, device)
        elif isinstance(projector, HookSketch):
            self.readers = sketch_readers(projector, model, device)
        elif isinstance(projector, PerExample):
            self.readers = None
        else:  # lark.config_checks refuses such a projector at start (check_tokens)
            raise TypeError(f"attribution.tokens=topk: no transpose for the projector {type(projector).__name__}")

    def __call__(self, w, diagonal=None, names=None):
        """{name: [m, *shape]} P^T w, float32; with `diagonal` ({name: N D}, `scaling`; a parameter it leaves out
        is not scaled) the tangents N D P^T w in each parameter's dtype, made parameter by parameter (at 7B a
        float32 copy of every tangent would double what the pass holds); only those of `names` where given."""
        if self.readers is None:
            u = autograd_transpose(self.projector, self.model, w)
            return u if diagonal is None else {n: t * diagonal[n] if n in diagonal else t for n, t in u.items()}
        readers = {name: read for name, read in self.readers.items() if names is None or name in names}
        if diagonal is None:
            return {name: read(w) for name, read in readers.items()}
        dtypes, tangents = {n: p.dtype for n, p in trainable(self.model)}, {}
        for name, read in readers.items():
            u = read(w) if name not in diagonal else read(w).mul_(diagonal[name])
            tangents[name] = u.to(dtypes[name])
        return tangents


def gather_reader(bucket, sign, shape):
    """w [m, k] -> [m, *shape]: coordinate i reads w[bucket[i]] * sign[i]."""
    return lambda w: w.index_select(1, bucket).mul_(sign).view(w.shape[0], *shape)


class Doubler:
    """[w, w] of the last w [m, k] asked for, the windows of the rotated chunks: made once per transpose and shared
    by every parameter's reader (each used to make its own)."""

    def __init__(self):
        self.w = self.doubled = None

    def __call__(self, w):
        if self.w is not w:
            self.w, self.doubled = w, torch.cat([w, w], dim=1)
        return self.doubled


def rotated_reader(projector, name, shape, device, doubler):
    """w [m, k] -> [m, *shape] of a parameter in the rotated-chunk count sketch: chunk c of its flat coordinates
    reads w rotated by the chunk's offset o_c (coordinate c k + j reads w[(o_c + j) mod k]), a window of [w, w]
    (`doubler`'s; unfold: no index per coordinate; a last partial chunk copies only its own numbers), times the
    coordinate's sign. The signs are the projector's own (its cache, 1 byte per coordinate, within
    attribution.projector.cache_bytes; beyond it hashed per call): the transpose keeps nothing per coordinate, so
    its memory is the tangent it returns."""
    numel, k = math.prod(shape), projector.k
    full, rest = divmod(numel, k)
    offsets = projector.offsets(name, 0, full + (rest > 0), device).tolist()

    def read(w):
        doubled = doubler(w)
        signs = projector.signs(name, numel, 0, numel, device)
        if not full:  # one partial chunk: a window of [w, w], signed in one pass
            return torch.mul(doubled[:, offsets[0] : offsets[0] + rest], signs).view(w.shape[0], *shape)
        parts = [doubled.unfold(1, k, 1)[:, offsets[:full]].flatten(1)]
        parts += [doubled[:, offsets[full] : offsets[full] + rest]] if rest else []
        u = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return u.mul_(signs).view(w.shape[0], *shape)

    return read


def tensorsketch_reader(out_hash, in_hash, span):
    """w [m, k] -> [m, out, in] of a TensorSketched matrix in the slot w[:, span]: U[i, j] = w[span][(h1(i) + h2(j))
    mod size] s1(i) s2(j), from the per-axis hashes the projector keeps (out + in numbers); the [out, in] index is
    made per call and dropped."""
    (b1, s1), (b2, s2) = out_hash, in_hash
    size = span.stop - span.start

    def read(w):
        bucket = (b1.unsqueeze(1) + b2.unsqueeze(0)).remainder_(size).add_(span.start).flatten()
        shape = (w.shape[0], len(b1), len(b2))
        return w.index_select(1, bucket).view(shape).mul_(s1.unsqueeze(1) * s2.unsqueeze(0))

    return read


def sketch_readers(projector, model, device):
    """The `sketch` projector's readers: the rotated-chunk count sketch (HookSketch's hash; the input embedding and a
    tied output layer share it), TensorSketch's for the layers it sketches that way."""
    tensorsketch, readers, doubler = {}, {}, Doubler()
    for mod in projector.linears.values():
        n_out, n_in = mod.weight.shape
        uses_ts = projector.use_tensorsketch(projector.plan_tokens, n_in, n_out, mod.weight.element_size())
        if uses_ts and mod.weight is not projector.input_weight:
            tensorsketch[id(mod.weight)] = (n_out, n_in)
    covered = projector.covered_ids()
    for name, p in trainable(model):
        if id(p) not in covered:
            continue
        if id(p) in tensorsketch:
            hashes = (projector.axis_hash(name, axis, n, device) for axis, n in enumerate(p.shape))
            readers[name] = tensorsketch_reader(*hashes, slice(0, projector.k))
        else:
            readers[name] = rotated_reader(projector, name, p.shape, device, doubler)
    return readers


def factored_readers(projector, model, device):
    """The `factored` projector's readers, slot by slot in its concatenation order: a matrix's block is
    scale P_out G P_in^T, so it reads scale P_out^T W P_in (W its slot as r_out x r_in, P the identity where r
    >= d); a TensorSketched vocabulary matrix reads its slot at (h1(i) + h2(j)) mod size; a 1-D parameter's slot
    is itself or its count sketch."""
    params, readers = dict(trainable(model)), {}
    for name, span, ranks in slot_spans(projector):
        p, size = params[name], span.stop - span.start
        if ranks == "tensorsketch":
            readers[name] = tensorsketch_reader(*projector.vocab_hashes(name, p.shape, device), span)
        elif ranks is not None:
            sides = [projector.signs(name, axis, n, device) for axis, n in zip(("out", "in"), p.shape)]
            scale = 1 / math.prod(side.shape[0] for side in sides if side is not None) ** 0.5
            readers[name] = matrix_reader(span, ranks, sides, scale)
        elif p.numel() <= size:
            readers[name] = lambda w, span=span, shape=p.shape: w[:, span].reshape(w.shape[0], *shape).clone()
        else:
            index = torch.arange(p.numel(), dtype=torch.int64, device=device)
            bucket_key, sign_key = projector.slot_keys(name)
            readers[name] = gather_reader(
                hashed(index, bucket_key) % size + span.start, random_signs(index, sign_key), p.shape
            )
    return readers


def slot_spans(projector):
    """(parameter name, its slot's span of the vector, how: (r_out, r_in), None or "tensorsketch") of the `factored`
    projector, in its concatenation order."""
    start = 0
    for name, (size, ranks) in projector.slots.items():
        yield name, slice(start, start + size), ranks
        start += size


def matrix_reader(span, ranks, sides, scale):
    """w [m, k] -> [m, out, in]: scale P_out^T W P_in of the slot w[:, span] as [m, r_out, r_in]."""

    def read(w):
        u = w[:, span].reshape(w.shape[0], *ranks) * scale
        u = u if sides[0] is None else sides[0].T @ u
        return u if sides[1] is None else u @ sides[1]

    return read


def autograd_transpose(projector, model, w):
    """P^T w [m, k] of a per-example projector, row by row: the gradient of <w_i, project(g)> at g = 0 (without
    its normaliser, which `scaling` applies, and without its optimizer correction, likewise)."""
    plain = copy.copy(projector)
    plain.normalizer = NoNorm()
    zeros = {n: torch.zeros(p.shape, device=w.device, requires_grad=True) for n, p in trainable(model)}
    projected, rows = plain.project(zeros), []
    for row in w:
        grads = torch.autograd.grad(projected, list(zeros.values()), row, retain_graph=True, allow_unused=True)
        rows.append({n: g for n, g in zip(zeros, grads) if g is not None})
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]} if rows else {}


# ------------------------------------------------------------------------------ N and D
def scaling(projector, model, example, norms=None):
    """{parameter: the diagonal N D of one example} (float32, the parameter's shape or broadcastable): the
    optimizer correction D (projector.precondition) times, when the projector normalises per tensor, N = 1 / ||D g||
    of that parameter's gradient for this example (||D g|| from `tensor_norms`, or `norms`); {} where the kernel
    has neither (the identity). example: a batch of one."""
    pre = projector.precondition
    if pre is None and not projector.normalizer.needs_norms:
        return {}
    norms = tensor_norms(projector, model, example) if norms is None else norms
    scale = {}
    for n, p in trainable(model):
        d = pre.scale(n, p.shape, p.device) if pre is not None else torch.ones((), device=p.device)
        scale[n] = d / norms[n] if n in norms else d
    return scale


def tensor_norms(projector, model, example):
    """{parameter: ||D g|| (at least 1e-30)} of one example's gradient g (one backward pass) where the projector
    normalises per tensor, else {}."""
    if not projector.normalizer.needs_norms:
        return {}
    pre, params = projector.precondition, trainable(model)
    _, grads = example_gradient(model, example, params)
    norms = {}
    for n, g in grads.items():
        d = pre.scale(n, g.shape, g.device).double() if pre is not None else 1.0
        norms[n] = torch.linalg.vector_norm(g.double() * d).clamp_min(1e-30).float()
    return norms


# ------------------------------------------------------------------------------ per-token derivatives
def token_losses(model, params, example, embeds=None):
    """[T] each loss token's share of the example's loss (its cross-entropy / the number of loss tokens), at the
    position of the token it predicts (0 elsewhere): the loss lark.kernel.sketch_math.per_example_loss splits.
    params: {name: tensor} overriding the model's trainable parameters. The output layer runs only at the
    positions that predict a loss token (transformers' logits_to_keep): a Formatted example's prompt costs no
    vocabulary-wide logits, nor their derivatives. The input embedding is looked up here, its padding_idx rows
    (SmolLM2: <|im_end|>, in every ChatML prompt) from the detached weight: nn.Embedding never gives that row a
    gradient through the lookup (lark.kernel.sketch_math.without_padding), in forward mode as in reverse mode,
    while a tied output layer's use of the same row still has one. embeds: the looked-up input [1, T, d] given
    (the position split differentiates with respect to it)."""
    labels = example["labels"]
    targets = labels[0, 1:]
    keep = (targets != IGNORE).nonzero().flatten()  # the logit positions that predict a loss token
    embeds = input_embeds(model, params, example["input_ids"]) if embeds is None else embeds
    kwargs = {"attention_mask": example["attention_mask"], "logits_to_keep": keep, "inputs_embeds": embeds}
    logits = functional_call(model, params, (), kwargs).logits[0]
    kept = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none") / max(len(keep), 1)
    placed = torch.zeros(labels.shape[1], len(keep), device=kept.device)  # loss j -> position keep[j] + 1
    placed[keep + 1, torch.arange(len(keep), device=kept.device)] = 1
    return placed @ kept


def input_embeds(model, params, ids):
    """[1, T, d] the input embedding's output at `ids` (its own forward, with params' weight where it has one),
    padding_idx rows from the detached weight (token_losses)."""
    embedding = model.get_input_embeddings()
    weight = next((params[n] for n, p in trainable(model) if p is embedding.weight and n in params), embedding.weight)
    embeds = functional_call(embedding, {"weight": weight}, (ids,))  # its own forward (Gemma's scales the rows)
    if getattr(embedding, "padding_idx", None) is not None and bool((ids == embedding.padding_idx).any()):
        still = functional_call(embedding, {"weight": weight.detach()}, (ids,))
        embeds = torch.where((ids == embedding.padding_idx).unsqueeze(-1), still, embeds)
    return embeds


def token_derivatives(model, example, tangents):
    """[m, T] <u_i, g_t>: the derivative of each loss token's share along each tangent u_i (tangents: {name:
    [m, *shape]}, the model's trainable parameters; missing ones are 0), by forward-mode autodiff, the m tangents
    in one batched pass (vmap), with eager attention (PyTorch's fused attention kernels have no forward-mode
    derivative; both compute the same attention). The input embedding's padding row: token_losses."""
    params = {n: p.detach() for n, p in trainable(model)}
    m = next(iter(tangents.values())).shape[0]
    part = {n: tangents[n].to(p.dtype) if n in tangents else p.new_zeros(m, *p.shape) for n, p in params.items()}
    with eager_attention(model):
        along = lambda u: jvp(lambda q: token_losses(model, q, example), (params,), (u,))[1]  # noqa: E731
        return vmap(along)(part).detach().float()


@contextlib.contextmanager
def eager_attention(model):
    """The model with eager attention within the block: PyTorch's fused attention kernels have neither a
    forward-mode derivative nor, on every device, a batched backward (vmap); both compute the same attention."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def token_products(model, example, tangents, chunk=1):
    """[m, T] <u_i, g_t> as token_derivatives gives it, by reverse mode: one backward pass of each loss token's
    share gives g_t (only for the parameters with a tangent), dotted with all m tangents; up to `chunk` loss
    tokens' backward passes at once (autograd's is_grads_batched, with eager attention: their gradients held
    together, chunk x the tangents' parameters). T_loss backward passes instead of m forward-mode ones, however
    many batches the tangents come in: tangents is {name: [m, *shape]}, or a list of callables each making one
    batch of them (rows in that order), the first made once and kept, the others made again for each batch of
    loss tokens (one batch of tangents held beside it: a model whose tangent budget holds one tangent). The
    input embedding's padding row: token_losses."""
    makers = [lambda: tangents] if isinstance(tangents, dict) else list(tangents)
    first = makers[0]()
    params = {n: p.detach().requires_grad_(n in first) for n, p in trainable(model)}
    names = [n for n in first if params[n].requires_grad]
    positions = [t for t in range(1, example["labels"].shape[1]) if example["labels"][0, t] != IGNORE]
    rows, batched = [], chunk > 1 and len(positions) > 1
    with eager_attention(model) if batched else contextlib.nullcontext():
        losses = token_losses(model, params, example)
        for start in range(0, len(positions), chunk):
            done = positions[start : start + chunk]
            seeds = torch.zeros(len(done), losses.shape[0], device=losses.device)
            seeds[torch.arange(len(done)), done] = 1
            grads = torch.autograd.grad(
                losses,
                [params[n] for n in names],
                seeds if len(done) > 1 else seeds[0],
                retain_graph=start + chunk < len(positions),
                allow_unused=True,
                is_grads_batched=len(done) > 1,
            )
            flat = {n: g.reshape(len(done), -1).float() for n, g in zip(names, grads) if g is not None}
            for b, make in enumerate(makers):
                part = first if b == 0 else make()
                m = next(iter(part.values())).shape[0]
                if start == 0:
                    rows.append(torch.zeros(m, example["labels"].shape[1]))
                if flat:
                    rows[b][:, done] = sum(part[n].flatten(1).float() @ g.T for n, g in flat.items()).cpu()
    if not positions:  # no loss token: zero rows, one per tangent
        rows = [torch.zeros(next(iter(make().values())).shape[0], example["labels"].shape[1]) for make in makers]
    return torch.cat(rows)


TANGENT_NUMBERS = 2**26  # attribution.tokens_budget's default (conf/attribution/default.yaml)


def tangent_chunk(model, numbers=TANGENT_NUMBERS):
    """How many tangents one batched pass takes: as many as `numbers` tangent numbers hold (attribution.
    tokens_budget; 2^26: 256 MiB of float32), at least 1, at most 64."""
    return min(64, max(1, numbers // sum(p.numel() for _, p in trainable(model))))


# ------------------------------------------------------------------------------ text pieces
def pieces(tokenizer, ids, alone_cache=None):
    """(text, [(start, end)] per token): text = the decoded ids (special tokens kept: what the model saw) and
    token i's piece text[start:end]. When the tokens decoded one by one add up to the text (byte-level BPE without
    a split character, the usual case), each piece is its own decoding; otherwise piece i ends where the decoding
    of the first i + 1 tokens does, and a token that decodes to part of a character (byte-level BPE) gets an
    empty piece, the character going to the token that completes it. That decoding is incremental (`prefix_ends`:
    linear in the tokens), the decoding of every prefix only for a tokenizer whose decodings do not concatenate.
    alone_cache: {id: its decoding alone} kept across calls (a token pass's examples share most of their ids)."""
    options = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(ids, **options)
    known = {} if alone_cache is None else alone_cache
    new = sorted(set(ids) - known.keys())
    known.update(zip(new, tokenizer.batch_decode([[i] for i in new], **options)))
    alone = [known[i] for i in ids]
    if "".join(alone) == text and "\ufffd" not in text:
        ends = list(itertools.accumulate(len(piece) for piece in alone))
        return text, list(zip([0, *ends[:-1]], ends))
    ends = prefix_ends(tokenizer, ids, text, options)
    if ends is None:  # decodings that do not concatenate (e.g. a leading space dropped): every prefix decoded
        ends = [len(os.path.commonprefix([tokenizer.decode(ids[: i + 1], **options), text])) for i in range(len(ids))]
    ends = list(itertools.accumulate([*ends[:-1], len(text)], max)) if ids else []
    return text, list(zip([0, *ends[:-1]], ends))


def prefix_ends(tokenizer, ids, text, options):
    """[per token: how far the decoding of the first i + 1 tokens agrees with the text], decoding only from the
    last token where the text read so far was whole (a split character spans at most a few tokens), or None where
    such a window does not decode to the text (the decodings do not concatenate: the caller decodes prefixes)."""
    ends, anchor, at = [], 0, 0  # tokens [0, anchor) decode to text[:at]
    for i in range(len(ids)):
        window = tokenizer.decode(ids[anchor : i + 1], **options)
        agree = len(os.path.commonprefix([window, text[at : at + len(window)]]))
        if window[agree:].replace("\ufffd", ""):  # not a character still being read
            return None
        ends.append(at + agree)
        if agree == len(window):
            anchor, at = i + 1, at + agree
    return ends if not ids or ends[-1] == len(text) else None
