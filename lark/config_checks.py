"""Fail at start, naming the key (ConfigError), on config values that would only break later: check_config runs
before any work in train.py, attribute.py and validate.py (lark.experiment), after preflight's hub, GPU and disk
checks (lark.preflight)."""

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from lark.data.corpora import check_corpora
from lark.data.io import BadRows
from lark.data.sources import check_sources
from lark.errors import ConfigError, whole
from lark.kernel import tokens
from lark.kernel.factory import make_kernel
from lark.kernel.kernels import Cosine
from lark.kernel.optimizer import adam_eps
from lark.kernel.stores import TIERS
from lark.kernel.tokens_math import TRANSPOSABLE
from lark.validation.canary import is_on

# data's keys (conf/data/*.yaml; canary from +experiment=canary) and data.fields' keys
DATA_KEYS = (
    *("name", "reader", "world", "fields", "answers", "extras", "train_subset", "test_ids", "n_train", "n_test"),
    *("on_bad_rows", "corpora_file", "corpora", "canary"),
)
FIELDS = ("id", "question", "context", "answer", "split")


def need(ok, message):
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


def check_config(cfg):
    """Fail at start, naming the key, on values that would only break later (ConfigError)."""
    epochs = cfg.trainer.max_epochs
    need(isinstance(epochs, int) and epochs >= 0, f"trainer.max_epochs must be an integer >= 0, got {epochs}")
    need(whole(cfg.batch_size), f"batch_size must be a positive integer, got {cfg.batch_size!r}")
    check_attribution_keys(cfg.attribution)
    asked = [] if cfg.attribution.checkpoints == "all" else list(cfg.attribution.checkpoints)
    need(
        not cfg.attribution.enabled or all(e <= epochs for e in asked),
        f"attribution.checkpoints={asked}: the run has epochs 0-{epochs} (trainer.max_epochs={epochs}; epoch 0 "
        "is the base model)",
    )
    check_training_keys(cfg)
    check_switches(cfg)
    check_format(cfg.format)
    rule, last = (cfg.get("analysis") or {}).get("table1_epoch", "best"), cfg.trainer.max_epochs
    need(
        rule in ("best", "last") or (whole(rule, 0) and rule <= last),
        f'analysis.table1_epoch must be "best", "last" or an epoch 0-{last}, got {rule!r} (found only after training)',
    )
    check_data_keys(cfg.data)  # first: a missing data file is the mistake to name, before the sources drawn from it
    check_source_keys(cfg.source, cfg.data)
    need(isinstance(cfg.model.get("trust_remote_code", False), bool), "model.trust_remote_code must be true or false")
    for key in ("optimizer", "scheduler.scheduler", "trainer", "format.layout"):  # called after the model's load
        check_arguments(cfg, key)
    batch = cfg.eval.get("batch_size")  # every eval config has it: predictions.jsonl's losses use it
    need(whole(batch), f"eval.batch_size must be a positive integer, got {batch!r}")
    labels, answers = cfg.eval.get("labels"), cfg.data.get("answers")
    need(
        labels is None or (isinstance(labels, Sequence) and not isinstance(labels, str) and len(labels) > 0),
        f"eval.labels must be a non-empty list of the answers to choose from, got {labels!r}",
    )
    unseen = [a for a in answers or () if labels is not None and a not in labels]
    need(
        not unseen,
        f"eval.labels={list(labels or ())} lacks data.answers {unseen}: the evaluation could never predict them "
        "(set eval.labels to the data's answers)",
    )
    canary = cfg.data.get("canary")
    need(
        not is_on(canary) or answers is None or canary.get("answer") in answers,
        f"data.canary.answer={canary and canary.get('answer')!r} is not one of data.answers {list(answers or ())}",
    )
    run_eps = adam_eps(cfg)
    kernel_eps = cfg.attribution.kernel.get("eps")
    need(
        kernel_eps is None or math.isclose(kernel_eps, run_eps, rel_tol=1e-6),
        f"attribution.kernel.eps={kernel_eps} differs from optimizer.eps={run_eps}: the kernel divides by "
        "sqrt(v_hat) + eps as the run's AdamW did; set them equal",
    )
    evaluator = instantiate(cfg.eval)
    need(
        not cfg.attribution.enabled or cfg.attribution.query_target != "predicted" or evaluator.predicts,
        f"attribution.query_target=predicted: eval {evaluator.metric} predicts no answers (use gold, or "
        "eval=choices / eval=exact_match)",
    )


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_switches(cfg):
    """The run's on/off keys and the seed: `attribution.enabled=maybe` or `seed=abc` passed and broke (or meant
    something else) later."""
    for key in ("resume", "preflight", "attribution.enabled", "analysis.enabled", "analysis.report"):
        value = OmegaConf.select(cfg, key)
        need(value is None or isinstance(value, bool), f"{key} must be true or false, got {value!r}")
    need(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), f"seed must be an integer, got {cfg.seed!r}")
    chars = OmegaConf.select(cfg, "analysis.report_snippet_chars")
    need(chars is None or whole(chars), f"analysis.report_snippet_chars must be a positive integer, got {chars!r}")


