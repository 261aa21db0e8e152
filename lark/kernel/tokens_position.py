"""The position split of a pair's score (attribution.tokens_split: position): which positions' use of the weights
carried the gradient, one forward and one backward pass per example whatever its partners and loss tokens.

The weights of a decoder LM are applied position by position (the embedding row of token s, a learned position
embedding's row s, each Linear and norm on position s's hidden state, the output layer on position s's logits),
so an example's gradient splits over its positions, g = sum_s G_s, with G_s the gradient through position s's use
of each weight: for a Linear layer G_s = delta_s x_s^T (delta_s the loss's gradient at the layer's output at s,
x_s its input there). For a tangent u in parameter space (lark.kernel.tokens_math: u = N D P^T w)

    c_s = <u, G_s> = sum over modules of <delta_s, (d out_s / d theta)[u]>,

the module's own directional derivative along u at its recorded input, dotted with the backward's delta_s (a
Linear: delta_s^T U x_s, `linear_part`; a norm weight * xhat: (delta_s * xhat_s) . u, `norm_part`; any other
module: torch.func.jvp under vmap): no weight gradient is formed (the weights are detached; the backward runs from
the input embeddings, Bergson's frozen-weight pass) and the m partners' tangents cost m module-local products, not
m passes.
The parts add up to <u, g>, the pair's score as the loss split's do; unlike that split every position gets a
part, a Formatted document's prompt and a query's question too (their hidden states carry the answer's gradient
through attention), and a position's part is not its own token's loss: it answers "which positions' activations
did the gradient flow through", where the loss split answers "which loss tokens' gradients". A module whose output
is not one row per position, or that returns several tensors (a mixture-of-experts router), is refused with a
pointer to the loss split (`place`, `Recorder`); one that mixes positions inside an output of that shape (a causal
convolution over the sequence) is not detected: its part at s is then its output row s's, not position s's own
use of its weights. (The decoders LARK runs, OLMo, Llama, Qwen, Mistral, GPT-2, have none.)
With the `factored` projector the store pass itself holds these parts' factors, or a projection of a batch made to
keep them (lark.kernel.tokens_kept): this pass runs only for the examples neither holds.
"""

import torch
from torch.func import functional_call, jvp, vmap

from lark.data.formats import IGNORE
from lark.kernel.factored_math import project_side
from lark.kernel.projectors import trainable
from lark.kernel.sketch_math import NORMS
from lark.kernel.tokens_math import input_embeds, slot_spans, token_losses


class Recorder:
    """Forward hooks on every module with trainable weights of its own but `skip` (the input embedding, looked up
    by token_losses): each call's inputs, and its output's gradient once the backward has run. An output off the
    path from the input embeddings (a learned position embedding: GPT-2's wpe) is made a leaf the backward also
    differentiates (`leaves`)."""

    def __init__(self, model, skip):
        self.calls, self.grads, self.leaves = [], {}, {}
        own = [m for m in model.modules() if m is not skip and any(p.requires_grad for p in m.parameters(False))]
        self.handles = [m.register_forward_hook(self.record, with_kwargs=True) for m in own]

    def record(self, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"attribution.tokens_split=position: {type(module).__name__} returns {type(output).__name__}, not one"
                " tensor of its positions; attribution.tokens_split=loss splits this model's scores"
            )
        at = len(self.calls)
        self.calls.append((module, detached(args), detached(kwargs), output.shape))
        if output.requires_grad:
            output.register_hook(lambda g: self.grads.__setitem__(at, g.detach()))
            return None
        self.leaves[at] = output.detach().requires_grad_()
        return self.leaves[at]

    def backward(self, loss, embeds):
        """d loss / d embeds; the leaves' gradients into self.grads (the others' by their hooks)."""
        found = torch.autograd.grad(loss, [embeds, *self.leaves.values()], allow_unused=True)
        self.grads.update({at: g for at, g in zip(self.leaves, found[1:]) if g is not None})
        return found[0]

    def close(self):
        for handle in self.handles:
            handle.remove()


def detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    return {k: detached(v) for k, v in value.items()} if isinstance(value, dict) else value


