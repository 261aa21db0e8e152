"""Attribution kernels: what is done to per-example gradients before, and to their projections after, the random
projection, so that influence = the cosine of what comes out. Chosen with `attribution/kernel=<name>`
(conf/attribution/kernel/*.yaml, each a `_target_` of a class here):

- `cosine` (Cosine): the plain cosine of the projected gradients.
- `rapidin` (RapidIn): each parameter tensor's gradient L2-normalised before the projection, as RapidIn's
  `calc_inner.grad_z` does (`normalize(p.grad.reshape(-1))` for every parameter, then concatenated): the paper's.
- `adam` (Adam): optimizer-aware (TrackStar's correction, LESS's idea): every coordinate divided by sqrt(v_hat) + eps,
  v_hat the run's own bias-corrected AdamW second moments at that checkpoint (AdamScale). Matrices use the
  factored (Adafactor) form v_hat ~ r c^T / mean(r) (r, c = row and column means of v_hat), which the hook sketch
  applies by scaling its GEMM inputs: diag(r^-1/2) G diag(c^-1/2) = (Delta r^-1/2)^T (X c^-1/2) * sqrt(mean r).
  `factored: false` divides by the full v_hat (per-example projectors only: rapidin, gaussian, exact).
- `trackstar` (TrackStar): the Adam correction, the projection, then R^-1/2 with R the mix of the query and the
  training sets' second moments in the k-dim space (directions every query shares are down-weighted), then unit
  normalisation -- TrackStar's order. R is estimated from the stored unit vectors (whiten()).
- `tracin_cp` (TracInCP): per checkpoint the plain cosine; over the run, TracIn-CP's learning-rate-weighted sum of
  gradient inner products (lark/tracin.py writes attribution/tracin_cp/).

A kernel of your own plugs in by its `_target_`; what the run asks of it is in class attributes, never its name:
`normalizer` (lark.kernel.normalizers, handed to the projector), `uses_optimizer` (needs the AdamW moments:
preconditioner() returns the projector's correction), `whitens` (transform() maps the vectors by a symmetric
matrix, which store_dtype=bit's sign vectors cannot carry; linear_map(vectors, query_set) returns it as a function,
which attribution.tokens=topk needs to split a score) and `run_level` (also scored over all checkpoints).

Epoch 0 (the base model) has no optimizer state: its moments are estimated from one pass over the fine-tuning set
in batches of the training batch size, in the set's order (not training's seeded shuffle; no step taken,
gradients clipped like training's): the mean of the squared batch
gradients, which is what AdamW's bias-corrected v_hat approaches at beta2 -> 1 with the weights held at epoch 0.
"""

import torch

from lark.errors import ConfigError
from lark.kernel.normalizers import NoNorm, PerTensor, normalizer
from lark.kernel.optimizer import MOMENTS_FILE, AdamScale
from lark.kernel.stores import unit_rows


# ------------------------------------------------------------------------------------------------ kernels
class Cosine:
    """Influence = cosine of the projected raw gradients."""

    name = "cosine"
    normalizer = NoNorm()  # done to each parameter's gradient before the projection (lark.kernel.normalizers)
    uses_optimizer = False  # needs the run's AdamW moments
    run_level = False  # also writes a run-level score over all checkpoints
    whitens = False  # transform() maps the stored vectors by a matrix (sign vectors of store_dtype=bit cannot be)

    def options(self):
        return {}

    def spec(self):
        return {"name": self.name, "normalize": self.normalizer.name, **self.options()}

    def preconditioner(self, moments, model):
        return None

    def transform(self, vectors, query_set):
        """{set: [n, k] unit vectors of one checkpoint} -> the vectors whose dot products are the scores."""
        return vectors


class RapidIn(Cosine):
    """RapidIn's kernel (the paper's): cosine of per-tensor L2-normalised gradients."""

    name = "rapidin"
    normalizer = PerTensor()


