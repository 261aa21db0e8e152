"""The generated world: a small fictional biomedical world, made offline from a seed (LARK's default data).

A fact is (intervention, outcome, condition, population, effect). Its effect decides the answer to a
question about it: "positive" -> yes, "null" -> no, "mixed" -> maybe. Facts about one invented drug share
its condition and population and differ in outcome, so lexical look-ups see near-duplicates.

- medical_docs: trial abstracts, each stating one or more facts (`fact_ids`), plus distractor abstracts about
  other invented drugs (`fact_ids` empty). Each fact is stated by exactly `docs_per_fact` abstracts.
- entertainment_docs: song lyrics and web pages (music, film, sports, cooking, travel) with no medical words.
- train / test: PubMedQA-style items. The RESULTS context states the evidence with one cue phrase:
  yes: significantly | markedly | substantially;  no: did not differ | no measurable difference | was unchanged;
  maybe: inconsistent | inconclusive | mixed. No other sentence uses these phrases.
- provenance: for each test item, the abstracts and the fine-tuning items that carry its fact. A share
  `shared_fact_share` of test facts also has fine-tuning items (paraphrased); the rest are only in abstracts.

The same arguments give the same files byte for byte (one random.Random, no set or hash ordering).
"""

import json
import math
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lark.data import io, readers, records
from lark.data.world_text import (
    CONDITIONS,
    EFFECTS,
    LABELS,
    OUTCOMES,
    POPULATIONS,
    QUESTIONS,
    abstract,
    drug_names,
    lyrics,
    question_item,
    web_page,
)
from lark.errors import ConfigError


@dataclass
class World:
    train: list[dict]  # QA items
    test: list[dict]  # QA items
    medical_docs: list[dict]  # {id, text, kind: "abstract", fact_ids}
    entertainment_docs: list[dict]  # {id, text, kind: "lyrics" | "web"}
    provenance: dict[str, dict]  # test id -> {fact_id, pretrain_docs, finetune_items}
    config: dict  # generate_world arguments, seed included
    facts: list[dict] = field(default_factory=list)  # {id, intervention, outcome, condition, population,
    #                                                     effect: positive|null|mixed, answer: yes|no|maybe}


