"""lark.data.sources and lark.data.datamodule: sources of every kind from any number of corpora, a user's own kind by
`_target_`, start-time errors naming the key, and tokenisation once per run."""

import pytest
from conftest import compose
from omegaconf import OmegaConf, open_dict

from lark.data.sources import build_sources, check_sources
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
    assert [e["id"] for e in sets["ft"]] == ["t0", "t1", "t2", "t3", "t4"] and sets["ft"][0]["answer"] == "answer 0"
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
