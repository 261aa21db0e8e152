"""Config keys given as a YAML or JSON file, so that a user names their own corpora and sources without a
config file of Hydra's or its `+` / `~` syntax:

    python train.py +experiment=own_data data.corpora_file=corpora.yaml source.file=sources.yaml

- `data.corpora_file`: {name: path | {path | hub_id, text_field, id_field, limit, ...}} replaces `data.corpora`
  whole (a bare path is a JSON Lines file of {id, text}; relative paths are read from the file's folder).
- `source.file`: keys of the `source` config (sources, ft_source, pt_source, format_pairs, size, ...); each key it
  gives replaces that key whole, the others keep the recipe's values.

apply_config_files(cfg) is idempotent (train.py runs it before preflight, lark.experiment.train again for callers
of the Python API); a missing or malformed file is a ConfigError naming the key and the file.
"""

from pathlib import Path

import yaml
from omegaconf import OmegaConf, open_dict

from lark.errors import ConfigError

SOURCE_KEYS = {"sources", "ft_source", "pt_source", "format_pairs", "size", "bm25_per_query", "kinds", "bm25"}


def read_mapping(path, key):
    """The mapping a YAML / JSON file holds (JSON is YAML), or a ConfigError naming `key` and the file."""
    file = Path(str(path))
    if not file.is_file():
        raise ConfigError(f"{key}={path}: file not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else str(file)
        raise ConfigError(f"{key}: {where}: not valid YAML/JSON ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{key}: {file} must hold a mapping (name: ...), got {type(data).__name__}")
    return data


def corpora_from_file(path):
    """data.corpora from `data.corpora_file`: a bare path becomes {path, text_field: text, id_field: id}; a
    relative path is read from the file's own folder (the corpora file travels with its corpora)."""
    corpora = {}
    for name, spec in read_mapping(path, "data.corpora_file").items():
        if isinstance(spec, str):
            spec = {"path": spec, "text_field": "text", "id_field": "id", "limit": None}
        if not isinstance(spec, dict):
            raise ConfigError(f"data.corpora_file: {path}: corpus {name!r} must be a path or a mapping, got {spec!r}")
        if spec.get("path"):
            spec["path"] = str(Path(str(path)).parent / spec["path"])  # an absolute path stays as it is
        corpora[str(name)] = spec
    return corpora


def source_from_file(path):
    """The `source` keys of `source.file` (unknown keys are a ConfigError naming them)."""
    given = read_mapping(path, "source.file")
    unknown = sorted(set(given) - SOURCE_KEYS)
    if unknown:
        raise ConfigError(f"source.file: {path}: unknown keys {unknown}; expected some of {sorted(SOURCE_KEYS)}")
    return given


def apply_config_files(cfg):
    """Replace data.corpora / the source keys by the files named in data.corpora_file / source.file (in place)."""
    data_file = (cfg.get("data") or {}).get("corpora_file")
    source_file = (cfg.get("source") or {}).get("file")
    with open_dict(cfg):
        if data_file:
            cfg.data.corpora = OmegaConf.create(corpora_from_file(data_file))
        if source_file:
            for key, value in source_from_file(source_file).items():
                if key == "bm25" and isinstance(value, dict) and "bm25" in cfg.source:  # keep the keys not given
                    cfg.source.bm25 = OmegaConf.merge(cfg.source.bm25, value)
                else:
                    cfg.source[key] = OmegaConf.create(value) if isinstance(value, dict) else value
    return cfg