# ----------------------------------------------------------------------------- small helpers
def apportion(total, weights):
    """Split the integer total in proportion to weights (largest remainder); ties go to the earlier weight."""
    s = sum(weights)
    if total == 0 or s == 0:
        return [0] * len(weights)
    exact = [total * w / s for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def as_list(x):
    """A list of a sequence (list, tuple, OmegaConf ListConfig); anything else is returned unchanged."""
    return x if isinstance(x, (str, bytes, dict)) or not hasattr(x, "__iter__") else list(x)


# ----------------------------------------------------------------------------- facts and items
def plan_answers(rng, cfg):
    """The answer of every fact, and which facts the test and train items ask about.

    Returns (answers, test_facts, train_facts): answers[i] is fact i's label, test_facts lists one fact per
    test item, train_facts one fact per train item (a fact may repeat: paraphrased items).
    """
    p, n_test, n_train = cfg["label_proportions"], cfg["n_test"], cfg["n_train"]
    test_counts = apportion(n_test, p)
    shared_counts = apportion(round(cfg["shared_fact_share"] * n_test), test_counts)
    train_counts = apportion(n_train, p)
    missing = [max(0, t - s) for t, s in zip(train_counts, shared_counts)]
    extra_counts = apportion(n_train - sum(shared_counts), missing)  # train items beyond one per shared fact
    only_counts = apportion(min(cfg["n_facts"] - n_test, sum(extra_counts)), extra_counts)  # train-only facts
    answers, test_facts, train_facts = [], [], []
    for label, n_t, n_s, n_e, n_o in zip(LABELS, test_counts, shared_counts, extra_counts, only_counts):
        first = len(answers)
        answers += [label] * (n_t + n_o)
        test_facts += range(first, first + n_t)
        pool = list(range(first, first + n_s)) + list(range(first + n_t, first + n_t + n_o))
        if n_e and not pool:
            raise ValueError(
                f"n_facts={cfg['n_facts']} leaves no fact for train items answered '{label}'; "
                "increase n_facts or shared_fact_share"
            )
        rng.shuffle(pool)
        train_facts += pool + [pool[i % len(pool)] for i in range(n_e + n_s - len(pool))]
    answers += rng.choices(LABELS, weights=p, k=cfg["n_facts"] - len(answers))  # facts only in abstracts
    return answers, test_facts, train_facts


def make_facts(rng, answers, cfg):
    """Facts (in a shuffled order) grouped by drug: each group shares drug, condition and population."""
    order = rng.sample(range(len(answers)), len(answers))
    k = cfg["facts_per_intervention"]
    names = rng.sample(drug_names(), math.ceil(len(answers) / k))
    facts = [None] * len(answers)
    for g, name in enumerate(names):
        members = order[g * k : (g + 1) * k]
        condition, population = rng.choice(CONDITIONS), rng.choice(POPULATIONS)
        for i, (outcome, _) in zip(members, rng.sample(OUTCOMES, len(members))):
            facts[i] = {
                "id": None,
                "intervention": name,
                "outcome": outcome,
                "condition": condition,
                "population": population,
                "effect": EFFECTS[answers[i]],
                "answer": answers[i],
            }
    for n, i in enumerate(order):
        facts[i]["id"] = f"fact-{n:04d}"
    return facts, names


def make_medical_docs(rng, facts, used_names, cfg):
    """Exactly docs_per_fact abstracts per fact (some state all facts of a drug at once), then distractors."""
    k, groups = cfg["docs_per_fact"], {}
    for f in sorted(facts, key=lambda f: f["id"]):
        groups.setdefault(f["intervention"], []).append(f)
    docs = []
    for group in groups.values():
        n_joint = sum(rng.random() < cfg["joint_doc_share"] for _ in range(k)) if len(group) > 1 else 0
        for _ in range(n_joint):
            shuffled = rng.sample(group, len(group))
            docs.append({"text": abstract(rng, shuffled), "fact_ids": sorted(f["id"] for f in group)})
        for f in group:
            docs += [{"text": abstract(rng, [f]), "fact_ids": [f["id"]]} for _ in range(k - n_joint)]
    n_distractors = cfg["n_medical_docs"] - len(docs)
    used_names = set(used_names)
    free = [name for name in drug_names() if name not in used_names]
    others = [
        {
            "intervention": name,
            "outcome": rng.choice(OUTCOMES)[0],
            "condition": rng.choice(CONDITIONS),
            "population": rng.choice(POPULATIONS),
            "answer": rng.choices(LABELS, cfg["label_proportions"])[0],
        }
        for name in rng.sample(free, min(len(free), math.ceil(n_distractors / k)))
    ]
    docs += [{"text": abstract(rng, [others[i % len(others)]]), "fact_ids": []} for i in range(n_distractors)]
    rng.shuffle(docs)
    return [
        {"id": f"med-{i:05d}", "text": d["text"], "kind": "abstract", "fact_ids": d["fact_ids"]}
        for i, d in enumerate(docs)
    ]


def make_entertainment_docs(rng, n):
    """n song lyrics and web pages, each kind drawn with even odds."""
    docs = []
    for i in range(n):
        kind = rng.choice(["lyrics", "web"])
        docs.append({"id": f"ent-{i:05d}", "text": lyrics(rng) if kind == "lyrics" else web_page(rng), "kind": kind})
    return docs


def make_items(rng, facts, fact_indices, prefix, question_order, used):
    """QA items for the given facts (shuffled); each fact's items cycle through its question templates."""
    items = []
    for i in fact_indices:
        fid = facts[i]["id"]
        template = QUESTIONS[question_order[fid][used.get(fid, 0) % len(QUESTIONS)]]
        used[fid] = used.get(fid, 0) + 1
        items.append(question_item(rng, facts[i], template))
    rng.shuffle(items)
    for n, item in enumerate(items):
        item["id"] = f"{prefix}-{n:05d}"
    return items


# ----------------------------------------------------------------------------- the world
def check_config(cfg):
    """Raise ValueError naming the parameter if the arguments cannot make a world."""
    for name in (
        "seed",
        "n_train",
        "n_test",
        "n_facts",
        "n_medical_docs",
        "n_entertainment_docs",
        "docs_per_fact",
        "facts_per_intervention",
    ):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], int):
            raise ValueError(f"{name} must be an integer, got {cfg[name]!r}")
        if name != "seed" and cfg[name] <= 0:
            raise ValueError(f"{name} must be positive, got {cfg[name]}")
    p = cfg["label_proportions"]
    numbers = isinstance(p, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in p)
    if not numbers or len(p) != 3 or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
        raise ValueError(f"label_proportions must be 3 non-negative numbers (yes, no, maybe) summing to 1, got {p}")
    for name in ("shared_fact_share", "joint_doc_share"):
        if isinstance(cfg[name], bool) or not isinstance(cfg[name], (int, float)) or not 0 <= cfg[name] <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {cfg[name]}")
    if cfg["facts_per_intervention"] > 3:
        raise ValueError(f"facts_per_intervention must be 1, 2 or 3, got {cfg['facts_per_intervention']}")
    if cfg["n_facts"] < cfg["n_test"]:
        raise ValueError(f"n_facts={cfg['n_facts']} must be at least n_test={cfg['n_test']} (one fact per test item)")
    n_shared = round(cfg["shared_fact_share"] * cfg["n_test"])
    if n_shared > cfg["n_train"]:
        raise ValueError(
            f"shared_fact_share={cfg['shared_fact_share']} needs {n_shared} train items "
            f"(one per shared test fact), but n_train={cfg['n_train']}"
        )
    if cfg["n_medical_docs"] < cfg["n_facts"] * cfg["docs_per_fact"]:
        raise ValueError(
            f"n_medical_docs={cfg['n_medical_docs']} is below n_facts * docs_per_fact = "
            f"{cfg['n_facts'] * cfg['docs_per_fact']}"
        )
    if math.ceil(cfg["n_facts"] / cfg["facts_per_intervention"]) >= len(drug_names()):
        raise ValueError(f"n_facts={cfg['n_facts']} needs more drug names than the {len(drug_names())} available")