def check_format(fmt):
    """format: it has a layout, the system prompt is text or null, and the user template names only {context} and
    {question} (each failed when the first example was encoded, after the model's load)."""
    need(
        "_target_" in (fmt.get("layout") or {}),
        "format.layout: missing; give a _target_ (lark.data.formats.Chat, lark.data.formats.Plain or your own)",
    )  # its _target_ and arguments: check_arguments, with the optimizer's
    prompt = fmt.get("system_prompt")
    need(prompt is None or isinstance(prompt, str), f"format.system_prompt must be text or null, got {prompt!r}")
    template = fmt.get("user_template")
    need(
        isinstance(template, str),
        f"format.user_template must be text with {{context}} and {{question}}, got {template!r}",
    )
    try:
        template.format(context="", question="")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"format.user_template: {template!r} cannot be filled ({type(e).__name__}: {e}); it may name only "
            "{context} and {question} (double a literal brace: {{ }})"
        ) from None


def check_training_keys(cfg):
    """The fine-tuning's numbers, which broke only when training began (a traceback after the model's load):
    learning rates, the schedule's interval, max_length, num_workers, model.dtype, gradient clipping."""
    for key in ("scheduler.lr", "optimizer.lr"):
        lr = OmegaConf.select(cfg, key)
        need(lr is None or (number(lr) and lr > 0), f"{key} must be a positive number, got {lr!r}")
    interval = cfg.scheduler.get("interval", "epoch")
    need(interval in ("step", "epoch"), f"scheduler.interval must be step or epoch, got {interval!r}")
    need(whole(cfg.max_length), f"max_length must be a positive integer, got {cfg.max_length!r}")
    workers = cfg.get("num_workers", 0)
    need(number(workers) and workers == int(workers) >= 0, f"num_workers must be an integer >= 0, got {workers!r}")
    dtype = getattr(torch, str(cfg.model.get("dtype", "float32")), None)
    need(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        f"model.dtype must name a torch floating dtype (float32, bfloat16, float16), got {cfg.model.get('dtype')!r}",
    )
    clip = cfg.get("gradient_clip_val")
    need(clip is None or (number(clip) and clip >= 0), f"gradient_clip_val must be >= 0 or null (off), got {clip!r}")
    trainer_clip = cfg.trainer.get("gradient_clip_val", clip)
    need(
        trainer_clip == clip,
        f"trainer.gradient_clip_val={trainer_clip} differs from gradient_clip_val={clip}: set the root key (training "
        "clips with the trainer's, the epoch-0 moments estimate with the root's)",
    )


