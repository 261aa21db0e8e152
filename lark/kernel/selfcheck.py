"""The `sketch` projector checks itself on the model before the first checkpoint is attributed.

The hooks of lark.kernel.sketch.HookSketch reach Linear layers, norms (of the classes in
lark.kernel.sketch_math.NORMS) and the input embedding; an architecture can hide gradient from them: a layer type
they do not know (GPT-2's `Conv1D`, a norm class not in NORMS), a module called twice in one forward (the
hooks see each call apart), an embedding whose output is scaled inside the module. On two real examples the
check compares, parameter by parameter, the hooks' sketch with the same count sketch (HookSketch.sketch_flat, the
sketch's own hash) of the per-example gradients that autograd computes, and the sketch's coverage with 1.0. Any
shortfall stops the run with a SelfCheckError naming the modules and the fallback projector (rapidin: the count
sketch of the materialised per-example gradient, one backward per example, architecture-independent).

What is checked where (seconds at 7B, on the device the trainer uses: lark.experiment.self_check):
- coverage (the hooks reach every trainable parameter) and call counts: every module;
- the sketch against autograd: one layer of each kind (`compared`): every parameter outside the repeated blocks
  (embedding, final norm, output layer) and those of the first block of each kind (OLMo-3: block 0, so each
  Linear role and norm of a block). Later blocks of the same kind run the same hook code on the same shapes.
- in the model's own dtype (the real path: the hooks' per-example GEMM runs in it), within its rounding
  (`tolerance`): a bf16 model is compared within 2 eps(bf16), a float32 one within rtol = 1e-3.
"""

import torch
from hydra.utils import get_object

from lark.data.datamodule import collate
from lark.data.formats import IGNORE
from lark.errors import ConfigError
from lark.fingerprints import MOVED, renamed
from lark.kernel.normalizers import normalizer
from lark.kernel.projectors import example_gradient, trainable
from lark.kernel.sketch import HookSketch
from lark.models import eval_mode

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


def tolerance(dtype, rtol=1e-3):
    """The relative difference allowed between a parameter's hook sketch and autograd's in a model of `dtype`:
    max(rtol, 2 * torch.finfo(dtype).eps) -- 1e-3 in float32 (summation order alone), 0.0156 in bfloat16, 0.0020
    in float16.

    Derivation: both sides are computed from the same forward pass (the same activations to the last bit:
    `differing_modules`) and the same output gradients, and accumulate in float32; each rounds a gradient
    coordinate to the model dtype at most twice -- the hooks when their per-example GEMM writes G and (per_tensor)
    when they divide by its norm; autograd when it writes the parameter's gradient and when the normaliser divides
    it -- each rounding within eps/2 of the value, so |got_i - want_i| <= 4 * eps/2 * |g_i| and the difference's
    norm is at most 2 eps of the gradient's; a count sketch keeps norms (exactly within a k-long chunk). Measured
    on random-init bf16 OLMo-3s (2-4 blocks, 64-256 wide): at most 0.0046 (0.6 eps), depth-independent. What the
    check exists to catch is no rounding: a layer the hooks miss differs by 100%, GPT-2's Conv1D or a scaled
    embedding by more."""
    return max(rtol, 2 * torch.finfo(dtype).eps)


def compared(model):
    """Names of the trainable parameters whose sketch is compared with autograd's: all but those of repeated
    blocks of a kind already compared -- in each nn.ModuleList a child counts as a new kind when no earlier child
    has its class and parameters (names, shapes) -- so the embedding, the norms and output layer outside the
    blocks, and the first block of each kind (OLMo-3: block 0)."""
    repeated = set()
    for list_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList):
            continue
        kinds = set()
        for i, child in enumerate(mod):
            own = tuple((n, tuple(p.shape)) for n, p in child.named_parameters())
            if (type(child), own) in kinds:
                repeated.update(f"{list_name}.{i}.{n}".lstrip(".") for n, _ in own)
            kinds.add((type(child), own))
    return [n for n, _ in trainable(model) if n not in repeated]


def check_sketch(model, encoded, pad_id, k=1024, seed=0, normalize="none", rtol=1e-3):
    """Raise SelfCheckError unless the hook sketch of `encoded` (two examples) equals, parameter by parameter
    (those of `compared`), the count sketch of their autograd gradients within `tolerance` of the model's dtype,
    and covers every trainable parameter. Runs where the model is (the batch follows it). Returns the number of
    parameter tensors covered. normalize: "none" / "per_tensor" or a lark.kernel.normalizers normaliser."""
    norm = normalizer(normalize)
    sketch = HookSketch(model, k, seed, norm, method="materialize")  # the fold method is tested elsewhere
    params = trainable(model)
    covered = sketch.covered_ids()
    missing = sorted({module_of(model, n) for n, p in params if id(p) not in covered})
    problems = []
    if missing:
        problems.append(f"coverage {sketch.coverage():.4f} < 1: the hooks do not reach {', '.join(missing)}")
    device, dtype = params[0][1].device, max((p.dtype for _, p in params), key=lambda d: torch.finfo(d).eps)
    batch = {key: v.to(device) for key, v in collate(encoded, pad_id).items()}
    rtol = tolerance(dtype, rtol)
    twice = sorted(f"{name} ({n} calls)" for name, n in call_counts(model, batch).items() if n > 1)
    if twice:
        problems.append(f"modules called more than once in one forward: {', '.join(twice)}")
    wrong = set()
    with eval_mode(model):
        try:
            parts = sketch.sketch_pass(model, batch, by_parameter=True).parts  # each parameter's share
        except KeyError as e:  # a second call's output gradient finds its saved input already consumed
            problems.append(f"the hooks fail on this model (KeyError {e} in the backward pass)")
        else:
            wrong = differing_modules(model, sketch, parts, batch, compared(model), norm, rtol)
    wrong -= set(missing)
    if wrong:
        problems.append(
            f"sketch differs from the autograd gradients' count sketch in {', '.join(sorted(wrong))} (by more "
            f"than {rtol:.2g} of its norm, the rounding of {dtype})"
        )
    if problems:
        raise SelfCheckError(
            "the sketch projector (attribution/projector=sketch) does not fully cover this model: "
            + "; ".join(problems)
            + f". Use {FALLBACK}."
        )
    return len(params)


def differing_modules(model, sketch, parts, batch, names, norm, rtol):
    """Modules whose parameters (of `names`) have a share of the hooks' sketch (parts {name: [B, k]}) that differs
    from the count sketch (sketch.sketch_flat, the sketch's own hash) of autograd's gradient of each example's
    loss by more than rtol of the larger of its norm and 1e-3 of the example's whole normalised gradient (over
    `names`). Autograd's gradient of example b is that of the model's own loss with every other row's labels
    ignored, in a forward pass of the hooks' padded `batch`: the same activations as theirs to the last bit."""
    names, wrong = set(names), set()
    params = [(n, p) for n, p in trainable(model) if n in names]
    for b in range(batch["labels"].shape[0]):
        labels = batch["labels"].clone()
        labels[torch.arange(labels.shape[0], device=labels.device) != b] = IGNORE
        grads = norm(example_gradient(model, {**batch, "labels": labels}, params)[1])
        scale = sum(g.float().pow(2).sum() for g in grads.values()).sqrt().item()
        for name, g in grads.items():
            want = sketch.sketch_flat(name, g.reshape(1, -1).float())[0]
            got = parts[name][b] if name in parts else torch.zeros_like(want)
            if (got - want).norm() > rtol * max(want.norm().item(), 1e-3 * scale, 1e-12):
                wrong.add(module_of(model, name))
    return wrong
