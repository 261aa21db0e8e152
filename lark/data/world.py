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
from pathlib import Path

from lark.data import io, readers

LABELS = ("yes", "no", "maybe")
EFFECTS = {"yes": "positive", "no": "null", "maybe": "mixed"}

# ----------------------------------------------------------------------------- medical vocabulary
DRUG_ONSETS = [
    "bel",
    "tor",
    "var",
    "min",
    "sol",
    "dap",
    "rix",
    "quel",
    "fen",
    "lor",
    "zem",
    "pol",
    "dur",
    "kel",
    "mav",
    "nor",
    "sib",
    "tav",
    "vel",
    "wen",
    "hal",
    "gor",
    "jum",
    "pex",
]
DRUG_MIDDLES = ["a", "o", "i", "e", "u", "va", "ra", "li", "ne", "to"]
DRUG_STEMS = ["nib", "zole", "mab", "pril", "stat", "vir", "dine", "tide", "xacin", "lamide"]
CONDITIONS = [
    "Harlow syndrome",
    "Brenner disease",
    "Castell syndrome",
    "Dunmore disease",
    "Everard syndrome",
    "Fenwick disease",
    "Ostrand syndrome",
    "Hollis disorder",
    "Ingram syndrome",
    "Jessop disease",
    "chronic vardenitis",
    "renal quellosis",
    "hepatic morvitis",
    "pulmonary stavosis",
    "Tamsin-Lowe disease",
    "Orrin syndrome",
]
POPULATIONS = [
    "adults",
    "older adults",
    "children",
    "adolescents",
    "outpatients",
    "postmenopausal women",
    "smokers",
    "young adults",
]
REDUCE = ("reduce", "reduces", "reducing", "reduced")
LOWER = ("lower", "lowers", "lowering", "lowered")
IMPROVE = ("improve", "improves", "improving", "improved")
RAISE = ("increase", "increases", "increasing", "increased")
OUTCOMES = [
    ("relapse rate", REDUCE),
    ("pain score", REDUCE),
    ("hospital readmission rate", REDUCE),
    ("fatigue score", REDUCE),
    ("exacerbation frequency", REDUCE),
    ("symptom burden", REDUCE),
    ("serum kinamine level", LOWER),
    ("plasma dravolin concentration", LOWER),
    ("urinary osmerin excretion", LOWER),
    ("resting blood pressure", LOWER),
    ("quality of life", IMPROVE),
    ("six-minute walk distance", IMPROVE),
    ("sleep quality", IMPROVE),
    ("lung function", IMPROVE),
    ("grip strength", IMPROVE),
    ("serum trelamin level", RAISE),
    ("remission rate", RAISE),
    ("bone mineral density", RAISE),
    ("velostin clearance", RAISE),
]
OUTCOME_VERBS = dict(OUTCOMES)

TITLES = [
    "{Drug} for {condition}: a randomized trial",
    "Effect of {drug} on {outcome} in {population} with {condition}",
    "{Drug} versus placebo in {condition}",
]
BACKGROUND = [
    "{Condition} is a chronic disorder with few effective treatments.",
    "{Outcome} is an important measure of disease activity in {condition}.",
    "Many {population} with {condition} respond poorly to current therapy.",
    "{Drug} is a novel oral agent developed for {condition}.",
    "Little is known about the role of {drug} in {population}.",
]
OBJECTIVE = [
    "To determine whether {drug} {third} {outcome} in {population} with {condition}.",
    "This trial tested whether {drug} {third} {outcome} in {population} with {condition}.",
    "We asked whether {drug} could {base} {outcome} in {population} with {condition}.",
]
METHODS = [
    "We randomly assigned {n} {population} with {condition} to {drug} or placebo for {weeks} weeks.",
    "In this double-blind trial, {n} {population} received {drug} or placebo once daily for {weeks} weeks.",
    "A total of {n} {population} with {condition} were enrolled at {sites} centers and followed for {weeks} weeks.",
]
ENDPOINT = ["The primary end point was {outcome}.", "The main outcome was {outcome} at week {weeks}."]
RESULTS = {
    "yes": [
        "{Drug} significantly {past} {outcome} compared with placebo (p < 0.01).",
        "Compared with placebo, {drug} markedly {past} {outcome}.",
        "{Outcome} was substantially {past} in the {drug} group at week {weeks}.",
    ],
    "no": [
        "{Outcome} did not differ between the {drug} and placebo groups.",
        "There was no measurable difference in {outcome} between {drug} and placebo.",
        "{Outcome} was unchanged with {drug} compared with placebo.",
    ],
    "maybe": [
        "Results for {outcome} were inconsistent: {drug} {past} it at some centers but not at others.",
        "The effect of {drug} on {outcome} was inconclusive, with wide confidence intervals.",
        "Findings for {outcome} were mixed, and the benefit of {drug} faded after week {half}.",
    ],
}
EXTRAS = [
    "Adverse events were mild and occurred at similar rates in both groups.",
    "Adherence to study medication was above 90 percent.",
    "Dropout was low and balanced between arms.",
    "Analyses followed the intention-to-treat principle.",
    "Baseline characteristics were well balanced.",
]
CONCLUSIONS = {
    "yes": [
        "{Drug} {third} {outcome} in {population} with {condition}.",
        "These findings support the use of {drug} to {base} {outcome} in {condition}.",
    ],
    "no": [
        "{Drug} does not {base} {outcome} in {population} with {condition}.",
        "{Drug} offers no benefit for {outcome} in {condition}.",
    ],
    "maybe": [
        "The effect of {drug} on {outcome} in {population} with {condition} remains unclear.",
        "Larger trials are needed to establish whether {drug} {third} {outcome} in {condition}.",
    ],
}
QUESTIONS = [
    "Does {drug} {base} {outcome} in {population} with {condition}?",
    "Is {drug} effective in {gerund} {outcome} among {population} with {condition}?",
    "Can {drug} {base} {outcome} in patients with {condition}?",
    "Does treatment with {drug} {base} {outcome} in {condition}?",
]