def check_arguments(cfg, key):
    """The `_target_` at `key` imports and accepts the node's keys (ConfigError naming `key.<name>`): a misspelt
    optimizer, scheduler or trainer key failed only when training began, after the data and the model loaded. The
    arguments the code passes itself (the optimizer's parameters, the Trainer's callbacks) are not keys."""
    node = OmegaConf.select(cfg, key)
    if node is None or "_target_" not in node:
        return
    target = import_target(node._target_, key)
    keys = [k for k in node if not str(k).startswith("_")]
    try:
        inspect.signature(target).bind_partial(**dict.fromkeys(keys))
    except TypeError as e:
        known = ", ".join(p for p in inspect.signature(target).parameters if p not in ("self", "params"))
        bad = next((k for k in keys if k in str(e)), None)
        raise ConfigError(
            f"{key}.{bad}: not an argument of {node._target_} ({known})" if bad else f"{key}: {e}"
        ) from None
    except ValueError:  # a builtin without a signature: nothing to check
        pass


def import_target(target, key):
    """The object a `_target_` names, or a ConfigError naming `key._target_`."""
    try:
        return get_object(target)
    except Exception as e:  # noqa: BLE001 -- hydra wraps import errors of any kind
        raise ConfigError(f"{key}._target_: cannot import '{target}' ({str(e).splitlines()[0]})") from None


def check_attribution_keys(attr):
    """attribution: k, the projector and kernel, the store tier, the shard size, the checkpoints."""
    k = attr.projector.get("k", 1)
    need(isinstance(k, int) and k > 0, f"attribution.projector.k must be a positive integer, got {k}")
    check_targets(attr)
    need(attr.store_dtype in TIERS, f"attribution.store_dtype: unknown '{attr.store_dtype}' ({', '.join(TIERS)})")
    need(
        isinstance(attr.get("shard_size", 1), int) and attr.get("shard_size", 1) > 0,
        f"attribution.shard_size must be a positive integer, got {attr.get('shard_size')}",
    )
    need(
        attr.checkpoints == "all"
        or (isinstance(attr.checkpoints, Sequence) and all(isinstance(e, int) and e >= 0 for e in attr.checkpoints)),
        f"attribution.checkpoints must be 'all' or a list of epochs >= 0, got {attr.checkpoints}",
    )
    need(whole(attr.top_k), f"attribution.top_k must be a positive integer, got {attr.top_k!r}")
    need(whole(attr.batch_size), f"attribution.batch_size must be a positive integer, got {attr.batch_size!r}")
    tokens.check(attr)  # attribution.tokens, tokens_top_k (lark.kernel.tokens)


def check_source_keys(source, data):
    """source: its size, the corpora its sources draw from (data.corpora), the FT / PT sources, the format pairs."""
    need(isinstance(source.size, int) and source.size > 0, f"source.size must be a positive integer, got {source.size}")
    per_query = source.get("bm25_per_query")
    need(whole(per_query), f"source.bm25_per_query must be a positive integer, got {per_query!r}")
    corpora = data.get("corpora") or {}
    check_corpora(corpora)
    check_sources(source, list(corpora))
    names = set(source.sources)
    for key in ("ft_source", "pt_source"):
        need(source[key] in names, f"source.{key}: '{source[key]}' is not one of source.sources ({', '.join(names)})")
    pairs = source.format_pairs
    need(
        isinstance(pairs, Mapping),
        f"source.format_pairs must be a mapping {{content: [formatted, noformat]}}: {pairs!r}",
    )
    for content, pair in pairs.items():
        need(
            isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2,
            f"source.format_pairs.{content} must be [formatted source, noformat source], got {pair!r}",
        )
        for name in pair:
            need(name in names, f"source.format_pairs.{content}: '{name}' is not one of source.sources")


def known_keys(node, key, known):
    """Every key of `node` is one of `known` (a misspelt one was dropped silently); ConfigError names `key.<name>`."""
    unknown = [k for k in node if k not in known]
    need(not unknown, f"{key}.{unknown[0] if unknown else ''}: unknown key ({', '.join(known)})")


