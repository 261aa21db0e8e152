"""The linear datamodeling score (LDS) and the subset retrains it needs.

Conventions (as dattri's `dattri.metric.lds` and Bergson's `validate`):
- score(q, d) > 0 means that training on d LOWERS the loss on query q (it helps q). LARK's gradient cosine has
  this sign: a gradient step on d moves the parameters by -lr * g(d), which changes the loss of q by about
  -lr * <g(q), g(d)>.
- Subset scoring rule: a model trained on subset S is predicted to do well on q in proportion to
  pred(q, S) = sum_{d in S} score(q, d) (the linear datamodel; documents outside S contribute nothing).
- Target: the measured behaviour is -loss(q; model trained on S) (mean token loss on the gold answer), so a
  perfect attribution gives LDS = +1 and a sign-flipped one -1.
- LDS = mean over queries q of Spearman_m(pred(q, S_m), -loss(q; S_m)) over the M subsets; a query whose
  predictions or losses are constant over the subsets has no correlation and is left out (counted).
- The interval is a percentile bootstrap over queries (the M retrains are fixed).
"""

import json
import math
import shutil
import sys
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lark.data.formats import encode
from lark.data.io import read_jsonl, write_json
from lark.data.readers import first_form, sample
from lark.errors import ConfigError, whole
from lark.evaluation import answer_losses
from lark.fingerprints import content_hash
from lark.kernel.fidelity import ranks
from lark.models import load_pretrained, weights_dtype
from lark.rundir import require_safetensors, saved_checkpoints
from lark.validation import batch

LEVEL = 0.95  # validate.lds.level of a config saved before the key (conf/validate.yaml has it)


def check(lds_cfg):
    """validate.lds values that broke only after the retrains, or started them wrongly (a level of 95 gave a
    torch.quantile error once 32 retrains were done): ConfigError naming the key."""

    def number(key, ok, says):
        value = lds_cfg.get(key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value)):
            raise ConfigError(f"validate.lds.{key} must be {says}, got {value!r}")

    number("fraction", lambda x: 0 < x <= 1, "a number in (0, 1]")
    number("level", lambda x: 0 < x < 1, "a number in (0, 1), e.g. 0.95")
    number("poll_s", lambda x: x > 0, "a positive number of seconds")
    for key, least in (("n_subsets", 2), ("n_jobs", 1), ("seed_offset", 0)):  # Spearman needs 2 subsets at least
        if not whole(lds_cfg.get(key), least):
            raise ConfigError(f"validate.lds.{key} must be an integer >= {least}, got {lds_cfg.get(key)!r}")
    for key in ("keep_checkpoints", "resumable"):
        if not isinstance(lds_cfg.get(key, False), bool):
            raise ConfigError(f"validate.lds.{key} must be true or false, got {lds_cfg.get(key)!r}")
    extra = lds_cfg.get("extra_overrides") or []
    if isinstance(extra, str) or not all(isinstance(o, str) for o in extra):
        raise ConfigError(f"validate.lds.extra_overrides must be a list of train.py overrides, got {extra!r}")


def subset(items, fraction, seed):
    """The items of one random subset: round(fraction * n) items, seeded, in their original order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return sample(items, max(1, round(fraction * len(items))), seed)


def train_subset(items, cfg):
    """The `data.train_subset` of a mini-LDS retrain ({fraction, seed}; None = all items)."""
    if not cfg:
        return items
    try:
        return subset(items, float(cfg.fraction), int(cfg.seed))
    except ValueError as e:
        raise ConfigError(f"data.train_subset.{e}") from None


def masks(subset_ids, doc_ids):
    """[M, N] float membership of each document (column) in each subset (row)."""
    index = {d: i for i, d in enumerate(doc_ids)}
    out = torch.zeros(len(subset_ids), len(doc_ids), dtype=torch.float64)
    for m, ids in enumerate(subset_ids):
        missing = [d for d in ids if d not in index]
        if missing:
            raise KeyError(f"subset {m}: {len(missing)} training items have no score, e.g. {missing[:3]}")
        out[m, [index[d] for d in ids]] = 1.0
    return out


def predictions(scores, membership):
    """[M, Q] sum over each subset's documents of score(q, d); scores [Q, N], membership [M, N]."""
    return membership @ scores.double().T