# ----------------------------------------------------------------------------- entertainment vocabulary
SONG = dict(
    place=[
        "the highway",
        "the river",
        "the harbor",
        "this old town",
        "the city lights",
        "the dance floor",
        "the back porch",
        "the open road",
        "the railway line",
        "the boardwalk",
    ],
    time=["midnight", "the summer", "Saturday night", "the morning", "the last of June", "December", "sundown"],
    thing=["guitar", "radio", "old red truck", "silver ring", "paper moon", "neon sign", "vinyl record"],
    feel=["lonely", "restless", "golden", "wild", "free", "bold", "easy", "brave"],
)
SONG_TITLES = ["{Feel} {Thing}", "Down {place}", "Till {time}"]
VERSE_LINES = [
    "We were dancing down {place} at {time}",
    "I hear your voice on the {thing}",
    "Baby, I'm {feel} tonight",
    "Take me back to {place}",
    "Every song reminds me of {time}",
    "You left your {thing} on my front step",
    "Oh oh, we were {feel} and we knew it",
    "Rolling down {place} with the windows down",
    "Hold me close till {time}",
    "The stars were shining over {place}",
    "Singing every word we used to know",
    "Don't let the music fade away",
]
CHORUS_LINES = [
    "Oh, sing it loud, sing it to {place}",
    "We'll be dancing till {time}, yeah",
    "Na na na, {feel} tonight",
    "Hold on, hold on to me",
    "Turn it up, turn the {thing} up",
]
WEB = dict(
    band=["The Velvet Kites", "Paper Lanterns", "Northbound Choir", "The Copper Foxes", "Saltwater Radio"],
    album=["Glass Rivers", "Late Bloom", "Neon Orchard", "Slow Thunder"],
    venue=["the Blue Room", "Riverside Hall", "the Old Mill"],
    film=["The Last Lighthouse", "Paper Kingdom", "The Quiet Storm", "Northern Lights Express"],
    actor=["Mara Quinn", "Theo Valdez", "June Okafor", "Felix Brandt"],
    team=["Riverton Rovers", "Eastport United", "the Harbor Hawks", "Millbrook City"],
    rival=["Westfield Athletic", "the Lakeside Lions", "Stonebridge Town"],
    player=["Leo Santos", "Kai Moreno", "Sam Whitfield", "Ola Berg"],
    dish=["lemon garlic pasta", "smoky black bean chili", "apple crumble", "roast vegetable tart"],
    ingredient=["fresh basil", "brown butter", "chopped walnuts", "sea salt"],
    city=["Lisbon", "Kyoto", "Porto", "Valencia", "Quebec City"],
    sight=["the old harbor", "the flower market", "the castle walls", "the riverside promenade"],
    day=["Friday", "Saturday", "Sunday"],
)
WEB_PAGES = {
    "music": (
        ["Album review: {album} by {band}", "{band} announce a summer tour"],
        [
            "{band} are back with {album}, a bright and warm guitar pop record.",
            "The album opens with a slow ballad and builds to a loud, joyful finale.",
            "Fans packed {venue} for the release show on {day} night.",
            "The drummer keeps a steady groove while the singer reaches for the high notes.",
            "Tickets for the summer tour go on sale this weekend.",
            "Our favorite track is the closing song, a soft duet with piano and strings.",
            "Stream the new single now and tell us your favorite song in the comments.",
            "The band recorded the album in a small studio by the sea.",
            "Critics praised the catchy choruses and the clever lyrics.",
        ],
    ),
    "film": (
        ["Movie review: {film}", "{film} is the surprise hit of the season"],
        [
            "{film} stars {actor} as a daring pilot searching for a lost brother.",
            "The opening chase through the night market is pure fun.",
            "{actor} gives a warm and funny performance.",
            "The soundtrack mixes old jazz records with a sweeping orchestral theme.",
            "Some scenes drag in the middle, but the ending lands with real emotion.",
            "The film opens in cinemas on {day} and streams next month.",
            "Bring popcorn and a friend, because this one is best seen on a big screen.",
            "The director shot most of the film on location in {city}.",
            "Our movie club gives it four stars out of five.",
        ],
    ),
    "sports": (
        ["Match report: {team} against {rival}", "{team} win a thriller at home"],
        [
            "{team} beat {rival} three goals to two in a thrilling derby on {day}.",
            "{player} struck first with a curling shot from the edge of the box.",
            "The visitors equalized just before half time.",
            "The crowd roared as the winner went in during stoppage time.",
            "The coach praised the defense and the energy of the new signings.",
            "Next up is an away game against the league leaders on {day}.",
            "Season tickets for the new stadium are almost sold out.",
            "{player} was named player of the match after a tireless display.",
            "Highlights are available on the club website.",
        ],
    ),
    "cooking": (
        ["Recipe: {dish}", "Easy weeknight {dish}"],
        [
            "This {dish} is ready in thirty minutes and serves four.",
            "Start by warming olive oil in a large pan over medium heat.",
            "Add the onions and garlic and stir until soft and golden.",
            "Finish with {ingredient} and a squeeze of lemon.",
            "Leftovers keep well in the fridge for two days.",
            "Serve it with crusty bread and a simple green salad.",
            "For a spicy version, add a pinch of chili flakes.",
            "Our readers love this dish for busy {day} evenings.",
            "Bake until the top is crisp and bubbling.",
        ],
    ),
    "travel": (
        ["A weekend in {city}", "Travel guide: three days in {city}"],
        [
            "{city} is perfect for a long weekend of food, music and sunshine.",
            "Start your morning with coffee and pastries near {sight}.",
            "The old streets are best explored on foot or by bike.",
            "In the afternoon, take a boat ride along the coast.",
            "Local markets sell fresh fruit, cheese and handmade souvenirs.",
            "Book a table early, because the best restaurants fill up fast.",
            "At night, the bars around {sight} come alive with live music.",
            "Spring and early autumn bring warm weather and smaller crowds.",
            "Trains from the airport to the old town run every ten minutes.",
        ],
    ),
}


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
def cap(s):
    return s[0].upper() + s[1:]