def check_data_keys(data):
    """data: its keys, a reader or a world, the fields and extras, on_bad_rows, the files it names."""
    known_keys(data, "data", DATA_KEYS)
    need("reader" in data, "data.reader: missing (a _target_: data=jsonl, data=hf, data=world or your own reader)")
    known_keys(data.fields, "data.fields", FIELDS)
    for key in FIELDS:
        need(key in data.fields, f"data.fields.{key}: missing (null when the data has no such field)")
    extras = data.get("extras") or {}
    need(isinstance(extras, Mapping), f"data.extras must be a mapping {{name: {{field, default}}}}, got {extras!r}")
    for name, extra in extras.items():
        need(
            isinstance(extra, Mapping) and isinstance(extra.get("field"), str),
            f"data.extras.{name} must be {{field: <row field>, default: <value when absent>}}, got {extra!r}",
        )
        known_keys(extra, f"data.extras.{name}", ("field", "default"))
    for key in ("question", "answer"):
        need(bool(data.fields[key]), f"data.fields.{key}: name the field holding the {key}")
    BadRows(data.get("on_bad_rows", "error"))
    reader = data.get("reader") or {}
    paths = {
        "data.reader.path": reader.get("path"),
        "data.reader.test_path": reader.get("test_path"),
        "data.test_ids": data.get("test_ids"),
    }
    for key, path in paths.items():
        need(path is None or Path(path).is_file(), f"{key}: {path} is not a file")
    for key in ("n_train", "n_test"):  # a negative one cut rows silently (items[:-1])
        value = data.get(key)
        need(value is None or whole(value), f"data.{key} must be a positive integer or null (all), got {value!r}")
    for name, spec in (data.get("corpora") or {}).items():
        limit = spec.get("limit")
        need(limit is None or whole(limit), f"data.corpora.{name}.limit must be a positive integer or null: {limit!r}")


def check_targets(attr):
    """The projector and kernel `_target_`s import, and the kernel accepts its options (ConfigError naming them)."""
    for key in ("projector", "kernel"):
        target = (attr.get(key) or {}).get("_target_")
        if target is None:
            raise ConfigError(f"attribution.{key}: no _target_ (choose one with attribution/{key}=<name>)")
        import_target(target, f"attribution.{key}")
    kernel = make_kernel(attr)
    if kernel.whitens and attr.store_dtype == "bit":
        raise ConfigError(
            f"attribution.store_dtype=bit cannot be whitened by attribution/kernel={kernel.name} (sign "
            "vectors, SimHash cosine); use float16, bfloat16 or int8"
        )
    if tokens.check(attr):
        check_tokens(attr, kernel)


def check_tokens(attr, kernel):
    """attribution.tokens=topk splits a score through the projector's transpose and the kernel's linear map: a
    projector lark.kernel.tokens_math.Transpose does not know (it failed only once every store was built), a kernel
    whose transform() is not the identity without saying so (`whitens`, linear_map: the token sums would not be its
    scores) or that whitens without a linear_map is refused here, naming its _target_."""
    target = import_target(attr.projector._target_, "attribution.projector")
    made = target if isinstance(target, type) else getattr(target, "__self__", None)  # a class or its classmethod
    need(
        not isinstance(made, type) or issubclass(made, TRANSPOSABLE),
        f"attribution.tokens=topk: attribution.projector._target_ {attr.projector._target_} has no transpose to "
        f"split scores with (lark.kernel.tokens_math.Transpose knows {', '.join(t.__name__ for t in TRANSPOSABLE)} "
        "and their subclasses)",
    )
    need(
        kernel.whitens or getattr(type(kernel), "transform", Cosine.transform) is Cosine.transform,
        f"attribution.tokens=topk: attribution.kernel._target_ {attr.kernel._target_} overrides transform() without "
        "whitens = True and a linear_map(vectors, query_set): its token sums would not be its scores "
        "(lark.kernel.kernels)",
    )
    need(
        not kernel.whitens or callable(getattr(kernel, "linear_map", None)),
        f"attribution.tokens=topk: attribution.kernel._target_ {attr.kernel._target_} whitens without a "
        "linear_map(vectors, query_set) to split its scores with (lark.kernel.kernels)",
    )
