"""The `sketch` projector checks itself on the model before the first checkpoint is attributed.

The hooks of lark.kernel.sketch.HookSketch reach Linear layers, norms (of the classes in
lark.kernel.sketch_math.NORMS) and the input embedding; an architecture can hide gradient from them: a layer type
they do not know (GPT-2's `Conv1D`, a norm class not in NORMS), a module called twice in one forward (the
hooks see each call apart), an embedding whose output is scaled inside the module. On two real examples the
check compares, parameter by parameter, the hooks' sketch with the same count sketch (HookSketch.sketch_flat, the
sketch's own hash) of the per-example gradients that autograd computes, and the sketch's coverage with 1.0. Any
shortfall stops the run with a SelfCheckError naming the modules and the fallback projector (rapidin: the count
sketch of the materialised per-example gradient, one backward per example, architecture-independent).
"""

import torch
from hydra.utils import get_object

from lark.data.datamodule import collate
from lark.errors import ConfigError
from lark.fingerprints import MOVED, renamed
from lark.kernel.normalizers import normalizer
from lark.kernel.projectors import example_gradient, trainable
from lark.kernel.sketch import HookSketch

FALLBACK = (
    "attribution/projector=rapidin (before the projector config group: attribution.projector.kind=rapidin), "
    "which projects the materialised per-example gradient of any architecture"
)


class SelfCheckError(ConfigError):
    """The sketch does not reproduce this model's per-example gradients."""


def uses_sketch(projector_cfg):
    """Whether an attribution.projector config selects a projector that checks itself before a run: a `kind`
    config (from before the projector group) of kind sketch, or a `_target_` whose class says so (self_check =
    True: HookSketch). A `Cls.of_model` target is a bound method whose __self__ is the class; a target saved under
    its first name (lark.fingerprints.MOVED) is read under today's."""
    if projector_cfg.get("kind") == "sketch":
        return True
    target = projector_cfg.get("_target_")
    if not target:
        return False
    obj = get_object(renamed(str(target), MOVED))
    return bool(getattr(getattr(obj, "__self__", obj), "self_check", False))


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
    parameters compared. normalize: "none" / "per_tensor" or a lark.kernel.normalizers normaliser."""
    norm = normalizer(normalize)
    sketch = HookSketch(model, k, seed, norm, method="materialize")  # the fold method is tested elsewhere
    params = trainable(model)
    covered = sketch.covered_ids()
    missing = sorted({module_of(model, n) for n, p in params if id(p) not in covered})
    problems = []
    if missing:
        problems.append(f"coverage {sketch.coverage():.4f} < 1: the hooks do not reach {', '.join(missing)}")
    batch = collate(encoded, pad_id)
    twice = sorted(f"{name} ({n} calls)" for name, n in call_counts(model, batch).items() if n > 1)
    if twice:
        problems.append(f"modules called more than once in one forward: {', '.join(twice)}")
    was_training = model.training
    model.eval()
    wrong = set()
    try:
        try:
            parts = sketch.sketch_pass(model, batch, by_parameter=True).parts  # each parameter's share
        except KeyError as e:  # a second call's output gradient finds its saved input already consumed
            problems.append(f"the hooks fail on this model (KeyError {e} in the backward pass)")
        else:
            wrong = differing_modules(model, sketch, parts, [collate([e], pad_id) for e in encoded], norm, rtol)
    finally:
        model.train(was_training)
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


def differing_modules(model, sketch, parts, batches, norm, rtol):
    """Modules whose parameters' share of the hooks' sketch (parts {name: [B, k]}) differs from the count sketch
    (sketch.sketch_flat, the sketch's own hash) of the gradient autograd computes for each batch of one, by more
    than rtol of the larger of its norm and 1e-3 of the example's whole normalised gradient."""
    params, wrong = trainable(model), set()
    for b, one in enumerate(batches):
        grads = norm(example_gradient(model, one, params)[1])
        scale = sum(g.float().pow(2).sum() for g in grads.values()).sqrt().item()
        for name, g in grads.items():
            want = sketch.sketch_flat(name, g.reshape(1, -1).float())[0]
            got = parts[name][b] if name in parts else torch.zeros_like(want)
            if (got - want).norm() > rtol * max(want.norm().item(), 1e-3 * scale, 1e-12):
                wrong.add(module_of(model, name))
    return wrong