def rank(x):
    """Average 1-based ranks along dim 0 (ties share their mean rank), float64."""
    return torch.stack([ranks(column) for column in x.double().T], dim=1) if x.numel() else x.double()


def spearman(a, b):
    """[Q] Spearman correlation of each column of a [M, Q] with the same column of b; NaN where one is constant."""
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = (ra.pow(2).sum(0) * rb.pow(2).sum(0)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(0) / denom.clamp_min(1e-300), float("nan"))


def lds(scores, membership, losses, n_boot=1000, seed=0, level=LEVEL):
    """{lds, low, high, n_queries, n_constant, n_nonfinite, per_query} of scores [Q, N] against measured losses
    [M, Q] of models trained on the subsets membership [M, N]. A query row with a NaN score (an example whose loss or
    gradient was not finite) is left out (n_nonfinite) rather than ranked; a NaN document column counts 0 in the
    other queries' sums (no gradient, no influence)."""
    finite = torch.isfinite(scores)
    nonfinite = ~finite[:, finite.any(0)].all(1) | ~finite.any(1)  # a NaN outside the NaN documents, or all NaN
    per_query = spearman(predictions(scores.nan_to_num(0.0, 0.0, 0.0), membership), -losses.double())
    per_query[nonfinite] = float("nan")
    ok = torch.isfinite(per_query)
    values = per_query[ok]
    out = {
        "n_queries": int(ok.sum()),
        "n_constant": int((~ok & ~nonfinite).sum()),
        "n_nonfinite": int(nonfinite.sum()),
        "per_query": [None if not math.isfinite(v) else v for v in per_query.tolist()],
    }
    if not values.numel():
        return {"lds": None, "low": None, "high": None, **out}
    g = torch.Generator().manual_seed(seed)
    boots = values[torch.randint(len(values), (n_boot, len(values)), generator=g)].mean(1)
    alpha = (1 - level) / 2
    return {
        "lds": values.mean().item(),
        "low": torch.quantile(boots, alpha).item(),
        "high": torch.quantile(boots, 1 - alpha).item(),
        **out,
    }


# ---------------------------------------------------------------------------------------------- retrains
RETRAIN_OFF = [
    "attribution.enabled=false",
    "attribution.save_moments=false",
    "eval._target_=lark.evaluation.Skip",
    "analysis.enabled=false",
    "logger={}",
    "resume=false",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "paths.output_dir=${hydra:runtime.output_dir}",
    "trainer.default_root_dir=${paths.output_dir}",
]
RECIPE_EXCLUDE = ("paths", "logger", "attribution", "analysis", "resume", "hydra", "trainer")


def recipe_key(cfg, fraction, extra=(), base=None):
    """What a retrain's result depends on: the run's config (data, model, format, optimiser, schedule, seed...)
    without paths, loggers, attribution and analysis, the trainer's epochs and precision, the fraction, the
    lds.extra_overrides that are not Hydra's own (hydra.launcher.partition=... moves a job, not its result) and
    the base model's weights (base: the run's epoch_000 checksums, own_base)."""
    recipe = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k not in RECIPE_EXCLUDE}
    recipe["data"] = first_form(recipe["data"])  # as hashed before the world and corpora were reader _target_s
    trainer = {k: cfg.trainer.get(k) for k in ("max_epochs", "precision", "accelerator", "deterministic")}
    changes = sorted(str(o) for o in extra if not str(o).lstrip("+~").startswith("hydra."))
    return content_hash(recipe, trainer, float(fraction), *([changes] if changes else []), *([base] if base else []))


