"""Building an `attribution` config's kernel and projector (make_kernel, make_projector), and reading configs
saved before the projector and kernel groups existed (upgrade: `projector.kind` and `projector.normalize`)."""

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

# Configs saved before attribution/projector and attribution/kernel existed: `attribution.projector.kind` (+ the
# keys below, the others had no effect on that kind) and `normalize` (none -> cosine, per_tensor -> rapidin).
LEGACY = {
    "sketch": ("lark.kernel.sketch.HookSketch", ("k", "seed", "method", "plan_tokens", "cache_bytes")),
    "rapidin": ("lark.kernel.projectors.CountSketch.of_model", ("k", "seed")),
    "gaussian": ("lark.kernel.projectors.GaussianProjector.of_model", ("k", "seed", "max_dense_elements")),
    "exact": ("lark.kernel.projectors.ExactProjector.of_model", ()),
}


LEGACY_KERNELS = {"none": "lark.kernel.kernels.Cosine", "per_tensor": "lark.kernel.kernels.RapidIn"}


def upgrade(attr):
    """An `attribution` config in today's form. One saved before the projector and kernel groups (a projector with
    `kind`, `normalize`) is mapped to the `_target_` configs it meant; so are such keys given as overrides
    (attribute.py): `kind` picks the projector, `normalize` the kernel (none -> cosine, per_tensor -> rapidin).
    A bare projector config (`{kind: ..., k: ...}`, as older callers pass) is read as {projector: it}."""
    if "projector" not in attr and {"kind", "_target_"} & set(attr):
        attr = OmegaConf.create({"projector": OmegaConf.to_container(attr, resolve=True)})
    projector = attr.get("projector")
    if projector is None or not {"kind", "normalize"} & set(projector):
        return attr
    old = OmegaConf.to_container(projector, resolve=True)
    new = OmegaConf.create(OmegaConf.to_container(attr, resolve=True))
    if "kind" in old:
        if old["kind"] not in LEGACY:
            raise ValueError(f"attribution.projector.kind: unknown '{old['kind']}' ({', '.join(LEGACY)})")
        target, keys = LEGACY[old["kind"]]
        new.projector = {"_target_": target, "_partial_": True, **{k: old[k] for k in keys if k in old}}
    else:
        new.projector = {k: v for k, v in old.items() if k != "normalize"}
    if "normalize" in old:
        normalize = old["normalize"]
        if normalize not in LEGACY_KERNELS:
            raise ValueError(f"attribution.projector.normalize: unknown '{normalize}' (none or per_tensor)")
        if "kernel" in new and new.kernel.get("_target_") not in LEGACY_KERNELS.values():
            raise ValueError(
                "attribution.projector.normalize is the kernel's choice now: use attribution/kernel="
                "rapidin (per-tensor) or the kernel's own normalize key"
            )
        new.kernel = {"_target_": LEGACY_KERNELS[normalize]}
    if "kernel" not in new:  # a config from before the kernels: the unnormalised cosine it computed
        new.kernel = {"_target_": LEGACY_KERNELS["none"]}
    return new


def built(build):
    """build() with Hydra's InstantiationException unwrapped: a bad value's own error (naming its key) is raised."""
    try:
        return build()
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


def make_kernel(attr):
    """The kernel (lark.kernel.kernels) of an `attribution` config."""
    return built(lambda: instantiate(upgrade(attr).kernel))


def make_projector(attr, model, kernel=None, moments=None):
    """The projector of an `attribution` config for the model's trainable parameters: the `attribution.projector`
    factory called as factory(model, normalize=<the kernel's normaliser, a lark.kernel.normalizers class>,
    precondition=<the kernel's optimizer correction, when it has one>). moments: the checkpoint's AdamW moments
    (lark.kernel.optimizer.Moments) for kernels that use them."""
    attr = upgrade(attr)
    if "k" in attr.projector and (attr.projector.k is None or int(attr.projector.k) <= 0):
        raise ValueError(f"attribution.projector.k must be a positive integer, got {attr.projector.k}")
    kernel = kernel or make_kernel(attr)
    options = {"normalize": kernel.normalizer}
    precondition = kernel.preconditioner(moments, model)
    if precondition is not None:
        options["precondition"] = precondition
    return built(lambda: instantiate(attr.projector, _partial_=True))(model, **options)