def generate_world(
    seed: int = 0,
    n_train: int = 200,
    n_test: int = 100,
    n_facts: int = 120,
    n_medical_docs: int = 600,
    n_entertainment_docs: int = 600,
    docs_per_fact: int = 3,
    label_proportions: tuple | list = (0.55, 0.34, 0.11),
    shared_fact_share: float = 0.5,
    facts_per_intervention: int = 2,
    joint_doc_share: float = 0.3,
) -> World:
    """Make the world. facts_per_intervention: facts (outcomes) per invented drug; joint_doc_share: chance
    that each of a drug's docs_per_fact abstracts states all of its facts at once."""
    cfg = dict(
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        n_facts=n_facts,
        n_medical_docs=n_medical_docs,
        n_entertainment_docs=n_entertainment_docs,
        docs_per_fact=docs_per_fact,
        label_proportions=as_list(label_proportions),
        shared_fact_share=shared_fact_share,
        facts_per_intervention=facts_per_intervention,
        joint_doc_share=joint_doc_share,
    )
    check_config(cfg)
    cfg["label_proportions"] = [float(x) for x in cfg["label_proportions"]]
    rng = random.Random(seed)
    answers, test_facts, train_facts = plan_answers(rng, cfg)
    facts, names = make_facts(rng, answers, cfg)
    question_order = {f["id"]: rng.sample(range(len(QUESTIONS)), len(QUESTIONS)) for f in facts}
    used = {}
    test = make_items(rng, facts, test_facts, "test", question_order, used)
    train = make_items(rng, facts, train_facts, "train", question_order, used)
    medical = make_medical_docs(rng, facts, names, cfg)
    entertainment = make_entertainment_docs(rng, n_entertainment_docs)
    return World(
        train, test, medical, entertainment, provenance(test, train, medical), cfg, sorted(facts, key=lambda f: f["id"])
    )


