"""Run configs saved by earlier LARK versions, in today's form, so that such runs resume (train.py resume=true)
and re-attribute (attribute.py, validate.py) with what they meant.

`upgrade` maps the keys a version removed to the keys that replaced them; a config in today's form passes
through unchanged:
- attribution.projector.{kind, normalize} -> attribution/projector and attribution/kernel (lark.kernel.factory.upgrade);
- model.kind (tiny | hub | gguf) -> model.load (a _target_: lark.pretrain.tiny_model, lark.models.hub_model,
  lark.models.load_gguf);
- data.kind (world | local | hub) with data.path / data.hub_* and data.corpus.<name>.kind -> today's config of
  the same name (conf/data/<data.name>.yaml: data.reader, data.fields, data.corpora), the run's values kept;
- source kinds `medical` / `entertainment` -> {kind: retrieve, corpus: medical} / {kind: sample, corpus:
  entertainment} (what they did), and source.kinds from conf/source/kinds/default.yaml;
- format.kind (chat | plain) -> format.layout (lark.data.formats.Chat | lark.data.formats.Plain); the QA items' old
  `final_decision` field in format.answer_template -> `answer` (data.fields maps it there today).
- a `_target_` of a module that moved when lark/ became wings (lark.fingerprints.MOVED) -> its place today.
`fill` adds the keys an old config lacks (added to LARK since the run started) with today's values.
"""

import importlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lark.data.io import read_yaml
from lark.errors import RunDirError
from lark.fingerprints import MOVED, renamed
from lark.kernel.factory import upgrade as upgrade_attribution

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA_KINDS = ("world", "local", "hub")
WORLD_READER = "lark.data.world.GeneratedWorld"
SOURCE_KINDS = {"medical": ("retrieve", "medical"), "entertainment": ("sample", "entertainment")}
MODEL_LOADERS = {"tiny": "lark.pretrain.tiny_model", "hub": "lark.models.hub_model", "gguf": "lark.models.load_gguf"}
LAYOUTS = {"chat": "lark.data.formats.Chat", "plain": "lark.data.formats.Plain"}
ATOMIC = ("source.sources", "source.format_pairs", "data.corpora", "data.fields", "data.extras")  # never merged


