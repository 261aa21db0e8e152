"""What happens at one checkpoint, top to bottom: save it, measure test accuracy, fingerprint it, then attribute it
as three verbs -- build the stores (project every set), score them (each query's best documents), measure the
paper's metrics (+ the BM25 baseline and the storage). The training callback (lark.callbacks) and `attribute.py`
(lark.experiment) both call `evaluate_checkpoint` with a Checkpoint, the context every verb shares. With
`resume=true` an epoch whose metrics.json matches (same fingerprint) is not attributed again.

Layout written under attribution/epoch_NNN/:
  stores/<set>.safetensors   unit-normalised projections [n, k] in the attribution.store_dtype tier + norms [n]
                              (float32); header metadata: ids, set, epoch, tier, projector spec (lark.kernel.stores)
  scores/<source>.safetensors cosine scores [n_queries, n_docs] float32 (attribution.save_scores)
  top_influences.csv          the top-k documents of every source for every query
  tokens/<source>.jsonl       each top pair's score split over its tokens (attribution.tokens=topk, lark.kernel.tokens)
  predictions.jsonl           per test question: gold and predicted answer, loss of the gold answer
  metrics.json                (schema: lark/analysis/schema.py) the paper's metrics (lark.analysis.metrics) + the eval,
                              lr, storage, BM25 baseline, non-finite ids, fingerprints, warnings; written last
  shards/                     only while a set larger than attribution.shard_size is in progress (lark.kernel.build)
Stores, shards, score matrices and checkpoints carry checksums (lark.data.io); lark.reuse and `intact` say what
resume=true does with one that fails its own.
"""

import errno
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark import notices
from lark.analysis import metrics as M
from lark.analysis.schema import check as check_metrics
from lark.data.formats import Encoder
from lark.data.io import check_manifest, disk_full, write_csv, write_json, write_jsonl
from lark.data.sources import example_text, query_examples
from lark.errors import CorruptFile
from lark.evaluation import evaluate_on_ranks, gold_answer_losses, normalize
from lark.fingerprints import PROJECTOR_VERSION, content_hash, fingerprints, without_locations
from lark.kernel import tokens
from lark.kernel.build import StoreBuilder, examples_fingerprint
from lark.kernel.factory import make_kernel, make_projector
from lark.kernel.optimizer import MOMENTS_FILE
from lark.kernel.projectors import trainable
from lark.kernel.stores import atomic_save, check_compatible, cosine_scores, tier_of, topk_scores
from lark.models import save_checkpoint
from lark.reuse import reusable, stored_sets

QUERY_SET = "test_queries"
TOP_COLUMNS = ("query_id", "source", "rank", "doc_id", "score")  # top_influences.csv
# attribution keys an epoch's stores, scores and metrics do not depend on (the token files are checked on their own)
UNFINGERPRINTED = ("enabled", "checkpoints", "save_checkpoints", "tokens", "tokens_top_k", "tokens_split")
UNFINGERPRINTED += ("tokens_pass", "tokens_budget", "tokens_kept")


