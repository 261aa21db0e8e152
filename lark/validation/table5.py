"""Table V, attribution quality: does a kernel find the data that made the model behave so? (`python validate.py`)

For every kernel of `validate.kernels` (names of the attribution/kernel group) with every projector of
`validate.projectors` (names of the attribution/projector group; null: the run's own), every checkpoint, plus BM25
and random scores, three checks:
- Provenance recall (the embedded world): for each test question, the abstracts and fine-tuning items that
  `data/world/provenance.json` says carry its fact, ranked among a candidate pool built WITHOUT any attribution
  method or BM25 (`validate.pool`: all of the world's abstracts, or the provenance abstracts plus a seeded random
  sample), and among all fine-tuning items: recall@k and MRR (lark.validation.recall).
- Planted canary (data.canary, lark.validation.canary): precision@n and AUPRC of the canary items among all fine-tuning
  items for each triggered query; the backdoor rate at every checkpoint.
- Mini-LDS (lark.validation.lds): Spearman of sum_{d in S} score(q, d) with -loss(q) over models retrained on subsets S.
Every query and every training item is projected here, at every checkpoint (the run's own stores hold only
`source.size` fine-tuning items); the score matrices are cached under <run>/validation/scores, keyed by content.

Outputs: tables/table5.{md,csv}, figures/fig5_validation.png, validation/validation.json (everything, with the
time each column cost); with `validate.projector_seed` (a second draw of every projector) the same three files in
validation/seed_<n>/ instead, the run's own Table V untouched.

The verbs, each in its module: load the run (load.py), score each kernel and baseline (scores.py), measure the
checks (quality.py), write Table V (write.py); validate_run below chains them.
"""

import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from lark import console
from lark.data.io import write_json
from lark.errors import ConfigError, whole
from lark.kernel.factory import upgrade
from lark.models import load_pretrained, weights_dtype
from lark.rundir import epoch_lr, require_safetensors
from lark.validation import lds
from lark.validation.load import lds_enabled, load_run
from lark.validation.quality import backdoor, quality
from lark.validation.scores import (
    BASELINES,
    kernel_config,
    kernel_file,
    kernel_scores,
    own_projector,
    projector_file,
    tracin_term,
    with_projector,
)
from lark.validation.write import plot_validation, write_table5


def validate_run(run_dir, vcfg, log=print):
    """Table V of a run directory; returns the result dict also written to validation/validation.json."""
    run_dir = Path(run_dir)
    console.setup()  # as train.py: no per-file progress bars of transformers in a log
    check_request(vcfg)
    run = load_run(run_dir, vcfg, log)
    projectors = vcfg.get("projectors") or None  # null (the default; older configs): the run's own, rows as before
    seed = vcfg.get("projector_seed")  # null (the default; older configs): each projector's own seed
    check_projectors(run, projectors, seed)
    timing, subsets = {}, None
    if lds_enabled(vcfg, run.cfg):
        start = time.perf_counter()
        subsets = lds.retrain_losses(run_dir, run.cfg, vcfg.lds, run.queries, [x["id"] for x in run.train], log)
        timing["lds_retrains"] = time.perf_counter() - start
    rows, backdoor_by_epoch, tracin, projector_k = [], {}, {}, {}
    for name in vcfg.kernels or []:
        for projector in projectors or [None]:
            label = name if projector is None else f"{name} ({projector})"
            start = time.perf_counter()
            kernel_rows, tracin_sum, used, k = validate_kernel(run, name, subsets, backdoor_by_epoch, projector, seed)
            if tracin_sum is not None:
                tracin[label] = {"checkpoints": used}
                tag = {"method": f"{name} TracIn-CP"} | ({} if projector is None else {"projector": projector})
                summed = "all" if vcfg.checkpoints == "all" else "+".join(str(e) for e in sorted(run.epochs) if e > 0)
                kernel_rows.append({**tag, "epoch": summed, **quality(tracin_sum, None, run, subsets)})
            timing[label] = time.perf_counter() - start
            rows += [row | {"seconds": timing[label]} for row in kernel_rows]
            if projector is not None:
                projector_k[projector] = k
    for name, baseline in BASELINES.items():
        start = time.perf_counter()
        row = quality(*baseline(run), run, subsets)
        timing[name] = time.perf_counter() - start
        tag = {"method": name} | ({} if projectors is None else {"projector": None})
        rows.append({**tag, "epoch": "-", **row, "seconds": timing[name]})
    result = {
        "rows": rows,
        "timing_s": timing,
        "backdoor": backdoor_by_epoch,
        "tracin_cp": tracin,
        "only_pretraining_share": run.only_pretraining,
        "n_queries": len(run.test),
        "n_train": len(run.train),
        "n_pool": len(run.pool),
        "pool": OmegaConf.to_container(vcfg.pool),
        "kernels": OmegaConf.to_container(vcfg.kernels or []),
        **({} if projectors is None else {"projectors": projector_k}),  # {name: the vectors' k}
        **({} if seed is None else {"projector_seed": seed}),
        "lds": None
        if subsets is None
        else {
            "n_subsets": len(subsets["losses"]),
            "fraction": float(vcfg.lds.fraction),
            "level": float(vcfg.lds.get("level", lds.LEVEL)),
        },
    }
    return write_result(result, run_dir, None if seed is None else run_dir / "validation" / f"seed_{seed}")