def compose_train(overrides=(), **kw):
    """conf/train.yaml composed by Hydra with `overrides` (inside a @hydra.main app, or on its own)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    try:
        if GlobalHydra.instance().is_initialized():  # attribute.py, validate.py
            return compose("train", overrides=list(overrides), **kw)
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("train", overrides=list(overrides), **kw)
    except MissingConfigException as e:
        raise RunDirError(
            f"the run's saved config names a config this LARK no longer has ({e}): start a new run"
        ) from None


def upgrade_data(old):
    if "kind" not in old:
        return old
    o = OmegaConf.to_container(old, resolve=False)  # interpolations such as ${paths.shared_dir} kept
    if o["kind"] not in DATA_KINDS:
        raise RunDirError(f"data.kind: unknown '{o['kind']}' in the run's saved config ({', '.join(DATA_KINDS)})")
    new = OmegaConf.to_container(compose_train([f"data={o['name']}"]).data, resolve=False)
    new.update({key: o[key] for key in ("n_train", "n_test", "on_bad_rows", "world") if key in o})
    if o.get("test_ids"):
        new["test_ids"] = o["test_ids"]
    if o["kind"] == "local":
        new["reader"]["path"] = o["path"]
    if o["kind"] == "hub":
        new["reader"].update(hub_id=o["hub_id"], hub_config=o.get("hub_config"), split=o.get("hub_split", "train"))
    if o["kind"] != "world":  # `kind` went (path or hub_id says it); exclude_medical: false is today's absence
        new["corpora"] = {
            name: {k: v for k, v in corpus.items() if k != "kind" and (k, v) != ("exclude_medical", False)}
            for name, corpus in (o.get("corpus") or {}).items()
        }
    return OmegaConf.create(new)


def upgrade_world(data):
    """data.world saved before the world was a reader (generate_world's arguments only) -> the GeneratedWorld
    reader with those arguments, which data.reader names."""
    if "world" not in data or "_target_" in data.world:
        return data
    with open_dict(data):
        data.world = {"_target_": WORLD_READER, **OmegaConf.to_container(data.world, resolve=False)}
        data.reader = "${data.world}"
    return data


def upgrade_model(old):
    with open_dict(old):
        if "kind" in old:
            if old.kind not in MODEL_LOADERS:
                raise RunDirError(
                    f"model.kind: unknown '{old.kind}' in the run's saved config ({', '.join(MODEL_LOADERS)})"
                )
            old.load = {"_target_": MODEL_LOADERS[old.pop("kind")], "_partial_": True}
    return old


def upgrade_source(old):
    with open_dict(old):
        for spec in old.sources.values():
            if spec.kind in SOURCE_KINDS:
                spec.kind, spec.corpus = SOURCE_KINDS[spec.kind]
        if "kinds" not in old:
            old.kinds = compose_train().source.kinds
    return old


def upgrade_format(old):
    with open_dict(old):
        if "kind" in old:
            if old.kind not in LAYOUTS:
                raise RunDirError(f"format.kind: unknown '{old.kind}' in the run's saved config (chat or plain)")
            old.layout = {"_target_": LAYOUTS[old.pop("kind")]}
        if "answer_template" in old:
            old.answer_template = old.answer_template.replace("{final_decision}", "{answer}")
    return old


def resolves(target):
    """Whether a dotted name imports today (a module, then attributes: `Cls.of_model`)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def today_target(target):
    """A `_target_` as today's LARK names it: a moved one renamed (MOVED), unless it imports as it is (lark.validation
    was a module and is a package now: lark.validation.canary is today's name, not a moved one)."""
    new = renamed(target, MOVED)
    return target if new == target or resolves(target) else new


def upgrade_targets(obj):
    """obj (a container) with every lark `_target_` as today's LARK names it."""
    if isinstance(obj, dict):
        return {
            k: today_target(v)
            if k == "_target_" and isinstance(v, str) and v.startswith("lark.")
            else upgrade_targets(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [upgrade_targets(v) for v in obj]
    return obj


DDP_STRATEGY = {  # conf/trainer/ddp.yaml's strategy: what "ddp" meant (Lightning's 30-minute collective timeout)
    "_target_": "lightning.pytorch.strategies.DDPStrategy",
    "timeout": {"_target_": "datetime.timedelta", "minutes": 30},
}


def upgrade(cfg):
    """A saved run config (DictConfig) in today's form (a new object; the argument is not changed)."""
    cfg = OmegaConf.create(upgrade_targets(OmegaConf.to_container(cfg, resolve=False)))
    with open_dict(cfg):
        if "attribution" in cfg:
            cfg.attribution = upgrade_attribution(cfg.attribution)
        if "model" in cfg:
            cfg.model = upgrade_model(cfg.model)
        if "data" in cfg:
            cfg.data = upgrade_world(upgrade_data(cfg.data))
        if "source" in cfg:
            cfg.source = upgrade_source(cfg.source)
        if "format" in cfg:
            cfg.format = upgrade_format(cfg.format)
        if cfg.get("trainer") and cfg.trainer.get("strategy") == "ddp":  # a string before its timeout was a key
            cfg.trainer.strategy = DDP_STRATEGY
    return cfg


def fill(cfg, today):
    """cfg with the keys only `today` has (added to LARK since the run started), recursively; the collections in
    ATOMIC (sources, corpora, field maps) and nodes of another _target_ are the run's own, never merged."""

    def merge(old, new, prefix):
        for key, value in new.items():
            path = f"{prefix}{key}"
            if key not in old:
                old[key] = value
            elif (
                isinstance(value, dict)
                and isinstance(old[key], dict)
                and path not in ATOMIC
                and value.get("_target_") == old[key].get("_target_")
            ):  # another _target_: the run's own
                merge(old[key], value, f"{path}.")
        return old

    return OmegaConf.create(
        merge(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(today, resolve=False), "")
    )


def today_config(run_dir):
    """conf/train.yaml composed today with the config groups a run was started with (.hydra/hydra.yaml's
    runtime choices, groups this LARK no longer has left out); None for a run without that file."""
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    choices = OmegaConf.to_container(read_yaml(path, OmegaConf.load).hydra.runtime.choices)
    tree = compose_train(return_hydra_config=True).hydra.runtime.choices  # the groups of the default tree
    return compose_train(
        [
            f"{'' if group in tree else '+'}{group}={choice}"
            for group, choice in choices.items()
            if not group.startswith("hydra") and choice and (CONF / group / f"{choice}.yaml").is_file()
        ]
    )


def read_saved(path):
    """A saved run config (.hydra/config.yaml, lark_config.yaml) as OmegaConf; an empty or torn one is a RunDirError
    (read as {}, every key took today's value without a word)."""
    cfg = read_yaml(path, OmegaConf.load)
    if not isinstance(cfg, DictConfig) or not len(cfg):
        raise RunDirError(f"{path}: holds no config (empty or cut short); restore the file from a copy of the run")
    return cfg


def load(run_dir):
    """A run's saved config (.hydra/config.yaml) in today's form, today's values for the keys it lacks."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path}: not found; run_dir must be a run directory written by train.py")
    cfg = upgrade(read_saved(path))
    today = today_config(run_dir)
    return cfg if today is None else fill(cfg, today)