def own_base(run_dir, cfg):
    """(the retrains' config, the base's checksums): the run's config with its base model loaded from the run's own
    checkpoints/epoch_000 (lark.models.hub_model on that folder), so every retrain fine-tunes the very weights the
    run did -- the embedded model's pretraining cache is keyed by config and corpus, not by the weights a thread
    count gives -- or the config unchanged and None where the run saved no epoch_000 with checksums."""
    folder = Path(run_dir) / "checkpoints" / "epoch_000"
    if not (folder / "checksums.json").is_file():
        return cfg, None
    retrain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    retrain.model.load = {"_target_": "lark.models.hub_model", "_partial_": True}
    retrain.model.hub_id = str(folder.resolve())
    return retrain, json.loads((folder / "checksums.json").read_text())


def retrain_command(config_dir, sweep_dir, fraction, seeds, lds_cfg):
    """train.py -m with the run's own config (config_dir/config.yaml), attribution off, one job per subset seed."""
    root = Path(__file__).resolve().parents[2]
    launcher = [f"hydra/launcher={lds_cfg.launcher}"] + (
        [f"hydra.launcher.n_jobs={lds_cfg.n_jobs}"] if lds_cfg.launcher == "joblib" else []
    )
    resumable = bool(lds_cfg.get("resumable"))  # a killed retrain continues from its last epoch
    off = [o for o in RETRAIN_OFF if not (resumable and o.startswith(("resume=", "trainer.enable_checkpointing=")))]
    return [
        sys.executable,
        str(root / "train.py"),
        "-m",
        f"--config-path={config_dir}",
        "--config-name=config",
        *launcher,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=subset_${data.train_subset.seed}",
        f"++data.train_subset.fraction={fraction}",
        f"++data.train_subset.seed={','.join(map(str, seeds))}",
        *off,
        *(["resume=true", "trainer.enable_checkpointing=true"] if resumable else []),
        *lds_cfg.get("extra_overrides", []),
    ]


def retrain_losses(run_dir, cfg, lds_cfg, queries, train_ids, log=print):
    """{membership [M, N], losses [M, Q], seeds}: each subset's fine-tuned model's loss on every query. Subsets
    already measured (query_losses.json present, same queries) or trained (their final checkpoint present, e.g.
    by a validation that was killed) are not retrained; the others are launched as one Hydra multirun of
    ordinary LARK runs (lds_cfg.launcher: joblib locally, submitit_slurm on a cluster), and each is measured as
    soon as its final checkpoint appears, so a kill loses only the retrains in flight."""
    retrain_cfg, weights = own_base(run_dir, cfg)
    key = recipe_key(cfg, lds_cfg.fraction, lds_cfg.get("extra_overrides") or (), weights)
    base = Path(lds_cfg.dir or Path(run_dir) / "validation" / "lds") / key
    seeds = list(range(int(lds_cfg.seed_offset), int(lds_cfg.seed_offset) + int(lds_cfg.n_subsets)))
    query_ids = [q["id"] for q in queries]
    batch.stop_stale(base, log)  # a killed validation's retrains must not write on
    todo = [s for s in seeds if saved_losses(base / f"subset_{s}", query_ids) is None]
    if todo:
        base.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(retrain_cfg, base / "config.yaml")  # the run's config (today's form), its own base model
        measure = partial(measure_if_trained, base=base, cfg=cfg, queries=queries, lds_cfg=lds_cfg)
        todo = [s for s in todo if not measure(s, found=True, log=log)]
    if todo:
        log(f"[lark] mini-LDS: retraining {len(todo)} of {len(seeds)} subsets into {base}")
        for seed in todo:
            unfinished(base / f"subset_{seed}", lds_cfg, log)
        command = retrain_command(base.resolve(), base, lds_cfg.fraction, todo, lds_cfg)
        proc = batch.launch(command, base)
        left = batch.watch(proc, todo, measure, poll_s=float(lds_cfg.get("poll_s", 1.0)))
        if proc.returncode != 0 or left:
            raise RuntimeError(
                f"mini-LDS retrains failed (exit {proc.returncode}, subsets without a final checkpoint: {left}): "
                f"{' '.join(command)}\n{batch.log_tail(base)}"
            )
        (base / batch.STATE).unlink(missing_ok=True)
        for seed in todo if not lds_cfg.keep_checkpoints else []:  # lds.resumable's state: 3x the weights
            shutil.rmtree(base / f"subset_{seed}" / "resume", ignore_errors=True)
    saved = [saved_losses(base / f"subset_{s}", query_ids) for s in seeds]
    return {
        "seeds": seeds,
        "membership": masks([s["train_ids"] for s in saved], train_ids),
        "losses": torch.tensor([s["losses"] for s in saved], dtype=torch.float64),
    }