def n_words(text):
    return len(text.split())


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


def drug_names():
    """Every invented drug name, in a fixed order (onset + middle + stem, e.g. bel+a+nib, tor+va+zole)."""
    return [o + m + s for o in DRUG_ONSETS for m in DRUG_MIDDLES for s in DRUG_STEMS]


def medical_names():
    """Every medical entity name the world can use: drugs, conditions, populations, outcomes."""
    return drug_names() + CONDITIONS + POPULATIONS + [name for name, _ in OUTCOMES]


def slots(rng, fact, study=None):
    """Template fields for a fact; `study` (numbers of one trial) is drawn unless given."""
    base, third, gerund, past = OUTCOME_VERBS[fact["outcome"]]
    study = study or {
        "n": rng.randrange(40, 400, 2),
        "weeks": rng.choice([8, 12, 24, 26, 52]),
        "sites": rng.randint(3, 20),
    }
    return dict(
        study,
        drug=fact["intervention"],
        Drug=cap(fact["intervention"]),
        outcome=fact["outcome"],
        Outcome=cap(fact["outcome"]),
        condition=fact["condition"],
        Condition=cap(fact["condition"]),
        population=fact["population"],
        base=base,
        third=third,
        gerund=gerund,
        past=past,
        half=study["weeks"] // 2,
    )


def say(rng, templates, s):
    return rng.choice(templates).format(**s)