def check_request(vcfg):
    """validate.* values that would only break later (after the retrains, or as a raw TypeError): ConfigError
    naming the key."""
    for name in vcfg.kernels or []:
        if name == "tracin_cp":
            raise ConfigError(
                "validate.kernels: tracin_cp is the run-level sum every kernel's 'TracIn-CP' row already is (its "
                "per-checkpoint row would be cosine's); name per-checkpoint kernels"
            )
        kernel_file(name)  # an unknown name: ConfigError naming validate.kernels and the known ones
    checkpoints = vcfg.checkpoints
    if not (checkpoints == "all" or (isinstance(checkpoints, Sequence) and all(whole(e, 0) for e in checkpoints))):
        raise ConfigError(f"validate.checkpoints must be 'all' or a list of epochs >= 0, got {checkpoints!r}")
    if not (isinstance(vcfg.recall_ks, Sequence) and all(whole(k) for k in vcfg.recall_ks)):
        raise ConfigError(f"validate.recall_ks must be a list of integers >= 1, got {vcfg.recall_ks!r}")
    if not whole(vcfg.lds.n_boot):
        raise ConfigError(f"validate.lds.n_boot must be an integer >= 1, got {vcfg.lds.n_boot!r}")
    lds.check(vcfg.lds)


def check_projectors(run, projectors, seed):
    """validate.projectors' names and validate.projector_seed, before the retrains: ConfigError naming the key for
    an unknown name, a seed that is not an integer, or one a projector already draws with (the same draw again)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"validate.projector_seed must be an integer or null, got {seed!r}")
    for name in projectors or []:
        projector_file(name)  # an unknown name stops here
    for name in projectors or [None] if seed is not None else []:
        own = OmegaConf.load(projector_file(name)) if name else upgrade(run.cfg.attribution).projector
        if own.get("seed") == seed:
            raise ConfigError(
                f"validate.projector_seed={seed} is the seed {name or 'the run'}'s projector already draws with: "
                "the same draw again; choose another seed"
            )


def validate_kernel(run, name, subsets, backdoor_by_epoch, projector=None, seed=None):
    """(rows, TracIn-CP sum [Q, N] or None, checkpoints in that sum, the vectors' k) of kernel `name` with projector
    `projector` (None: the run's own; rows then have no "projector" key, as before validate.projectors), drawn with
    `seed` where it has one (None: its config's): one row per checkpoint; the canary's backdoor rate of each
    checkpoint not yet in backdoor_by_epoch is added there."""
    attr = kernel_config(run.cfg, name)
    tag, cache = {"method": name}, name
    if projector is not None:
        attr = with_projector(attr, run.cfg, projector)
        tag["projector"] = projector
        cache = name if projector == own_projector(run.cfg.attribution) else f"{name}/{projector}"
    if seed is not None and "seed" in attr.projector:  # a second draw: its own score cache beside the first's
        attr = OmegaConf.merge(attr, {"projector": {"seed": seed}})
        cache = f"{cache}@seed{seed}"
    rows, tracin_sum, used, dim = [], None, 0, None
    for epoch, folder in run.epochs.items():
        require_safetensors(folder)  # a corrupted checkpoint stops validation naming the epoch, never scores
        model, tokenizer = load_pretrained(folder, run.cfg.model, dtype=weights_dtype(run.cfg))  # as trained
        scores = kernel_scores(run, cache, attr, model, tokenizer, folder)
        dim = int(scores["k"]) if "k" in scores else None  # (score files cached before k was saved lack it)
        rows.append({**tag, "epoch": epoch, **quality(scores["train"], scores.get("pool"), run, subsets)})
        lr = epoch_lr(folder, run.run_dir / "attribution" / folder.name / "metrics.json")
        if lr:  # TracIn-CP: sum over the trained checkpoints of lr x <g(q), g(d)>
            term = tracin_term(scores, lr)
            tracin_sum = term if tracin_sum is None else tracin_sum + term
            used += 1
        if run.canary_rows and epoch not in backdoor_by_epoch:
            backdoor_by_epoch[epoch] = backdoor(run, model, tokenizer)
        run.log(
            f"[lark] validate {cache} epoch {epoch}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float))
        )
    return rows, tracin_sum, used, dim


def write_result(result, run_dir, folder=None):
    """tables/table5.{md,csv}, figures/fig5_validation.png and validation/validation.json of the run (or all three
    in `folder`); returns the result with "files" (the table and figure paths) added after validation.json is
    written."""
    tables, figures, data = (
        (run_dir / "tables", run_dir / "figures", run_dir / "validation") if folder is None else [folder] * 3
    )
    files = write_table5(result, tables) + [plot_validation(result, figures / "fig5_validation.png")]
    write_json(data / "validation.json", result)
    result["files"] = [str(f) for f in files]
    return result
