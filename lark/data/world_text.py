"""The words and sentences of the generated world (lark.data.world), and how one text is written from them.

A fact's answer (LABELS) picks its RESULTS and CONCLUSIONS sentences; the RESULTS cue phrases (significantly,
did not differ, inconclusive, ...) appear in no other sentence. Every other sentence is drawn from the lists here
with the world's one random.Random: the order of each list and of every draw is part of the world's bytes.
"""

LABELS = ("yes", "no", "maybe")
EFFECTS = {"yes": "positive", "no": "null", "maybe": "mixed"}


def words(text):
    """The comma-separated entries of a word list."""
    return text.split(", ")


def outcomes(verb, text):
    """(outcome, verb) pairs of a word list of outcomes that share one verb."""
    return [(outcome, verb) for outcome in words(text)]


# ----------------------------------------------------------------------------- medical vocabulary
DRUG_ONSETS = "bel tor var min sol dap rix quel fen lor zem pol dur kel mav nor sib tav vel wen hal gor jum pex".split()
DRUG_MIDDLES = "a o i e u va ra li ne to".split()
DRUG_STEMS = "nib zole mab pril stat vir dine tide xacin lamide".split()
CONDITIONS = words(
    "Harlow syndrome, Brenner disease, Castell syndrome, Dunmore disease, Everard syndrome, Fenwick disease, "
    "Ostrand syndrome, Hollis disorder, Ingram syndrome, Jessop disease, chronic vardenitis, renal quellosis, "
    "hepatic morvitis, pulmonary stavosis, Tamsin-Lowe disease, Orrin syndrome"
)
POPULATIONS = words(
    "adults, older adults, children, adolescents, outpatients, postmenopausal women, smokers, young adults"
)
REDUCE = ("reduce", "reduces", "reducing", "reduced")
LOWER = ("lower", "lowers", "lowering", "lowered")
IMPROVE = ("improve", "improves", "improving", "improved")
RAISE = ("increase", "increases", "increasing", "increased")
OUTCOMES = (  # (outcome, its verb's forms: base, third person, gerund, past)
    outcomes(REDUCE, "relapse rate, pain score, hospital readmission rate, fatigue score, exacerbation frequency")
    + outcomes(REDUCE, "symptom burden")
    + outcomes(LOWER, "serum kinamine level, plasma dravolin concentration, urinary osmerin excretion")
    + outcomes(LOWER, "resting blood pressure")
    + outcomes(IMPROVE, "quality of life, six-minute walk distance, sleep quality, lung function, grip strength")
    + outcomes(RAISE, "serum trelamin level, remission rate, bone mineral density, velostin clearance")
)
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
    place=words(
        "the highway, the river, the harbor, this old town, the city lights, the dance floor, the back porch, "
        "the open road, the railway line, the boardwalk"
    ),
    time=words("midnight, the summer, Saturday night, the morning, the last of June, December, sundown"),
    thing=words("guitar, radio, old red truck, silver ring, paper moon, neon sign, vinyl record"),
    feel=words("lonely, restless, golden, wild, free, bold, easy, brave"),
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


def word_table(text):
    """{slot: its word list} of a table written one slot a line: `slot: entry, entry, ...`."""
    return {slot: words(entries) for slot, entries in (line.split(": ", 1) for line in text.strip().splitlines())}


WEB = word_table(
    """
band: The Velvet Kites, Paper Lanterns, Northbound Choir, The Copper Foxes, Saltwater Radio
album: Glass Rivers, Late Bloom, Neon Orchard, Slow Thunder
venue: the Blue Room, Riverside Hall, the Old Mill
film: The Last Lighthouse, Paper Kingdom, The Quiet Storm, Northern Lights Express
actor: Mara Quinn, Theo Valdez, June Okafor, Felix Brandt
team: Riverton Rovers, Eastport United, the Harbor Hawks, Millbrook City
rival: Westfield Athletic, the Lakeside Lions, Stonebridge Town
player: Leo Santos, Kai Moreno, Sam Whitfield, Ola Berg
dish: lemon garlic pasta, smoky black bean chili, apple crumble, roast vegetable tart
ingredient: fresh basil, brown butter, chopped walnuts, sea salt
city: Lisbon, Kyoto, Porto, Valencia, Quebec City
sight: the old harbor, the flower market, the castle walls, the riverside promenade
day: Friday, Saturday, Sunday
"""
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


# ----------------------------------------------------------------------------- writing one text
def cap(s):
    return s[0].upper() + s[1:]


def n_words(text):
    return len(text.split())


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


def question_item(rng, fact, question_template):
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