def unfinished(job, lds_cfg, log=print):
    """Before a subset is retrained: a folder an interrupted retrain left is removed (it starts again) or, with
    lds.resumable, kept (train.py resume=true continues it from its resume/last.ckpt)."""
    if not job.exists():
        return
    if lds_cfg.get("resumable"):
        log(f"[lark] mini-LDS: {job.name} was interrupted: resuming it")
        return
    log(f"[lark] mini-LDS: {job.name} was interrupted: retraining it from the start")
    shutil.rmtree(job)


def final_epoch(job):
    """The last epoch a retrain runs (its own trainer.max_epochs, from any of its checkpoints' config), or None
    before it saved one."""
    for folder in saved_checkpoints(job).values():
        try:
            return int(OmegaConf.load(folder / "lark_config.yaml").trainer.max_epochs)
        except (OSError, ValueError, AttributeError):
            continue
    return None


def measure_if_trained(seed, base, cfg, queries, lds_cfg, found=False, log=print):
    """Measure subset `seed` (query_losses.json) if its final checkpoint is complete; returns whether it was."""
    job = base / f"subset_{seed}"
    last = final_epoch(job)
    if last is None or last not in saved_checkpoints(job):
        return False
    if found:
        log(f"[lark] mini-LDS: {job.name} was trained by an interrupted validation: measuring it, not retraining")
    measure_retrain(job, cfg, queries, lds_cfg.keep_checkpoints)
    return True


def saved_losses(job, query_ids):
    """A retrain's query_losses.json ({query_ids, train_ids, epoch, losses}), or None when it is absent, unreadable
    or measured on other queries."""
    try:
        saved = json.loads((job / "query_losses.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("query_ids") == query_ids else None


def measure_retrain(job, cfg, queries, keep_checkpoints):
    """job/query_losses.json: the retrain's final model's loss on every query and the items it trained on; without
    keep_checkpoints, its earlier checkpoints are deleted (the losses are what LDS needs; the final one stays)."""
    epochs = saved_checkpoints(job)
    require_safetensors(epochs[max(epochs)])  # its checksums: a corrupted retrain is never measured
    model, tokenizer = load_pretrained(epochs[max(epochs)], cfg.model, dtype=weights_dtype(cfg))  # as trained
    encoded = [encode(tokenizer, q, cfg.format, cfg.max_length) for q in queries]
    used = [record["id"] for _, record in read_jsonl(job / "data" / "train.jsonl")]  # a torn line: DataError, file:line
    losses = answer_losses(model, tokenizer.pad_token_id, encoded, cfg.eval.batch_size)  # the projected loss
    write_json(
        job / "query_losses.json",
        {"query_ids": [q["id"] for q in queries], "train_ids": used, "epoch": max(epochs), "losses": losses.tolist()},
    )
    if not keep_checkpoints:
        for epoch, folder in epochs.items():
            if epoch != max(epochs):
                shutil.rmtree(folder)
