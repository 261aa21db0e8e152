"""What is done to each parameter tensor's per-example gradient before the random projection.

A normaliser is a small class (Bergson's normalizer style) owned by the kernel (lark.kernel.kernels): the kernel
builds it from its config string, the projectors apply it. Two exist:

- NoNorm ("none"): the gradient as it is.
- PerTensor ("per_tensor", RapidIn's step): every parameter tensor's gradient divided by its own L2 norm, so each
  tensor weighs the same whatever its size (RapidIn's `calc_inner.grad_z` normalises every p.grad on its own).

A normaliser has
- `name`: what configs and specs write ("none" / "per_tensor"; stores compare specs, so it never changes);
- `__call__(grads)`: {name: gradient} -> {name: normalised gradient}, for projectors that materialise the gradient;
- `needs_norms`: whether the hook sketch (lark.kernel.sketch), which never forms the gradient, must compute each
  parameter's per-example gradient norm and divide that parameter's sketch by it.
Configs name a normaliser by its string (attribution.kernel.normalize, saved configs); `normalizer()` turns the
string into the class, once, where a config value enters (the kernel's and the projectors' constructors).
"""

import torch


class NoNorm:
    """The gradient as it is."""

    name = "none"
    needs_norms = False

    def __call__(self, grads):
        return grads

    def __repr__(self):
        return f"{type(self).__name__}()"


class PerTensor(NoNorm):
    """RapidIn's per-tensor L2 normalisation: g / ||g|| for every parameter tensor (a zero tensor stays zero)."""

    name = "per_tensor"
    needs_norms = True

    def __call__(self, grads):
        norms = {n: torch.linalg.vector_norm(g, dtype=torch.float64).clamp_min(1e-30) for n, g in grads.items()}
        return {n: g / norms[n].to(g.dtype) for n, g in grads.items()}  # float64 sums: 10^7-element tensors


NORMALIZERS = {cls.name: cls for cls in (NoNorm, PerTensor)}


def normalizer(how, key="attribution.projector.normalize", error=ValueError):
    """The normaliser named by a config string ("none" / "per_tensor"); a normaliser object is returned as it is.
    An unknown string raises `error` naming the config `key`."""
    if isinstance(how, NoNorm):
        return how
    if how not in NORMALIZERS:
        raise error(f"{key}: unknown '{how}' ({' or '.join(NORMALIZERS)})")
    return NORMALIZERS[how]()
