"""lark.data.sources, lark.data.bm25 and lark.data.datamodule: sources of every kind from any number of corpora, a
user's own kind by `_target_`, start-time errors naming the key, BM25 against the Okapi formula worked by hand, and
tokenisation once per run."""

import math

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf, open_dict

from lark.data.bm25 import BM25, tokens
from lark.data.sources import bm25_retrieve, build_sources, check_sources
from lark.errors import ConfigError

TRAIN = [{"id": f"t{i}", "question": f"Question {i}?", "contexts": [], "answer": f"answer {i}"} for i in range(6)]
TEST = [{"id": "q0", "question": "Where do herons nest?", "contexts": [], "answer": "reeds"}]
CORPORA = {
    "birds": [{"id": f"b{i}", "text": f"Herons nest in reeds number {i}. They fish."} for i in range(5)]
    + [{"id": "b9", "text": "Sparrows eat seeds. They sing."}],
    "cars": [{"id": f"c{i}", "text": f"Car {i} has four wheels. It drives."} for i in range(7)],
    "songs": [{"id": f"s{i}", "text": f"Song {i} is loud. It rhymes."} for i in range(3)],
}


def source_cfg(sources, **over):
    return OmegaConf.merge(compose(["source=own_data"]).source, {"sources": None}, {"sources": sources, **over})


def test_every_kind_from_three_corpora():
    cfg = source_cfg(
        {
            "ft": {"kind": "finetune", "formatted": True},
            "birds": {"kind": "retrieve", "corpus": "birds", "formatted": True, "size": 3},
            "cars": {"kind": "sample", "corpus": "cars", "formatted": False, "size": 4},
            "songs": {"kind": "all", "corpus": "songs", "formatted": False},
        },
        size=5,
    )
    fmt = compose().format
    sets = build_sources(cfg, fmt, TRAIN, TEST, CORPORA, seed=0)
    assert [e["id"] for e in sets["ft"]] == [t["id"] for t in TRAIN] and sets["ft"][0][
        "answer"
    ] == "answer 0"  # every item
    assert len(sets["birds"]) == 3 and "b9" not in {e["id"] for e in sets["birds"]}  # BM25 with the test question
    assert set(sets["birds"][0]) == {"id", "question", "context", "answer"}  # Formatted
    ids = [e["id"] for e in sets["cars"]]
    assert len(ids) == 4 and ids == sorted(ids) and sets["cars"][0].keys() == {"id", "text"}  # seeded, raw
    assert ids == [e["id"] for e in build_sources(cfg, fmt, TRAIN, TEST, CORPORA, seed=0)["cars"]]
    assert [e["id"] for e in sets["songs"]] == ["s0", "s1", "s2"]


def first_two(docs, **_):
    return docs[:2]


def test_a_kind_of_your_own_by_target():
    cfg = source_cfg(
        {"ft": {"kind": "finetune", "formatted": True}, "mine": {"kind": "first", "corpus": "cars", "formatted": False}}
    )
    with open_dict(cfg):
        cfg.kinds.first = {"_target_": "test_sources.first_two"}  # what +source.kinds.first._target_=... adds
    sets = build_sources(cfg, compose().format, TRAIN, TEST, CORPORA, seed=0)
    assert [e["id"] for e in sets["mine"]] == ["c0", "c1"]


