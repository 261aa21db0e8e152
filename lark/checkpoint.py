"""Evaluating one checkpoint: save it, measure test accuracy, fingerprint it, attribute it (lark.attribution),
and return the metrics to log. The training callback (lark.callbacks) and `attribute.py` (lark.experiment) both
call `evaluate_checkpoint`. With `resume=true` an epoch whose metrics.json matches (same fingerprint) is not
attributed again."""
import json

from omegaconf import OmegaConf

from lark.attribution import attribute_checkpoint, write_predictions
from lark.fingerprints import fingerprints
from lark.models import content_hash, save_checkpoint
from lark.sources import query_examples
from lark.training import answer_accuracy


def wanted(attr, epoch):
    """Whether `attribution.checkpoints` asks for this epoch."""
    return attr.enabled and (attr.checkpoints == "all" or epoch in list(attr.checkpoints))


def epoch_fingerprint(cfg, prints, test_items, sets, epoch):
    """Everything an epoch's attribution depends on: the checkpoint, tokenizer and format fingerprints, the
    attribution and source configs, the examples."""
    attr = {k: v for k, v in OmegaConf.to_container(cfg.attribution, resolve=True).items()
            if k not in ("enabled", "checkpoints", "save_checkpoints")}
    return content_hash(prints, attr, OmegaConf.to_container(cfg.source, resolve=True), cfg.max_length, test_items, sets, epoch)


def completed(folder, fingerprint):
    """The metrics of an attributed epoch whose metrics.json carries this fingerprint, else None."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("fingerprint") == fingerprint else None


def evaluate_checkpoint(cfg, model, tokenizer, test_items, sets, run_dir, epoch, lr, rank=0, world=1, gather=None,
                        log=print, reuse=False):
    """Save the checkpoint (if asked), measure accuracy, attribute (if asked). Returns (scalars to log, top-k rows).
    reuse: skip an epoch already complete for this checkpoint and config, and reuse its matching stores and shards."""
    fmt, attr = cfg.format, cfg.attribution
    name = f"epoch_{epoch:03d}"
    prints = fingerprints(model, tokenizer, fmt) if wanted(attr, epoch) else None
    fingerprint = prints and epoch_fingerprint(cfg, prints, test_items, sets, epoch)
    done = completed(run_dir / "attribution" / name, fingerprint) if reuse and prints else None
    saved = not attr.save_checkpoints or (run_dir / "checkpoints" / name / "model.safetensors").is_file()
    if done and saved:
        log(f"[lark] {name}: complete (metrics.json matches this checkpoint and config), not attributed again")
        return {"test/accuracy": done["accuracy"], "checkpoint_epoch": epoch, **influence_logs(done)}, []
    if attr.save_checkpoints and rank == 0:
        save_checkpoint(model, tokenizer, run_dir / "checkpoints" / name,
                        {"lark_config.yaml": OmegaConf.to_yaml(cfg, resolve=True),
                         "lark_epoch.json": json.dumps({"epoch": epoch, "lr": lr})})
    accuracy, predicted, logp = answer_accuracy(model, tokenizer, test_items, query_examples(test_items, fmt), fmt,
                                                cfg.max_length, with_scores=True)
    log(f"[lark] {name}: test accuracy {accuracy:.3f}")
    logged = {"test/accuracy": accuracy, "checkpoint_epoch": epoch}
    if not wanted(attr, epoch):
        return logged, []
    if rank == 0:
        write_predictions(run_dir / "attribution" / name / "predictions.jsonl", test_items, predicted, logp)
    queries = query_examples(test_items, fmt, predicted if attr.query_target == "predicted" else None)
    metrics, rows = attribute_checkpoint(
        model, tokenizer, sets, queries, fmt, attr, cfg.source,
        run_dir / "attribution" / name, cfg.max_length,
        {"epoch": epoch, "accuracy": accuracy, "lr": lr, "fingerprint": fingerprint}, rank, world, gather, log,
        reuse, prints)
    log(f"[lark] {name}: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("ft", "pt", "ft_pt_ratio", "pt_wins")
                                       if metrics[k] is not None))
    return {**logged, **influence_logs(metrics)}, rows


def influence_logs(metrics):
    """Flat scalar metrics for the loggers."""
    out = {f"influence/mean_max/{s}": v["mean_max"] for s, v in metrics["sources"].items()}
    out.update({f"influence/ft_wins/{s}": v["ft_wins"] for s, v in metrics["sources"].items()})
    out.update({f"influence/{k}": metrics[k] for k in ("ft", "pt", "ft_pt_ratio", "ft_wins", "pt_wins")})
    out.update({f"influence/format_effect/{k}": v for k, v in metrics["format_effect"].items()})
    out["bm25/ft_wins"] = metrics["bm25"]["ft_wins"]
    return {k: v for k, v in out.items() if v is not None}