@dataclass
class Checkpoint:
    """One checkpoint at work: what every verb below shares.

    cfg: the run's config (its attribution, source, format, eval and max_length are read; all of it is saved with
    the checkpoint); run_dir: the run's folder (the checkpoint goes to checkpoints/epoch_NNN, its attribution to
    attribution/epoch_NNN); lr: the learning rate of the epoch that produced it (None at epoch 0); moments: its
    AdamW moments for the kernels that use them (lark.kernel.kernels); encoder: the run's memoised
    lark.data.formats.Encoder (the data module's, so that no example is tokenised twice; made here when None);
    rank, world, gather, gather_objects: this process among `world` (an all_gather of tensors, one of Python
    objects; world > 1); reuse: skip an epoch complete for this checkpoint and config, and reuse its matching
    stores and shards (resume)."""

    cfg: object
    model: torch.nn.Module
    tokenizer: object
    run_dir: Path
    epoch: int
    lr: float | None = None
    moments: object = None
    encoder: Encoder | None = None
    rank: int = 0
    world: int = 1
    gather: Callable | None = None
    gather_objects: Callable | None = None
    reuse: bool = False
    log: Callable = print

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.encoder = self.encoder or Encoder(self.tokenizer, self.cfg.format, self.cfg.max_length)

    @cached_property
    def prints(self):
        """The fingerprints of the checkpoint, the tokenizer and the format (lark.fingerprints), computed once."""
        return fingerprints(self.model, self.tokenizer, self.cfg.format)

    @property
    def name(self):
        return f"epoch_{self.epoch:03d}"

    @property
    def out_dir(self):
        """attribution/epoch_NNN: this checkpoint's stores, scores, top influences, predictions and metrics."""
        return self.run_dir / "attribution" / self.name

    def builder(self, projector):
        """The lark.kernel.build.StoreBuilder that projects this checkpoint's sets into out_dir/stores."""
        attr = self.cfg.attribution
        return StoreBuilder(
            self.model,
            projector,
            self.out_dir,
            self.tokenizer.pad_token_id,
            tier=attr.store_dtype,
            batch_size=attr.batch_size,
            shard_size=attr.get("shard_size"),
            rank=self.rank,
            world=self.world,
            gather=self.gather,
            reuse=self.reuse,
            log=self.log,
        )


@dataclass
class Stores:
    """A checkpoint's stores as the scores see them: build_stores' result, score's and measure's input."""

    projector: object
    kernel: object
    vectors: dict = field(default_factory=dict)  # {set: decoded unit vectors [n, k] float32, NaN rows non-finite}
    metas: dict = field(default_factory=dict)  # {set: the store's header metadata}
    nonfinite: dict = field(default_factory=dict)  # {set: ids of examples with a non-finite loss or gradient}


# ------------------------------------------------------------------------------------------- the checkpoint
def evaluate_checkpoint(ck, test_items, sets):
    """Save the checkpoint (if asked), measure accuracy, attribute (if asked). Returns (scalars to log, top-k rows).
    sets: {source: [example]}; ck.reuse: skip an epoch already complete for this checkpoint and config, and reuse
    its matching stores and shards."""
    attr = ck.cfg.attribution
    prints = ck.prints if wanted(attr, ck.epoch) else None
    fingerprint = prints and epoch_fingerprint(ck.cfg, prints, test_items, sets, ck.epoch)
    done = reusable(ck, test_items, sets, fingerprint, QUERY_SET) if ck.reuse and prints else None
    saved = not attr.save_checkpoints or intact(ck.run_dir / "checkpoints" / ck.name, ck.log)
    if done and saved:
        stored = stored_sets(ck.out_dir, ck.cfg, test_items, sets, QUERY_SET)
        if ck.rank == 0 and tokens.complete(ck, stored, QUERY_SET):  # the token files asked, from its stores
            ck.log(f"[lark] {ck.name}: token files written from its stores and top_influences.csv")
        ck.log(f"[lark] {ck.name}: complete (metrics.json matches this checkpoint and config), not attributed again")
        score = done.get("eval") or {"metric": "accuracy", "value": done.get("accuracy")}  # runs before `eval`
        return {f"test/{score['metric']}": score["value"], "checkpoint_epoch": ck.epoch, **influence_logs(done)}, []
    if attr.save_checkpoints and ck.rank == 0:
        save(ck)
    fields = query_examples(test_items, ck.cfg.format)
    evaluator, value, predicted = evaluate(ck, test_items, fields)
    logged = {"checkpoint_epoch": ck.epoch, **({} if value is None else {f"test/{evaluator.metric}": value})}
    if not wanted(attr, ck.epoch):
        return logged, []
    if ck.rank == 0:
        losses = gold_answer_losses(ck.model, ck.encoder, fields, ck.cfg.eval.batch_size)
        write_predictions(ck.out_dir / "predictions.jsonl", test_items, predicted, losses)
    queries = query_examples(test_items, ck.cfg.format, predicted if attr.query_target == "predicted" else None)
    info = {
        "epoch": ck.epoch,
        "accuracy": value if evaluator.higher_is_better else None,  # Table I's "best" epoch maximises it
        "eval": evaluator.describe(value),
        "lr": ck.lr,
        "fingerprint": fingerprint,
    }
    metrics, rows = attribute_checkpoint(ck, sets, queries, info)
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("ft", "pt", "ft_pt_ratio", "pt_wins") if metrics[k] is not None)
    ck.log(f"[lark] {ck.name}: {shown}")
    return {**logged, **influence_logs(metrics)}, rows