@pytest.mark.parametrize(
    "spec,key",
    [
        ({"kind": "nearest", "corpus": "cars"}, "source.sources.x.kind: unknown 'nearest'"),
        ({"kind": "sample", "corpus": "planes"}, "source.sources.x.corpus: unknown 'planes'"),
        ({"kind": "retrieve"}, "source.sources.x.corpus: a 'retrieve' source needs"),
        ({"kind": "all", "corpus": "cars", "size": 0}, "source.sources.x.size"),
    ],
)
def test_unknown_kind_or_corpus_fails_naming_the_key(spec, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_sources(source_cfg({"x": {"formatted": False, **spec}}), list(CORPORA))


# ----------------------------------------------------------------------------- BM25
# 4 documents, 15 words: avgdl = 15 / 4 = 3.75. "herons" is in 3 documents, every other word in 1.
HERONS = ["Herons nest in reeds.", "Herons fish; herons wade.", "Cars drive fast, herons watch.", "Songs rhyme."]
IDF_RARE = math.log((4 - 1 + 0.5) / (1 + 0.5))  # idf = ln((N - n + 0.5) / (n + 0.5)) = ln(7/3) for n = 1
# idf("herons") = ln(1.5 / 3.5) < 0: rank_bm25 floors it at epsilon (0.25) x the mean idf of the 12 distinct
# words, (ln(3/7) + 11 ln(7/3)) / 12 = (10/12) ln(7/3).
IDF_HERONS = 0.25 * 10 / 12 * IDF_RARE


def tf_part(f, length, k1=1.5, b=0.75, avgdl=3.75):
    """Okapi's term-frequency factor f (k1 + 1) / (f + k1 (1 - b + b |d| / avgdl))."""
    return f * (k1 + 1) / (f + k1 * (1 - b + b * length / avgdl))


def test_bm25_tokens_are_lower_cased_word_runs():
    assert tokens("Herons fish; herons wade.") == ["herons", "fish", "herons", "wade"]
    assert tokens("Does X-12 reduce PAIN? yes_no") == ["does", "x", "12", "reduce", "pain", "yes_no"]


@pytest.mark.parametrize(
    "query,expected",
    [
        ("reeds", [IDF_RARE * tf_part(1, 4), 0, 0, 0]),  # one rare word, in document 0 (4 words)
        ("REEDS?", [IDF_RARE * tf_part(1, 4), 0, 0, 0]),  # the query is tokenised like the documents
        ("herons", [IDF_HERONS * tf_part(1, 4), IDF_HERONS * tf_part(2, 4), IDF_HERONS * tf_part(1, 5), 0]),
        ("fast songs", [0, 0, IDF_RARE * tf_part(1, 5), IDF_RARE * tf_part(1, 2)]),
        ("songs songs", [0, 0, 0, 2 * IDF_RARE * tf_part(1, 2)]),  # a repeated query word counts twice
        ("ostriches", [0, 0, 0, 0]),  # a word of no document
    ],
)
def test_bm25_scores_are_the_okapi_formula_worked_by_hand(query, expected):
    scores = BM25(HERONS).scores(query)
    assert scores.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_bm25_matrix_and_rankings():
    index = BM25(HERONS)
    matrix = index.matrix(["reeds", "fast songs"])
    assert matrix.dtype == torch.float64 and matrix.shape == (2, 4)
    assert matrix[1].tolist() == pytest.approx([0, 0, IDF_RARE * tf_part(1, 5), IDF_RARE * tf_part(1, 2)])
    # "fast songs": the shorter document 3 first; the tied zeros keep their corpus order (a stable sort)
    assert [r.tolist() for r in index.rankings(["fast songs", "herons"], depth=3)] == [[3, 2, 0], [1, 0, 2]]


def test_bm25_retrieve_takes_each_querys_next_best_in_turn_without_duplicates():
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(HERONS)]
    docs.append({"id": "copy", "text": "  songs   RHYME. "})  # the text of d3 again (case and spacing aside)
    # with the copy, "songs" is in 2 of 5 documents and "fast" in 1, so "fast songs" ranks d2, d3, copy (tied with
    # d3, after it); "reeds" ranks d0, then the zeros in corpus order: d1, d2. Round robin over the ranks: d0, d2;
    # d1 (score 0: shares no word with "reeds", so no hit; it used to be taken), d3; d2 again (same id) and copy
    # (same text as d3) are left out.
    assert [r.tolist() for r in BM25([d["text"] for d in docs]).rankings(["reeds", "fast songs"], 3)] == [
        [0, 1, 2],
        [2, 3, 4],
    ]
    assert [d["id"] for d in bm25_retrieve(["reeds", "fast songs"], docs, n=10, per_query=3)] == ["d0", "d2", "d3"]
    assert [d["id"] for d in bm25_retrieve(["reeds", "fast songs"], docs, n=2, per_query=3)] == ["d0", "d2"]
    assert bm25_retrieve(["opera"], docs, n=3, per_query=3) == []  # no document shares a word
    half = [{"id": f"h{i}", "text": t} for i, t in enumerate(["alpha beta", "alpha gamma", "delta", "epsilon"])]
    # "alpha" is in half the documents: idf 0, so its documents score 0 like the others, yet they are matches
    assert [d["id"] for d in bm25_retrieve(["alpha"], half, n=4, per_query=4)] == ["h0", "h1"]


def test_each_example_is_tokenised_once_per_run():
    from lark.data.datamodule import LarkDataModule
    from lark.models import train_tokenizer

    tok = train_tokenizer([e["text"] for docs in CORPORA.values() for e in docs], 300)
    calls = []
    real = type(tok).__call__
    type(tok).__call__ = lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k)
    try:
        fmt = compose().format
        data = LarkDataModule(tok, fmt, 64, TRAIN, batch_size=2, seed=0)
        n = len(calls)
        assert n == 2 * len(TRAIN)  # prompt and answer of each item
        again = [
            data.encoder({"id": e["id"], "question": e["question"], "context": "", "answer": e["answer"]})
            for e in TRAIN
        ]
        assert len(calls) == n and again == data.train_encoded  # a later checkpoint tokenises nothing
        data.encoder({"id": "d", "text": "Herons nest."})
        data.encoder({"id": "d", "text": "Herons nest."})
        assert len(calls) == n + 1
    finally:
        type(tok).__call__ = real
    assert sum(len(b["input_ids"]) for b in data.train_dataloader()) == len(TRAIN)
