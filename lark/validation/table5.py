"""Table V, attribution quality: does a kernel find the data that made the model behave so? (`python validate.py`)

For every kernel of `validate.kernels` (names of the attribution/kernel group, with the run's own projector),
every checkpoint, plus BM25 and random scores, three checks:
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
time each column cost).

The verbs, each in its module: load the run (load.py), score each kernel and baseline (scores.py), measure the
checks (quality.py), write Table V (write.py); validate_run below chains them.
"""

import time
from pathlib import Path

from omegaconf import OmegaConf

from lark import console
from lark.data.io import write_json
from lark.models import load_pretrained
from lark.rundir import epoch_lr, require_safetensors
from lark.validation import lds
from lark.validation.load import lds_enabled, load_run
from lark.validation.quality import backdoor, quality
from lark.validation.scores import BASELINES, kernel_config, kernel_scores, tracin_term
from lark.validation.write import plot_validation, write_table5


def validate_run(run_dir, vcfg, log=print):
    """Table V of a run directory; returns the result dict also written to validation/validation.json."""
    run_dir = Path(run_dir)
    console.setup()  # as train.py: no per-file progress bars of transformers in a log
    run = load_run(run_dir, vcfg, log)
    timing, subsets = {}, None
    if lds_enabled(vcfg, run.cfg):
        start = time.perf_counter()
        subsets = lds.retrain_losses(run_dir, run.cfg, vcfg.lds, run.queries, [x["id"] for x in run.train], log)
        timing["lds_retrains"] = time.perf_counter() - start
    rows, backdoor_by_epoch, tracin = [], {}, {}
    for name in vcfg.kernels or []:
        start = time.perf_counter()
        kernel_rows, tracin_sum, used = validate_kernel(run, name, subsets, backdoor_by_epoch)
        rows += kernel_rows
        timing[name] = time.perf_counter() - start
        if tracin_sum is not None:
            tracin[name] = {"checkpoints": used}
            rows.append({"method": f"{name} TracIn-CP", "epoch": "all", **quality(tracin_sum, None, run, subsets)})
    for name, baseline in BASELINES.items():
        start = time.perf_counter()
        rows.append({"method": name, "epoch": "-", **quality(*baseline(run), run, subsets)})
        timing[name] = time.perf_counter() - start
    for row in rows:
        row["seconds"] = timing.get(row["method"].removesuffix(" TracIn-CP"))
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
        "lds": None if subsets is None else {"n_subsets": len(subsets["losses"]), "fraction": float(vcfg.lds.fraction)},
    }
    return write_result(result, run_dir)


def validate_kernel(run, name, subsets, backdoor_by_epoch):
    """(rows, TracIn-CP sum [Q, N] or None, checkpoints in that sum) of kernel `name`: one row per checkpoint; the
    canary's backdoor rate of each checkpoint not yet in backdoor_by_epoch is added there."""
    attr = kernel_config(run.cfg.attribution, name)
    rows, tracin_sum, used = [], None, 0
    for epoch, folder in run.epochs.items():
        require_safetensors(folder)  # a corrupted checkpoint stops validation naming the epoch, never scores
        model, tokenizer = load_pretrained(folder, run.cfg.model)
        scores = kernel_scores(run, name, attr, model, tokenizer, folder)
        rows.append({"method": name, "epoch": epoch, **quality(scores["train"], scores.get("pool"), run, subsets)})
        lr = epoch_lr(folder, run.run_dir / "attribution" / folder.name / "metrics.json")
        if lr:  # TracIn-CP: sum over the trained checkpoints of lr x <g(q), g(d)>
            term = tracin_term(scores, lr)
            tracin_sum = term if tracin_sum is None else tracin_sum + term
            used += 1
        if run.canary_rows and epoch not in backdoor_by_epoch:
            backdoor_by_epoch[epoch] = backdoor(run, model, tokenizer)
        run.log(
            f"[lark] validate {name} epoch {epoch}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if isinstance(v, float))
        )
    return rows, tracin_sum, used


def write_result(result, run_dir):
    """tables/table5.{md,csv}, figures/fig5_validation.png and validation/validation.json; returns the result with
    "files" (the table and figure paths) added after validation.json is written."""
    files = write_table5(result, run_dir / "tables") + [
        plot_validation(result, run_dir / "figures" / "fig5_validation.png")
    ]
    write_json(run_dir / "validation" / "validation.json", result)
    result["files"] = [str(f) for f in files]
    return result