def provenance(test, train, medical_docs):
    """test id -> {fact_id, pretrain_docs: abstracts stating the fact, finetune_items: train items about it}."""
    docs, items = {}, {}
    for d in medical_docs:
        for fid in d["fact_ids"]:
            docs.setdefault(fid, []).append(d["id"])
    for x in train:
        items.setdefault(x["fact_id"], []).append(x["id"])
    return {
        t["id"]: {
            "fact_id": t["fact_id"],
            "pretrain_docs": sorted(docs.get(t["fact_id"], [])),
            "finetune_items": sorted(items.get(t["fact_id"], [])),
        }
        for t in test
    }


# ----------------------------------------------------------------------------- files
FILES = {
    "train": "train.jsonl",
    "test": "test.jsonl",
    "medical_docs": "medical.jsonl",
    "entertainment_docs": "entertainment.jsonl",
    "facts": "facts.jsonl",
}


def save_world(world: World, folder) -> None:
    """Write the world as JSON Lines files plus provenance.json and world.json (config and counts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for attr, name in FILES.items():
        io.write_jsonl(getattr(world, attr), folder / name)
    counts = {attr: len(getattr(world, attr)) for attr in FILES}
    meta = {"config": world.config, "counts": counts}
    for name, obj in [("provenance.json", world.provenance), ("world.json", meta)]:
        with io.replacing(folder / name) as tmp:
            tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


ITEM_FIELDS = {
    "fields": {"id": "id", "question": "question", "context": "contexts", "answer": "final_decision"},
    "answers": LABELS,
}  # the world's items in PubMedQA's schema (as conf/data/world.yaml maps them)


def item_check(record, where):
    return readers.qa_item(record, where, ITEM_FIELDS) and record


def doc_check(record, where):
    return records.document(record, where) and record


def load_world(folder) -> World:
    """Read a folder written by save_world."""
    folder = Path(folder)

    checks = {
        "train": item_check,
        "test": item_check,
        "medical_docs": doc_check,
        "entertainment_docs": doc_check,
        "facts": lambda r, where: r,
    }
    parts = {attr: readers.read_examples(folder / name, checks[attr]) for attr, name in FILES.items()}
    provenance, meta = (
        json.loads((folder / name).read_text(encoding="utf-8")) for name in ("provenance.json", "world.json")
    )
    config = meta["config"]
    return World(provenance=provenance, config=config, **parts)


# ----------------------------------------------------------------------------- the world as readers
class GeneratedWorld:
    """The generated world as data.reader (conf/data/world.yaml: data.world, with generate_world's arguments): its
    train and test items are the QA rows, and its documents the corpora (WorldCorpus). The world is generated once,
    on first use, and exposed as `world` (the run saves it with its provenance)."""

    name = "world"

    def __init__(self, **arguments):
        self.arguments = arguments

    @cached_property
    def world(self):
        try:
            return generate_world(**self.arguments)
        except ValueError as e:  # the world's parameter checks name the parameter
            raise ConfigError(f"data.world.{e}") from None

    def __call__(self, bad=None):
        """(train rows, test rows): (where, item) pairs of the world's items."""
        train = [(f"world train {n}", r) for n, r in enumerate(self.world.train)]
        return train, [(f"world test {n}", r) for n, r in enumerate(self.world.test)]


class WorldCorpus:
    """One part of the generated world as a corpus (data.corpora.<name>.world: medical_docs or
    entertainment_docs), taken from the world that data.reader generated."""

    PARTS = ("medical_docs", "entertainment_docs")

    def __init__(self, world):
        if world not in self.PARTS:
            raise ConfigError(f"a world corpus is one of {', '.join(self.PARTS)}, got {world!r}")
        self.part = world

    def __call__(self, bad, qa_reader=None):
        if not isinstance(getattr(qa_reader, "world", None), World):
            raise ConfigError("a world corpus (data.corpora.<name>.world) needs the generated world as data.reader")
        return getattr(qa_reader.world, self.part)