def position_products(model, example, tangents):
    """[m, T] c_s = <u_i, G_s> for each position s of `example` (a batch of one) and tangent u_i; tangents is a
    list of callables each making one batch {name: [m_b, *shape]} of them (rows in that order; a parameter
    without a tangent is 0). One forward and one backward pass, then per batch each module's directional
    derivative along its tangents, vmapped. Sums over s to <u_i, g> (g the example's gradient)."""
    params = {n: p.detach() for n, p in trainable(model)}
    names = {id(p): n for n, p in trainable(model)}
    ids = example["input_ids"]
    keep = (example["labels"][0, 1:] != IGNORE).nonzero().flatten()  # the output layer's rows (token_losses)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embeds = input_embeds(model, params, ids).detach().requires_grad_()
    recorder = Recorder(model, skip=embedding)
    try:
        delta = recorder.backward(token_losses(model, params, example, embeds).sum(), embeds)
    finally:
        recorder.close()
    rows = []
    for make in tangents:
        u = make()
        m = count(next(iter(u.values())))
        c = torch.zeros(m, ids.shape[1], device=ids.device)
        name = names.get(id(embedding.weight))
        if name in u and delta is not None:  # the input embedding, dotted with delta at s (no padding row's part)
            used = ids[0] != getattr(embedding, "padding_idx", None)
            if type(embedding) is torch.nn.Embedding:  # row ids_s of u
                c += (u[name][:, ids[0]].float() * delta[0].float()).sum(-1) * used
            else:  # its own derivative along u (a scaled embedding: Gemma's)
                c += derivative_part(embedding, (ids,), {}, {"weight": params[name]}, {"weight": u[name]}, delta) * used
        for at, (module, args, kwargs, shape) in enumerate(recorder.calls):
            own = {k: names.get(id(p)) for k, p in module.named_parameters(recurse=False)}
            local = {k: u[n] for k, n in own.items() if n in u}
            if not local or at not in recorder.grads:
                continue
            grad = recorder.grads[at]
            if type(module) is torch.nn.Linear and not kwargs:  # delta_s^T u x_s without forming u x_s's primal
                part = linear_part(args[0], grad, local)
            elif isinstance(module, NORMS):  # weight * xhat (+ bias): no derivative pass either
                part = norm_part(module, args, kwargs, grad, local)
            else:
                local = {k: t.full() if isinstance(t, LowRank) else t for k, t in local.items()}
                part = derivative_part(module, args, kwargs, {k: params[own[k]] for k in local}, local, grad)
            place(c, part, module, head, keep, shape)
        rows.append(c.cpu())
    return torch.cat(rows)


def linear_part(x, grad, local):
    """[m, T'] delta_s^T U x_s (+ delta_s . u_b) of a Linear layer, summed over any axes between the position and
    the features: its input x and output gradient delta [1, T', ..., d], local {"weight": [m, out, in], "bias":
    [m, out]} (either may be absent)."""
    x, grad = rows(x), rows(grad)  # [T', R, d]
    m = count(next(iter(local.values())))
    part = torch.zeros(m, x.shape[0], device=x.device)
    if isinstance(local.get("weight"), LowRank):  # through the factors: r (in + out) per position
        part += local["weight"].part(x.flatten(0, 1), grad.flatten(0, 1)).view(m, *x.shape[:2]).sum(-1)
    elif "weight" in local:  # [m, T' R, in] . x, one GEMM per tangent
        products = torch.matmul(grad.flatten(0, 1), local["weight"].float()) * x.flatten(0, 1)
        part += products.sum(-1).view(m, *x.shape[:2]).sum(-1)
    if "bias" in local:
        part += local["bias"].float() @ grad.sum(1).T
    return part


class LowRank:
    """The tangents of one matrix of the `factored` projector kept in its factors, U_i = diag(row) P_out^T W_i P_in
    diag(col) (w [m, r_out, r_in]: the slot's rows with its 1 / sqrt(r_out r_in) and the per-tensor N folded in;
    sides (p_out, p_in) lark.kernel.factored Sides, None for an identity side; factors (row, col) the Adam
    correction's, or None): a position's part delta_s^T U_i x_s = (P_out (row * delta_s))^T W_i (P_in (col * x_s))
    costs r (in + out) per position and r_out r_in per tangent, where the formed U_i (`full`, made by `form`: the
    transpose's reader) costs in x out for both."""

    def __init__(self, w, sides, factors, form):
        self.w, self.sides, self.factors, self.form = w, sides, factors, form

    def part(self, x, grad):
        """[m, N] delta_n^T U_i x_n of inputs x [N, in] and output gradients grad [N, out] (float32)."""
        (p_out, p_in), (row, col) = self.sides, self.factors
        a = project_side(grad if row is None else grad * row, p_out)  # [N, r_out]
        c = project_side(x if col is None else x * col, p_in)  # [N, r_in]
        return ((a @ self.w) * c).sum(-1)  # [m, N, r_in] . c

    def full(self):
        """[m, out, in] U_i formed, in the parameter's dtype (a module that is not a plain Linear: its generic
        derivative)."""
        return self.form()


