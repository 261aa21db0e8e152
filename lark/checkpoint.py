"""Evaluating one checkpoint: save it, measure test accuracy, fingerprint it, attribute it (lark.attribution),
and return the metrics to log. The training callback (lark.callbacks) and `attribute.py` (lark.experiment) both
call `evaluate_checkpoint`. With `resume=true` an epoch whose metrics.json matches (same fingerprint) is not
attributed again."""

import json

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.analysis.schema import check as check_metrics
from lark.attribution import attribute_checkpoint, write_predictions
from lark.data.formats import Encoder
from lark.data.sources import query_examples
from lark.evaluation import gold_answer_losses
from lark.fingerprints import content_hash, fingerprints
from lark.kernel.optimizer import MOMENTS_FILE
from lark.models import save_checkpoint


def wanted(attr, epoch):
    """Whether `attribution.checkpoints` asks for this epoch."""
    return attr.enabled and (attr.checkpoints == "all" or epoch in list(attr.checkpoints))


def epoch_fingerprint(cfg, prints, test_items, sets, epoch):
    """Everything an epoch's attribution depends on: the checkpoint, tokenizer and format fingerprints, the
    attribution and source configs, the examples."""
    attr = {
        k: v
        for k, v in OmegaConf.to_container(cfg.attribution, resolve=True).items()
        if k not in ("enabled", "checkpoints", "save_checkpoints")
    }
    return content_hash(
        prints, attr, OmegaConf.to_container(cfg.source, resolve=True), cfg.max_length, test_items, sets, epoch
    )


def completed(folder, fingerprint):
    """The metrics of an attributed epoch whose metrics.json carries this fingerprint, else None."""
    try:
        metrics = check_metrics(json.loads((folder / "metrics.json").read_text()), folder / "metrics.json")
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("fingerprint") == fingerprint else None


def evaluate_checkpoint(
    cfg,
    model,
    tokenizer,
    test_items,
    sets,
    run_dir,
    epoch,
    lr,
    rank=0,
    world=1,
    gather=None,
    log=print,
    reuse=False,
    moments=None,
    encoder=None,
):
    """Save the checkpoint (if asked), measure accuracy, attribute (if asked). Returns (scalars to log, top-k rows).
    reuse: skip an epoch already complete for this checkpoint and config, and reuse its matching stores and shards.
    encoder: the run's lark.data.formats.Encoder (the data module's), so that no example is tokenised twice."""
    fmt, attr = cfg.format, cfg.attribution
    encoder = encoder or Encoder(tokenizer, fmt, cfg.max_length)
    name = f"epoch_{epoch:03d}"
    prints = fingerprints(model, tokenizer, fmt) if wanted(attr, epoch) else None
    fingerprint = prints and epoch_fingerprint(cfg, prints, test_items, sets, epoch)
    done = completed(run_dir / "attribution" / name, fingerprint) if reuse and prints else None
    saved = not attr.save_checkpoints or (run_dir / "checkpoints" / name / "model.safetensors").is_file()
    if done and saved:
        log(f"[lark] {name}: complete (metrics.json matches this checkpoint and config), not attributed again")
        score = done.get("eval") or {"metric": "accuracy", "value": done.get("accuracy")}  # runs before `eval`
        return {f"test/{score['metric']}": score["value"], "checkpoint_epoch": epoch, **influence_logs(done)}, []
    if attr.save_checkpoints and rank == 0:
        save_checkpoint(
            model,
            tokenizer,
            run_dir / "checkpoints" / name,
            {
                "lark_config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
                "lark_epoch.json": json.dumps({"epoch": epoch, "lr": lr}),
            },
        )
        if moments is not None:  # the AdamW moments of this checkpoint, for attribute.py (lark.kernel.kernels)
            moments.save(run_dir / "checkpoints" / name / MOMENTS_FILE)
    evaluator = instantiate(cfg.eval)
    fields = query_examples(test_items, fmt)
    value, predicted = evaluator(model, encoder, test_items, fields)
    log(
        f"[lark] {name}: not evaluated (eval=none)"
        if evaluator.metric == "none"
        else f"[lark] {name}: test {evaluator.metric} " + ("-" if value is None else f"{value:.3f}")
    )
    logged = {"checkpoint_epoch": epoch, **({} if value is None else {f"test/{evaluator.metric}": value})}
    accuracy = value if evaluator.higher_is_better else None  # Table I's "best" epoch maximises it
    if not wanted(attr, epoch):
        return logged, []
    if rank == 0:
        write_predictions(
            run_dir / "attribution" / name / "predictions.jsonl",
            test_items,
            predicted,
            gold_answer_losses(model, encoder, fields),
        )
    queries = query_examples(test_items, fmt, predicted if attr.query_target == "predicted" else None)
    metrics, rows = attribute_checkpoint(
        model,
        tokenizer,
        sets,
        queries,
        fmt,
        attr,
        cfg.source,
        run_dir / "attribution" / name,
        cfg.max_length,
        {"epoch": epoch, "accuracy": accuracy, "eval": evaluator.describe(value), "lr": lr, "fingerprint": fingerprint},
        rank,
        world,
        gather,
        log,
        reuse,
        prints,
        moments,
        encoder,
    )
    log(
        f"[lark] {name}: "
        + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("ft", "pt", "ft_pt_ratio", "pt_wins") if metrics[k] is not None)
    )
    return {**logged, **influence_logs(metrics)}, rows


def influence_logs(metrics):
    """Flat scalar metrics for the loggers."""
    out = {f"influence/mean_max/{s}": v["mean_max"] for s, v in metrics["sources"].items()}
    out.update({f"influence/ft_wins/{s}": v["ft_wins"] for s, v in metrics["sources"].items()})
    out.update({f"influence/{k}": metrics[k] for k in ("ft", "pt", "ft_pt_ratio", "ft_wins", "pt_wins")})
    out.update({f"influence/format_effect/{k}": v for k, v in metrics["format_effect"].items()})
    out["bm25/ft_wins"] = metrics["bm25"]["ft_wins"]
    return {k: v for k, v in out.items() if v is not None}
