"""lark.legacy: the configs that runs of earlier LARK versions saved (tests/fixtures/legacy: the embedded run and the
pubmedqa_small run committed under docs/results before the config groups, as they were saved) mean
today's recipes, key for key, so that those runs resume and re-attribute (the end-to-end case, a run saved in the
old form re-attributed to the same scores, is in test_kernels.py)."""

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

from lark import legacy
from lark.errors import RunDirError
from lark.resume import IGNORED, flat


def differences(old, new):
    """Keys of the upgraded old config whose value today's composed config does not have."""
    o = flat(OmegaConf.to_container(legacy.upgrade(old)))
    n = flat(OmegaConf.to_container(new))
    return {
        k: (o[k], n.get(k))
        for k in o
        if o[k] != n.get(k) and not k.startswith(IGNORED) and k != "attribution.projector.plan_tokens"
    }  # 256 saved resolved, ${max_length} today


@pytest.mark.parametrize(
    "saved, overrides",
    [
        ("tests/fixtures/legacy/embedded.yaml", []),
        # the committed pubmedqa_small run predates the faithful kernel: the unnormalised cosine
        ("tests/fixtures/legacy/pubmedqa_small.yaml", ["+experiment=pubmedqa_small", "attribution/kernel=cosine"]),
    ],
)
def test_committed_old_runs_mean_todays_recipes(saved, overrides):
    old = OmegaConf.load(ROOT / saved)
    assert "kind" in old.data and "kind" in old.format and "kind" in old.model  # saved in the old form
    assert differences(old, compose(overrides)) == {}


def test_each_old_key_maps_to_what_it_did():
    old = OmegaConf.load(ROOT / "tests/fixtures/legacy/pubmedqa_small.yaml")
    new = legacy.upgrade(old)
    assert new.data.reader == {
        "_target_": "lark.data.readers.JsonlRows",
        "test_path": None,
        "path": "${paths.shared_dir}/data/pubmedqa/pqa_labeled.jsonl",
    }  # not resolved
    assert new.data.fields.answer == "final_decision" and "exclude_medical" not in new.data.corpora.entertainment
    assert dict(new.source.sources.medical_format) == {"kind": "retrieve", "corpus": "medical", "formatted": True}
    assert dict(new.source.sources.entertainment_noformat) == {
        "kind": "sample",
        "corpus": "entertainment",
        "formatted": False,
    }
    assert new.format.layout == {"_target_": "lark.data.formats.Chat"} and new.format.answer_template == "{answer}"
    assert new.model.load._target_ == "lark.models.load_gguf" and "kind" not in new.model
    assert new.attribution.kernel._target_ == "lark.kernel.kernels.Cosine"
    assert legacy.upgrade(new) == new and old.data.kind == "local"  # today's form passes; the input is kept


def test_an_unknown_old_kind_names_the_key():
    old = OmegaConf.load(ROOT / "tests/fixtures/legacy/embedded.yaml")
    old.data.kind = "sql"
    with pytest.raises(RunDirError, match="data.kind: unknown 'sql'"):
        legacy.upgrade(old)


def test_fill_adds_todays_keys_but_keeps_the_runs_collections_and_targets():
    old = OmegaConf.create(
        {
            "source": {"sources": {"mine": {"kind": "sample", "corpus": "c"}}},
            "attribution": {"kernel": {"_target_": "lark.kernel.kernels.Cosine"}},
        }
    )
    today = compose([])
    filled = legacy.fill(old, today)
    assert list(filled.source.sources) == ["mine"] and filled.source.size == today.source.size
    assert filled.attribution.kernel == {"_target_": "lark.kernel.kernels.Cosine"} and "eval" in filled


# Configs saved before lark/ became wings (0.2) name their classes by the flat module paths; the committed
# docs/results/embedded run is one (its sources, layout, projector and kernel targets).
FLAT_TARGETS = {
    "attribution.projector._target_": ("lark.sketch.HookSketch", "lark.kernel.sketch.HookSketch"),
    "attribution.kernel._target_": ("lark.kernels.RapidIn", "lark.kernel.kernels.RapidIn"),
    "format.layout._target_": ("lark.formats.Chat", "lark.data.formats.Chat"),
    "source.kinds.retrieve._target_": ("lark.sources.retrieve", "lark.data.sources.retrieve"),
    "data.reader._target_": ("lark.data.JsonlRows", "lark.data.readers.JsonlRows"),
}


def flat_form(cfg):
    """cfg with every target of FLAT_TARGETS under its pre-wings name, as such a run saved it."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    for key, (old, new) in FLAT_TARGETS.items():
        assert OmegaConf.select(cfg, key) == new, key  # today's name, which the old one must map to
        OmegaConf.update(cfg, key, old)
    return cfg


def test_targets_saved_before_the_wings_load_as_todays():
    today = compose(["data=jsonl", "data.reader.path=x.jsonl", "attribution/kernel=rapidin"])
    upgraded = legacy.upgrade(flat_form(today))
    for key, (_, new) in FLAT_TARGETS.items():
        assert OmegaConf.select(upgraded, key) == new
    assert differences(flat_form(today), today) == {}


def test_fingerprints_of_configs_do_not_depend_on_where_their_classes_moved():
    # a run, a cached base model or an LDS retrain hashed before the move must match after it
    from lark.fingerprints import content_hash

    today = compose(["data=jsonl", "data.reader.path=x.jsonl", "attribution/kernel=rapidin"])
    old = OmegaConf.to_container(flat_form(today))
    new = OmegaConf.to_container(today)
    assert old != new and content_hash(old) == content_hash(new)
    assert content_hash({"_target_": "lark.kernel.kernels.Cosine"}) != content_hash(
        {"_target_": "lark.kernel.kernels.Adam"}
    )


def test_a_target_that_imports_today_is_never_renamed():
    # lark.validation was a module and is a package now: its new modules must not be mistaken for moved names
    assert legacy.today_target("lark.validation.canary.plant") == "lark.validation.canary.plant"
    assert legacy.today_target("lark.validation.validate_run") == "lark.validation.table5.validate_run"
    assert legacy.today_target("my_package.MyKernel") == "my_package.MyKernel"


def test_a_ddp_run_saved_with_the_strategy_string_resumes(tmp_path):
    """trainer.strategy was the string "ddp" before its timeout became a key: resume=true refused such a run
    ("trainer.strategy was 'ddp', now None")."""
    from omegaconf import open_dict

    from lark.legacy import upgrade
    from lark.resume import check_same_run

    today = compose(["trainer=ddp"])
    with open_dict(today):
        today.paths.output_dir = str(tmp_path)
    old = OmegaConf.to_container(today, resolve=True)
    old["trainer"]["strategy"] = "ddp"
    assert OmegaConf.to_container(upgrade(OmegaConf.create(old)).trainer.strategy) == OmegaConf.to_container(
        today.trainer.strategy
    )
    (tmp_path / "lark_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    (tmp_path / "attribution" / "epoch_000").mkdir(parents=True)
    (tmp_path / "attribution" / "epoch_000" / "metrics.json").write_text("{}")
    check_same_run(today, tmp_path)  # no RunDirError


@pytest.mark.parametrize("text", ["", "# cut short\n"])
def test_an_empty_saved_config_is_refused_not_filled_with_todays_values(tmp_path, text):
    """A 0-byte .hydra/config.yaml (a torn write) read as {}: every key took today's value without a word."""
    from lark.errors import RunDirError
    from lark.legacy import load

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(text)
    with pytest.raises(RunDirError, match=r"config\.yaml: holds no config \(empty or cut short\)"):
        load(tmp_path)