def wanted(attr, epoch):
    """Whether `attribution.checkpoints` asks for this epoch."""
    return attr.enabled and (attr.checkpoints == "all" or epoch in list(attr.checkpoints))


def epoch_fingerprint(cfg, prints, test_items, sets, epoch):
    """Everything an epoch's attribution depends on: the checkpoint, tokenizer and format fingerprints, the
    attribution and source configs, the examples."""
    attr = {k: v for k, v in OmegaConf.to_container(cfg.attribution, resolve=True).items() if k not in UNFINGERPRINTED}
    return content_hash(prints, attr, without_locations(cfg.source), cfg.max_length, test_items, sets, epoch)


def intact(folder, log=print):
    """Whether a checkpoint folder holds its weights and passes its checksums.json (a corrupted one is logged)."""
    if not (folder / "model.safetensors").is_file():
        return False
    try:
        check_manifest(folder)
    except CorruptFile as e:
        log(f"[lark] {e}: saved again from the model in memory")
        return False
    return True


def save(ck):
    """checkpoints/epoch_NNN: the HF model and tokenizer (with checksums.json), the resolved config, the epoch's lr
    and (when given) the AdamW moments of this checkpoint, for attribute.py (lark.kernel.kernels). A full disk
    raises DiskFull naming the folder and the bytes of the weights; the half-written folder goes."""
    folder = ck.run_dir / "checkpoints" / ck.name
    files = {
        "lark_config.yaml": OmegaConf.to_yaml(ck.cfg, resolve=True),
        "lark_epoch.json": json.dumps({"epoch": ck.epoch, "lr": ck.lr}),
    }
    try:
        save_checkpoint(ck.model, ck.tokenizer, folder, files)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        for tmp in folder.parent.glob(f"{folder.name}.tmp[0-9]*"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(folder, sum(p.numel() * p.element_size() for p in ck.model.parameters())) from None
    if ck.moments is not None:
        ck.moments.save(folder / MOMENTS_FILE)


def evaluate(ck, test_items, fields):
    """(evaluator, value, predicted answers) of the test questions under the `eval` config; the value is logged."""
    evaluator = instantiate(ck.cfg.eval)
    split = ck.rank, ck.world, ck.gather_objects
    value, predicted = evaluate_on_ranks(evaluator, ck.model, ck.encoder, test_items, fields, *split)
    shown = "-" if value is None else f"{value:.3f}"
    ck.log(
        f"[lark] {ck.name}: "
        + ("not evaluated (eval=none)" if evaluator.metric == "none" else f"test {evaluator.metric} {shown}")
    )
    if warning := evaluator.warning(value, len(test_items)):  # every answer scores 0: say so, and keep it
        notices.warn(ck.run_dir if ck.rank == 0 else None, f"eval_{ck.name}", warning, ck.log, epoch=ck.epoch)
    return evaluator, value, predicted


def write_predictions(path, items, predicted, losses):
    """predictions.jsonl: per test question its gold and predicted answer (None where the evaluator predicts
    nothing, eval=loss) and the loss = mean cross-entropy of the gold answer tokens (lark.evaluation)."""
    predicted = predicted or [None] * len(items)
    rows = [
        {
            "id": item["id"],
            "gold": item["answer"],
            "predicted": answer,
            "correct": None if answer is None else normalize(answer) == normalize(item["answer"]),
            "loss": M.clean(loss),
        }
        for item, answer, loss in zip(items, predicted, losses.tolist())
    ]
    write_jsonl(rows, path)


def influence_logs(metrics):
    """Flat scalar metrics for the loggers."""
    out = {f"influence/mean_max/{s}": v["mean_max"] for s, v in metrics["sources"].items()}
    out.update({f"influence/ft_wins/{s}": v["ft_wins"] for s, v in metrics["sources"].items()})
    out.update({f"influence/{k}": metrics[k] for k in ("ft", "pt", "ft_pt_ratio", "ft_wins", "pt_wins")})
    out.update({f"influence/format_effect/{k}": v for k, v in metrics["format_effect"].items()})
    out["bm25/ft_wins"] = metrics["bm25"]["ft_wins"]
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------ its attribution
def attribute_checkpoint(ck, sets, queries, info):
    """Stores, score matrices and metrics of one checkpoint: build_stores -> score -> measure.

    sets: {source: [example]}; queries: [example] (test queries); info: {epoch, accuracy, lr, ...} copied into
    metrics.json. metrics.json is written last: it marks the epoch complete. Returns (metrics, top-k rows)."""
    if ck.rank == 0:
        (ck.out_dir / "metrics.json").unlink(missing_ok=True)
        shutil.rmtree(ck.out_dir / "tokens", ignore_errors=True)  # another attribution's: its scores, not these
    kernel = make_kernel(ck.cfg.attribution)
    projector = make_projector(ck.cfg.attribution, ck.model, kernel, ck.moments)
    kept = tokens.kept_for(ck.cfg.attribution, projector, kernel) if ck.rank == 0 else None  # (position pieces)
    stores = build_stores(ck, projector, kernel, {QUERY_SET: queries, **sets}, kept)
    maxinf, rows = score(ck, stores, [q["id"] for q in queries], sets)
    if ck.rank == 0 and tokens.check(ck.cfg.attribution):  # tokens/<source>.jsonl (lark.kernel.tokens)
        everything = {QUERY_SET: queries, **sets}
        tokens.write_tokens(ck, projector, kernel, stores.vectors, everything, rows, QUERY_SET, kept=kept)
    del kept  # (its pieces, up to attribution.tokens_kept numbers, are not held through the metrics)
    metrics = measure(ck, stores, maxinf, queries, sets, info)
    if ck.rank == 0:
        write_csv(ck.out_dir / "top_influences.csv", [dict(zip(TOP_COLUMNS, r)) for r in rows], TOP_COLUMNS)
        write_json(ck.out_dir / "metrics.json", metrics)
    return metrics, rows


def build_stores(ck, projector, kernel, sets, kept=None):
    """Project every set ({set: [example]}, the test queries first) into its store (lark.kernel.build: shards,
    reuse), keeping the position pieces the token pass will read (kept: lark.kernel.tokens_kept.Kept, or None).
    Returns the Stores: decoded vectors, headers, the ids of non-finite examples."""
    stores, builder = Stores(projector, kernel), ck.builder(projector)
    spec = {**projector.spec(), "kernel": kernel.spec(), "version": PROJECTOR_VERSION}  # two kernels never mix
    for name, examples in sets.items():
        encoded = [ck.encoder(e) for e in examples]
        ids = [e["id"] for e in examples]
        meta = {
            "epoch": ck.epoch,
            "set": name,
            "projector": spec,
            **ck.prints,
            "examples": examples_fingerprint(encoded),
        }
        builder.keep = kept.start(name, stores.vectors.get(QUERY_SET)) if kept is not None else None
        stores.metas[name], stores.vectors[name] = meta, builder.build(encoded, ids, meta)
        stores.nonfinite[name] = [i for i, v in zip(ids, stores.vectors[name]) if not torch.isfinite(v).all()]
        if stores.nonfinite[name]:
            ck.log(
                f"[lark] {name}: {len(stores.nonfinite[name])} examples with a non-finite loss or gradient, left out "
                f"of the metrics: {stores.nonfinite[name][:5]}"
            )
    if kept is not None:
        kept.stop()
    builder.remove_empty_shards()
    return stores


def score(ck, stores, query_ids, sets):
    """Each query's top_k documents in every source, scored in blocks of score_block documents, and (rank 0, with
    attribution.save_scores) the full score matrices under scores/. Returns ({source: [n_queries] max influence,
    NaN where a query has none}, top_influences.csv rows)."""
    attr, tier = ck.cfg.attribution, ck.cfg.attribution.store_dtype
    vectors = stores.kernel.transform(stores.vectors, QUERY_SET)  # the vectors whose dot products are the scores
    maxinf, rows = {}, []
    for name, examples in sets.items():
        check_compatible(stores.metas[QUERY_SET], stores.metas[name], QUERY_SET, name)
        doc_ids = [e["id"] for e in examples]
        values, index = topk_scores(vectors[QUERY_SET], vectors[name], attr.top_k, tier, attr.score_block)
        best = values[:, 0] if values.shape[1] else torch.full((len(query_ids),), float("nan"))
        maxinf[name] = torch.where(torch.isfinite(best), best, float("nan"))
        if ck.rank == 0:
            rows += top_rows(values, index, query_ids, doc_ids, name)
        if ck.rank == 0 and attr.save_scores:
            scores = cosine_scores(vectors[QUERY_SET], vectors[name], tier, attr.score_block)
            metadata = {"queries": json.dumps(query_ids), "docs": json.dumps(doc_ids)}
            atomic_save({"scores": scores.contiguous()}, ck.out_dir / "scores" / f"{name}.safetensors", metadata)
    return maxinf, rows


def top_rows(values, index, query_ids, doc_ids, source):
    """Rows (query_id, source, rank, doc_id, score) of each query's best documents."""
    return [
        (q, source, r + 1, doc_ids[index[i, r]], round(values[i, r].item(), 6))
        for i, q in enumerate(query_ids)
        for r in range(values.shape[1])
        if math.isfinite(values[i, r])
    ]


def measure(ck, stores, maxinf, queries, sets, info):
    """metrics.json's content (checked against lark/analysis/schema.py): info, the paper's metrics of the max
    influences (lark.analysis.metrics), the BM25 baseline, the storage, what produced the scores."""
    src, fmt, attr = ck.cfg.source, ck.cfg.format, ck.cfg.attribution
    result = M.influence_metrics(maxinf, src.ft_source, src.pt_source, src.format_pairs)
    for name, spec in src.sources.items():
        result["sources"][name].update(
            n_docs=len(sets[name]), kind=spec.kind, corpus=spec.get("corpus"), formatted=bool(spec.formatted)
        )
    result = {
        **info,
        "n_queries": len(queries),
        **result,
        "bm25": M.bm25_baseline(
            [q["question"] for q in queries],
            {name: [example_text(e) for e in examples] for name, examples in sets.items()},
            src.ft_source,
            src.pt_source,
        ),
        "storage": storage(ck.model, stores.projector.k, attr.store_dtype, len(sets[src.ft_source])),
        "projector": stores.projector.spec(),
        "kernel": stores.kernel.spec(),
        "loss_target": {"answer_template": fmt.get("answer_template"), "query_target": attr.get("query_target")},
        "nonfinite": {"count": sum(map(len, stores.nonfinite.values())), "ids": stores.nonfinite},
        "fingerprints": ck.prints,
        "warnings": notices.read(ck.run_dir),
    }
    return check_metrics(M.clean(result), ck.out_dir / "metrics.json")


def storage(model, k, tier, n_examples):
    """Table III's storage: bytes of a full per-example gradient (the trainable parameters in their dtype) against a
    stored k-dimensional vector in the tier."""
    first = trainable(model)[0][1]
    n_params = sum(p.numel() for _, p in trainable(model))
    return M.storage(n_params, first.element_size(), k, tier_of(tier).bytes(k) / k, n_examples)
