"""lark.legacy: the configs that runs of earlier LARK versions saved (tests/fixtures/legacy: the embedded run and the
pubmedqa_small run committed under docs/results before the config groups, as they were saved) mean
today's recipes, key for key, so that those runs resume and re-attribute (the end-to-end case, a run saved in the
old form re-attributed to the same scores, is in test_kernels.py)."""
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose
from lark import legacy
from lark.errors import RunDirError
from lark.resume import IGNORED, flat


def differences(old, new):
    """Keys of the upgraded old config whose value today's composed config does not have."""
    o = flat(OmegaConf.to_container(legacy.upgrade(old)))
    n = flat(OmegaConf.to_container(new))
    return {k: (o[k], n.get(k)) for k in o if o[k] != n.get(k) and not k.startswith(IGNORED)
            and k != "attribution.projector.plan_tokens"}     # 256 saved resolved, ${max_length} today


@pytest.mark.parametrize("saved, overrides", [
    ("tests/fixtures/legacy/embedded.yaml", []),
    # the committed pubmedqa_small run predates the faithful kernel: the unnormalised cosine
    ("tests/fixtures/legacy/pubmedqa_small.yaml", ["+experiment=pubmedqa_small", "attribution/kernel=cosine"]),
])
def test_committed_old_runs_mean_todays_recipes(saved, overrides):
    old = OmegaConf.load(ROOT / saved)
    assert "kind" in old.data and "kind" in old.format and "kind" in old.model     # saved in the old form
    assert differences(old, compose(overrides)) == {}


def test_each_old_key_maps_to_what_it_did():
    old = OmegaConf.load(ROOT / "tests/fixtures/legacy/pubmedqa_small.yaml")
    new = legacy.upgrade(old)
    assert new.data.reader == {"_target_": "lark.data.JsonlRows", "test_path": None,
                               "path": "${paths.shared_dir}/data/pubmedqa/pqa_labeled.jsonl"}    # not resolved
    assert new.data.fields.answer == "final_decision" and "exclude_medical" not in new.data.corpora.entertainment
    assert dict(new.source.sources.medical_format) == {"kind": "retrieve", "corpus": "medical", "formatted": True}
    assert dict(new.source.sources.entertainment_noformat) == {"kind": "sample", "corpus": "entertainment",
                                                                "formatted": False}
    assert new.format.layout == {"_target_": "lark.formats.Chat"} and new.format.answer_template == "{answer}"
    assert new.model.load._target_ == "lark.models.load_gguf" and "kind" not in new.model
    assert new.attribution.kernel._target_ == "lark.kernels.Cosine"
    assert legacy.upgrade(new) == new and old.data.kind == "local"     # today's form passes; the input is kept


def test_an_unknown_old_kind_names_the_key():
    old = OmegaConf.load(ROOT / "tests/fixtures/legacy/embedded.yaml")
    old.data.kind = "sql"
    with pytest.raises(RunDirError, match="data.kind: unknown 'sql'"):
        legacy.upgrade(old)


def test_fill_adds_todays_keys_but_keeps_the_runs_collections_and_targets():
    old = OmegaConf.create({"source": {"sources": {"mine": {"kind": "sample", "corpus": "c"}}},
                            "attribution": {"kernel": {"_target_": "lark.kernels.Cosine"}}})
    today = compose([])
    filled = legacy.fill(old, today)
    assert list(filled.source.sources) == ["mine"] and filled.source.size == today.source.size
    assert filled.attribution.kernel == {"_target_": "lark.kernels.Cosine"} and "eval" in filled
