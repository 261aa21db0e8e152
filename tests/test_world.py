"""The generated world: determinism, counts, proportions, provenance, learnability, files, argument checks."""

import hashlib
import json
import re
import time
from collections import Counter

import pytest

from lark.data.world import World, generate_world, load_world, save_world
from lark.data.world_text import drug_names, medical_names

FILES = [
    "entertainment.jsonl",
    "facts.jsonl",
    "medical.jsonl",
    "provenance.json",
    "test.jsonl",
    "train.jsonl",
    "world.json",
]
CUES = {
    "yes": ("significantly", "markedly", "substantially"),
    "no": ("did not differ", "no measurable difference", "was unchanged"),
    "maybe": ("inconsistent", "inconclusive", "mixed"),
}
LARGE = dict(n_train=1000, n_test=500, n_facts=500, n_medical_docs=1500, n_entertainment_docs=10)


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=0)


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cue_answer(contexts):
    """The simple rule a tiny model can learn: the one label whose cue phrase the contexts contain."""
    text = " ".join(contexts).lower()
    found = [label for label, cues in CUES.items() if any(c in text for c in cues)]
    return found[0] if len(found) == 1 else None


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    save_world(generate_world(seed=7), tmp_path / "a")
    save_world(generate_world(seed=7), tmp_path / "b")
    save_world(generate_world(seed=8), tmp_path / "c")
    a, b, c = (folder_bytes(tmp_path / x) for x in "abc")
    assert sorted(a) == FILES
    assert a == b
    for name in ["train.jsonl", "test.jsonl", "medical.jsonl", "entertainment.jsonl", "facts.jsonl"]:
        assert a[name] != c[name]


# sha256 (first 16 hex digits) of the default world's files as LARK 0.2 wrote them: the world is every embedded run's
# data, so a change of a word list, a template or the order of the random draws must be a deliberate one.
DEFAULT_WORLD_SHA256 = {
    "entertainment.jsonl": "bcdb7fc4e7c035af",
    "facts.jsonl": "bebf650586dd0d11",
    "medical.jsonl": "51e0088633a114ec",
    "provenance.json": "1afb3eb6991a9c02",
    "test.jsonl": "3c4b834a1fe2af87",
    "train.jsonl": "ee490e976fcf8cf0",
    "world.json": "88723c7216773b56",
}


def test_the_default_world_is_byte_for_byte_the_one_runs_were_made_with(tmp_path):
    save_world(generate_world(), tmp_path)
    digests = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in folder_bytes(tmp_path).items()}
    assert digests == DEFAULT_WORLD_SHA256


def test_default_counts_and_ids(world):
    assert (len(world.train), len(world.test), len(world.facts)) == (200, 100, 120)
    assert (len(world.medical_docs), len(world.entertainment_docs)) == (600, 600)
    assert [x["id"] for x in world.train] == [f"train-{i:05d}" for i in range(200)]
    assert [x["id"] for x in world.test] == [f"test-{i:05d}" for i in range(100)]
    assert [d["id"] for d in world.medical_docs] == [f"med-{i:05d}" for i in range(600)]
    assert [d["id"] for d in world.entertainment_docs] == [f"ent-{i:05d}" for i in range(600)]
    assert list(world.provenance) == [x["id"] for x in world.test]
    assert len({x["fact_id"] for x in world.test}) == 100  # one fact per test item
    for item in world.train + world.test:
        assert list(item) == ["id", "question", "contexts", "labels", "long_answer", "final_decision", "fact_id"]
        assert 2 <= len(item["contexts"]) <= 4 and len(item["labels"]) == len(item["contexts"])
        assert item["labels"][-1] == "RESULTS" and set(item["labels"]) <= {
            "BACKGROUND",
            "OBJECTIVE",
            "METHODS",
            "RESULTS",
        }
        assert item["question"].endswith("?")


def test_each_fact_is_stated_by_docs_per_fact_abstracts_plus_distractors(world):
    per_fact = Counter(fid for d in world.medical_docs for fid in d["fact_ids"])
    assert per_fact == {f["id"]: 3 for f in world.facts}
    assert any(len(d["fact_ids"]) > 1 for d in world.medical_docs)  # joint abstracts exist
    assert sum(not d["fact_ids"] for d in world.medical_docs) >= 600 - 120 * 3  # distractors fill the rest
    assert {d["kind"] for d in world.medical_docs} == {"abstract"}
    assert {d["kind"] for d in world.entertainment_docs} == {"lyrics", "web"}


def test_documents_are_60_to_150_words(world):
    for d in world.medical_docs + world.entertainment_docs:
        assert 60 <= len(d["text"].split()) <= 150, d


def test_label_proportions_on_a_large_world():
    w = generate_world(seed=3, **LARGE)
    for items in (w.train, w.test):
        counts = Counter(x["final_decision"] for x in items)
        for label, p in zip(["yes", "no", "maybe"], [0.55, 0.34, 0.11]):
            assert abs(counts[label] / len(items) - p) < 0.01
    w = generate_world(seed=3, label_proportions=[0.2, 0.3, 0.5], **LARGE)
    counts = Counter(x["final_decision"] for x in w.test)
    assert (counts["yes"], counts["no"], counts["maybe"]) == (100, 150, 250)