# ----------------------------------------------------------------------------- texts
def abstract(rng, facts):
    """A trial abstract (title line + paragraph) with one RESULTS sentence per fact; facts share the drug."""
    s = slots(rng, facts[0])
    required = [(0, say(rng, TITLES, s)), (2, say(rng, OBJECTIVE, s)), (3, say(rng, METHODS, s))]
    required += [(5, say(rng, RESULTS[f["answer"]], slots(rng, f, s))) for f in facts]
    required += [(7, say(rng, CONCLUSIONS[facts[0]["answer"]], s))]
    optional = [(1, t.format(**s)) for t in rng.sample(BACKGROUND, 2)] + [(4, say(rng, ENDPOINT, s))]
    optional += [(6, t) for t in rng.sample(EXTRAS, 3)]
    rng.shuffle(optional)
    parts, target = required, rng.randint(65, 115)
    while optional and sum(n_words(t) for _, t in parts) < target:
        parts = parts + [optional.pop()]
    parts = sorted(parts, key=lambda p: p[0])
    return parts[0][1] + "\n" + " ".join(t for _, t in parts[1:])


def qa_item(rng, fact, question_template):
    """A PubMedQA-style item about one fact: 1-3 of BACKGROUND / OBJECTIVE / METHODS, then RESULTS."""
    s = slots(rng, fact)
    background = [t.format(**s) for t in rng.sample(BACKGROUND, rng.randint(1, 2))]
    methods = [say(rng, METHODS, s)] + ([say(rng, ENDPOINT, s)] if rng.random() < 0.5 else [])
    results = [say(rng, RESULTS[fact["answer"]], s)] + rng.sample(EXTRAS, rng.randint(0, 1))
    sections = {
        "BACKGROUND": " ".join(background),
        "OBJECTIVE": say(rng, OBJECTIVE, s),
        "METHODS": " ".join(methods),
        "RESULTS": " ".join(results),
    }
    labels = sorted(rng.sample(["BACKGROUND", "OBJECTIVE", "METHODS"], rng.randint(1, 3)), key=list(sections).index) + [
        "RESULTS"
    ]
    return {
        "id": None,
        "question": question_template.format(**s),
        "contexts": [sections[k] for k in labels],
        "labels": labels,
        "long_answer": say(rng, CONCLUSIONS[fact["answer"]], s),
        "final_decision": fact["answer"],
        "fact_id": fact["id"],
    }


def lyrics(rng):
    """A song: title, then verse / chorus / verse / chorus ... until about 65-110 words."""
    fill = {k: rng.choice(v) for k, v in SONG.items()}
    fill.update(Feel=fill["feel"].title(), Thing=fill["thing"].title())
    chorus = "[Chorus]\n" + "\n".join(t.format(**fill) for t in rng.sample(CHORUS_LINES, rng.randint(2, 3)))
    parts, target, verse = [say(rng, SONG_TITLES, fill)], rng.randint(65, 110), 0
    while n_words("\n".join(parts)) < target:
        if len(parts) % 2:
            verse += 1
            lines = [
                t.format(**{k: rng.choice(v) for k, v in SONG.items()})
                for t in rng.sample(VERSE_LINES, rng.randint(3, 4))
            ]
            parts.append(f"[Verse {verse}]\n" + "\n".join(lines))
        else:
            parts.append(chorus)
    return "\n\n".join(parts)


def web_page(rng):
    """A web page on one topic: title line, then sentences until about 65-110 words."""
    titles, sentences = WEB_PAGES[rng.choice(list(WEB_PAGES))]
    fill = {k: rng.choice(v) for k, v in WEB.items()}
    parts, target = [say(rng, titles, fill)], rng.randint(65, 110)
    for t in rng.sample(sentences, len(sentences)):
        if n_words(" ".join(parts)) >= target:
            break
        parts.append(t.format(**fill))
    return parts[0] + "\n" + " ".join(parts[1:])


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


def make_items(rng, facts, fact_indices, prefix, question_order, used):
    """QA items for the given facts (shuffled); each fact's items cycle through its question templates."""
    items = []
    for i in fact_indices:
        fid = facts[i]["id"]
        template = QUESTIONS[question_order[fid][used.get(fid, 0) % len(QUESTIONS)]]
        used[fid] = used.get(fid, 0) + 1
        items.append(qa_item(rng, facts[i], template))
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
    entertainment = []
    for i in range(n_entertainment_docs):
        kind = rng.choice(["lyrics", "web"])
        entertainment.append(
            {"id": f"ent-{i:05d}", "text": lyrics(rng) if kind == "lyrics" else web_page(rng), "kind": kind}
        )
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
    return readers.document(record, where) and record


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