def count(tangent):
    """m, the number of tangents of a parameter's [m, *shape] or LowRank."""
    return (tangent.w if isinstance(tangent, LowRank) else tangent).shape[0]


def low_rank_tangents(projector, transpose, w, diagonal, norms):
    """{name: tangents} N D P^T w of the `factored` projector (lark.kernel.tokens_math.Transpose's, `diagonal`
    scaling's N D of the example, `norms` its tensor_norms ||D g||) with every plain Linear layer's weight (not the
    input embedding's) as a LowRank, the other parameters' from `transpose`."""
    plain = {id(mod.weight) for mod in projector.linears.values() if type(mod) is torch.nn.Linear}
    plain.discard(id(projector.input_weight))
    params, low = dict(trainable(transpose.model)), {}
    for name, span, ranks in slot_spans(projector):
        p = params[name]
        if not isinstance(ranks, tuple) or id(p) not in plain:
            continue
        like = torch.empty((), device=w.device)  # float32 Sides (the parts are float32)
        p_out, p_in, scale = projector.matrices(name, *p.shape, like)
        block = w[:, span].reshape(w.shape[0], *ranks).float() * (scale / norms[name] if name in norms else scale)
        pre = projector.precondition
        factors = pre.factors(name, w.device) if pre is not None else (None, None)
        low[name] = LowRank(block, (p_out, p_in), factors, lambda n=name: transpose(w, diagonal, names=(n,))[n])
    return {**transpose(w, diagonal, names=[n for n in transpose.readers if n not in low]), **low}


def rows(t):
    """[1, T', ..., d] -> [T', R, d] float32: each position's rows (R = 1 but for per-head tensors)."""
    return t.reshape(t.shape[1], -1, t.shape[-1]).float()


def norm_part(module, args, kwargs, grad, local):
    """[m, T'] sum_j delta_sj (u_w xhat_s + u_b)_j of a norm layer out = weight * xhat (+ bias) (the classes of
    lark.kernel.sketch_math.NORMS, whose gradients the projectors take in that form too), xhat its output at weight
    1 and bias 0 on the recorded input, summed over any axes between the position and the features (Qwen3 norms
    each head: [1, T', H, n]). local {"weight": [m, n], "bias": [m, n]} (either may be absent)."""
    unit = {"weight": torch.ones_like(module.weight)}
    if getattr(module, "bias", None) is not None:
        unit["bias"] = torch.zeros_like(module.bias)
    grad = rows(grad)  # [T', R, n]
    part = torch.zeros(next(iter(local.values())).shape[0], grad.shape[0], device=grad.device)
    if "weight" in local:
        xhat = rows(functional_call(module, unit, args, kwargs))
        part += local["weight"].float() @ (grad * xhat).sum(1).T
    if "bias" in local:
        part += local["bias"].float() @ grad.sum(1).T
    return part


def derivative_part(module, args, kwargs, primal, local, grad):
    """[m, T'] the module's own derivative along each tangent (local {its parameter: [m, *shape]}) at `primal`, its
    inputs held fixed, dotted with its output's gradient grad [1, T', ...] position by position."""
    product = vmap(directional(module, args, kwargs, primal))(local).float() * grad.float()  # [m, 1, T', ...]
    return product.reshape(len(product), grad.shape[1], -1).sum(-1)


def directional(module, args, kwargs, primal):
    """t -> the derivative of module(*args, **kwargs) along t ({its parameter: tangent}) at `primal`, its inputs
    held fixed."""
    return lambda t: jvp(lambda q: functional_call(module, q, args, kwargs), (primal,), (t,))[1]


def place(c, part, module, head, keep, shape):
    """Adds a module's [m, T'] parts to c [m, T]: position by position, or, for the output layer run only where a
    loss token is predicted (token_losses' logits_to_keep), at those positions."""
    if part.shape[1] == c.shape[1]:
        c += part
    elif module is head and part.shape[1] == len(keep):
        c[:, keep] += part
    else:
        raise ValueError(
            f"attribution.tokens_split=position: {type(module).__name__}'s output {tuple(shape)} is not one row per"
            f" position ({c.shape[1]}): its weights are not applied position by position; attribution.tokens_split="
            "loss splits this model's scores"
        )