def test_items_agree_with_their_fact(world):
    facts = {f["id"]: f for f in world.facts}
    effects = {"yes": "positive", "no": "null", "maybe": "mixed"}
    for item in world.train + world.test:
        fact = facts[item["fact_id"]]
        assert item["final_decision"] == fact["answer"] and effects[fact["answer"]] == fact["effect"]
        assert fact["intervention"] in item["question"] and fact["outcome"] in item["contexts"][-1].lower()


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_shared_fact_share_decides_which_test_facts_have_finetune_items(share):
    w = generate_world(seed=1, shared_fact_share=share)
    shared = [t for t, p in w.provenance.items() if p["finetune_items"]]
    assert len(shared) == round(share * 100)
    train_facts = {x["fact_id"] for x in w.train}
    for t in w.test:
        assert (t["fact_id"] in train_facts) == (t["id"] in shared)


def test_provenance_points_to_existing_ids_that_carry_the_fact(world):
    facts = {f["id"]: f for f in world.facts}
    docs = {d["id"]: d for d in world.medical_docs}
    train = {x["id"]: x for x in world.train}
    for test_id, p in world.provenance.items():
        fact = facts[p["fact_id"]]
        assert len(p["pretrain_docs"]) == 3
        for doc_id in p["pretrain_docs"]:
            assert p["fact_id"] in docs[doc_id]["fact_ids"]
            text = docs[doc_id]["text"].lower()
            assert fact["intervention"] in text and fact["outcome"] in text
        for item_id in p["finetune_items"]:
            assert train[item_id]["fact_id"] == p["fact_id"]
            assert fact["intervention"] in train[item_id]["question"]
        assert p["fact_id"] == next(t for t in world.test if t["id"] == test_id)["fact_id"]


def test_items_about_one_fact_are_paraphrased(world):
    by_fact = {}
    for item in world.train + world.test:
        by_fact.setdefault(item["fact_id"], []).append(item)
    repeated = [items for items in by_fact.values() if len(items) > 1]
    assert len(repeated) >= 40
    for items in repeated:
        questions = [x["question"] for x in items[:4]]
        assert len(set(questions)) == len(questions)  # the first four items of a fact use four question templates


def test_entertainment_has_no_medical_names_or_words(world):
    drugs = set(drug_names())
    phrases = [n.lower() for n in medical_names() if n not in drugs]
    medical_words = [
        "placebo",
        "patients",
        "trial",
        "randomly",
        "syndrome",
        "disease",
        "serum",
        "dose",
        "therapy",
        "significantly",
        "inconclusive",
        "weeks",
        "outcome",
    ]
    for d in world.entertainment_docs:
        text = d["text"].lower()
        words = set(re.findall(r"[a-z]+", text))
        assert not drugs & words and not words & set(medical_words), d
        assert not [p for p in phrases if p in text], d
    used = {f["intervention"] for f in world.facts}
    assert used <= drugs and all(any(name in d["text"].lower() for d in world.medical_docs) for name in used)


def test_answer_is_recoverable_from_contexts_by_cue_words():
    w = generate_world(seed=5, **LARGE)
    for item in w.train + w.test:
        assert cue_answer(item["contexts"]) == item["final_decision"], item
        assert cue_answer([item["question"]]) is None  # the question alone gives nothing away


def test_save_load_round_trip(world, tmp_path):
    save_world(world, tmp_path)
    assert load_world(tmp_path) == world
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["config"] == world.config
    assert meta["counts"] == {"train": 200, "test": 100, "medical_docs": 600, "entertainment_docs": 600, "facts": 120}
    lines = (tmp_path / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == world.test


def test_config_records_every_argument():
    sizes = dict(n_train=30, n_test=10, n_facts=20, n_medical_docs=80, n_entertainment_docs=5)
    w = generate_world(seed=4, **sizes, label_proportions=(0.5, 0.25, 0.25), facts_per_intervention=3)
    assert w.config == {
        "seed": 4,
        "n_train": 30,
        "n_test": 10,
        "n_facts": 20,
        "n_medical_docs": 80,
        "n_entertainment_docs": 5,
        "docs_per_fact": 3,
        "label_proportions": [0.5, 0.25, 0.25],
        "shared_fact_share": 0.5,
        "facts_per_intervention": 3,
        "joint_doc_share": 0.3,
    }
    assert json.loads(json.dumps(w.config)) == w.config
    assert isinstance(w, World) and (len(w.train), len(w.test), len(w.medical_docs)) == (30, 10, 80)


def test_default_world_is_fast():
    start = time.perf_counter()
    generate_world(seed=11)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_test=0), "n_test"),
        (dict(n_train=-1), "n_train"),
        (dict(n_facts=2.5), "n_facts"),
        (dict(docs_per_fact=0), "docs_per_fact"),
        (dict(label_proportions=(0.5, 0.3, 0.1)), "label_proportions"),
        (dict(label_proportions=(0.5, 0.6, -0.1)), "label_proportions"),
        (dict(label_proportions=(0.5, 0.5)), "label_proportions"),
        (dict(label_proportions=0.5), "label_proportions"),
        (dict(shared_fact_share=1.5), "shared_fact_share"),
        (dict(n_facts=50), "n_facts"),  # fewer facts than test items
        (dict(n_train=10), "shared_fact_share"),  # 50 shared test facts need 50 train items
        (dict(n_medical_docs=300), "n_medical_docs"),  # below 120 facts * 3 docs
        (dict(facts_per_intervention=4), "facts_per_intervention"),
        (dict(n_test=10, n_facts=10, shared_fact_share=0.0), "n_facts"),  # no fact left for train items
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_world(**kwargs)
