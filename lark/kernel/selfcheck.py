"""The `sketch` projector checks itself on the model before the first checkpoint is attributed.

The hooks of lark.kernel.sketch.HookSketch reach Linear layers, norms and the input embedding; an architecture can hide
gradient from them: a layer type they do not know (GPT-2's `Conv1D`), a module called twice in one forward (the
hooks see each call apart), an embedding whose output is scaled inside the module. On two real examples the
check compares, parameter by parameter, the hooks' sketch with the same count sketch (HookSketch.sketch_flat, the
sketch's own hash) of the per-example gradients that autograd computes, and the sketch's coverage with 1.0. Any
shortfall stops the run with a SelfCheckError naming the modules and the fallback projector (rapidin: the count
sketch of the materialised per-example gradient, one backward per example, architecture-independent).
"""

import torch

from lark.data.datamodule import collate
from lark.errors import ConfigError
from lark.kernel.normalizers import normalize_tensors
from lark.kernel.projectors import example_gradient, trainable
from lark.kernel.sketch import HookSketch

FALLBACK = (
    "attribution/projector=rapidin (before the projector config group: attribution.projector.kind=rapidin), "
    "which projects the materialised per-example gradient of any architecture"
)


class SelfCheckError(ConfigError):
    """The sketch does not reproduce this model's per-example gradients."""


def uses_sketch(projector_cfg):
    """Whether an attribution.projector config selects the hook sketch (a `kind` or a `_target_` config)."""
    return projector_cfg.get("kind") == "sketch" or str(projector_cfg.get("_target_", "")).endswith("HookSketch")


def module_of(model, param_name):
    name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return f"{name} ({type(model.get_submodule(name)).__name__})"


def call_counts(model, batch):
    """{module name: calls in one forward pass} of the modules with parameters of their own."""
    counts, handles = {}, []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(
                mod.register_forward_hook(lambda m, a, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
            )
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return counts


def check_sketch(model, encoded, pad_id, k=1024, seed=0, normalize="none", rtol=1e-3):
    """Raise SelfCheckError unless the hook sketch of `encoded` (two examples) equals, parameter by parameter, the
    count sketch of their autograd gradients and covers every trainable parameter. Returns the number of
    parameters compared."""
    sketch = HookSketch(model, k, seed, normalize, method="materialize")  # the fold method is tested elsewhere
    problems = []
    params = trainable(model)
    missing = sorted({module_of(model, n) for n, p in params if id(p) not in covered_ids(sketch)})
    if missing:
        problems.append(f"coverage {sketch.coverage():.4f} < 1: the hooks do not reach {', '.join(missing)}")
    batch = collate(encoded, pad_id)
    twice = sorted(f"{name} ({n} calls)" for name, n in call_counts(model, batch).items() if n > 1)
    if twice:
        problems.append(f"modules called more than once in one forward: {', '.join(twice)}")
    parts, add = {}, sketch.add

    def recording(total, name, kind, value, norm=None):  # each parameter's share of the hooks' sketch
        share = torch.zeros_like(total)
        add(share, name, kind, value, norm)
        parts[name] = parts.get(name, 0) + share
        total += share

    def finishing(total):  # per_tensor: a tied weight's parts, normalised by the norm of their sum at the end
        for name, entry in list(sketch.pending.items()):
            sketch.pending = {name: entry}
            share = torch.zeros_like(total)
            finish(share)
            parts[name] = parts.get(name, 0) + share
            total += share

    finish, sketch.add, sketch.finish = sketch.finish, recording, finishing
    was_training = model.training
    model.eval()
    wrong = set()
    try:
        try:
            sketch.project_batch(model, batch)
        except KeyError as e:  # a second call's output gradient finds its saved input already consumed
            problems.append(f"the hooks fail on this model (KeyError {e} in the backward pass)")
            encoded = []
        for b, example in enumerate(encoded):
            one = collate([example], pad_id)
            grads = normalize_tensors(example_gradient(model, one, params)[1], normalize)
            scale = sum(g.float().pow(2).sum() for g in grads.values()).sqrt().item()
            for name, g in grads.items():
                want = sketch.sketch_flat(name, g.reshape(1, -1).float())[0]
                got = parts[name][b] if name in parts else torch.zeros_like(want)
                if (got - want).norm() > rtol * max(want.norm().item(), 1e-3 * scale, 1e-12):
                    wrong.add(module_of(model, name))
    finally:
        model.train(was_training)
        sketch.add, sketch.finish = add, finish
    wrong -= set(missing)
    if wrong:
        problems.append(f"sketch differs from the autograd gradients' count sketch in {', '.join(sorted(wrong))}")
    if problems:
        raise SelfCheckError(
            "the sketch projector (attribution/projector=sketch) does not fully cover this model: "
            + "; ".join(problems)
            + f". Use {FALLBACK}."
        )
    return len(params)


def covered_ids(sketch):
    return {
        id(p)
        for group in (sketch.linears, sketch.norms, sketch.embeddings)
        for m in group.values()
        for p in m.parameters(recurse=False)
    }