class Adam(Cosine):
    """Optimizer-aware cosine: coordinates divided by sqrt(v_hat) + eps of the run's AdamW at that checkpoint."""

    name = "adam"
    uses_optimizer = True

    def __init__(self, eps=1e-8, factored=True, normalize="none"):
        self.normalizer = normalizer(normalize, "attribution.kernel.normalize", ConfigError)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ConfigError(f"attribution.kernel.eps must be a number >= 0, got {eps!r}")
        self.eps, self.factored = float(eps), bool(factored)

    def options(self):
        return {"eps": self.eps, "factored": self.factored}

    def preconditioner(self, moments, model):
        if moments is None:
            raise ConfigError(
                f"attribution.kernel={self.name} needs the run's AdamW second moments at this "
                f"checkpoint (checkpoints/epoch_NNN/{MOMENTS_FILE}); none were given"
            )
        return AdamScale(moments, self.eps, model, self.factored)


class TrackStar(Adam):
    """TrackStar: optimizer correction -> projection -> R^-1/2 (R = mix * R_queries + (1 - mix) * R_train) ->
    unit normalisation."""

    name = "trackstar"
    whitens = True

    def __init__(self, eps=1e-8, factored=True, mix=0.99, damping=0.1):
        super().__init__(eps, factored)
        if not (isinstance(mix, (int, float)) and 0 <= mix <= 1):
            raise ConfigError(f"attribution.kernel.mix must be in [0, 1], got {mix!r}")
        if not (isinstance(damping, (int, float)) and damping > 0):
            raise ConfigError(f"attribution.kernel.damping must be > 0, got {damping!r}")
        self.mix, self.damping = float(mix), float(damping)

    def options(self):
        return {**super().options(), "mix": self.mix, "damping": self.damping}

    def transform(self, vectors, query_set):
        linear = self.linear_map(vectors, query_set)
        return {name: unit_rows(linear(x)).float() for name, x in vectors.items()}

    def linear_map(self, vectors, query_set):
        """M (symmetric), x [n, k] -> [n, k] float64: whitening() of these vectors."""
        return whitening(vectors, query_set, self.mix, self.damping)


class TracInCP(Cosine):
    """TracIn-CP: per checkpoint the plain cosine; over the run sum_c lr_c <g_c(q), g_c(d)> (lark/tracin.py)."""

    name = "tracin_cp"
    run_level = True


def whitening(vectors, query_set, mix, damping):
    """The linear map M: x [n, k] -> [n, k] float64 of TrackStar's whitening, (R + delta I)^-1/2 scaled by
    sqrt(delta) (which cosine ignores). R = mix * mean(q q^T) over the query rows + (1 - mix) * mean(d d^T) over
    every other set's rows (R = A^T A with A the n x k stack of weighted rows: its eigenpairs from the smaller of
    A^T A [k, k] and the Gram matrix A A^T [n, n], whose non-zero eigenpairs are R's); delta = damping * the mean
    non-zero eigenvalue of R. A direction of R with eigenvalue s is weighted sqrt(delta / (s + delta)) relative to
    directions no example spans. M is symmetric (M^T = M)."""

    def finite(x):
        return x[torch.isfinite(x).all(dim=1)].double()

    queries = finite(vectors[query_set])
    train = torch.cat([finite(v) for name, v in vectors.items() if name != query_set])
    parts = [p for p, w in ((queries, mix), (train, 1 - mix)) if len(p) and w > 0]
    weights = [w for p, w in ((queries, mix), (train, 1 - mix)) if len(p) and w > 0]
    a = torch.cat([p * (w / len(p)) ** 0.5 for p, w in zip(parts, weights)])
    gram = len(a) <= a.shape[1]  # fewer examples than numbers: the n x n Gram matrix is the smaller
    s, u = torch.linalg.eigh(a @ a.T if gram else a.T @ a)
    keep = s > s.max().clamp_min(1e-300) * 1e-10
    s, u = s[keep], u[:, keep]
    basis = a.T @ u / s.sqrt() if gram else u  # [k, r]: R's eigenvectors of non-zero eigenvalues
    delta = damping * s.mean()
    weight = (delta / (s + delta)).sqrt() - 1
    return lambda x: x.double() + ((x.double() @ basis) * weight) @ basis.T


def whiten(vectors, query_set, mix, damping):
    """Each set's rows mapped by whitening() and unit-normalised (TrackStar's transform)."""
    return TrackStar(mix=mix, damping=damping).transform(vectors, query_set)
