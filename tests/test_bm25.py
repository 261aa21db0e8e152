"""lark.data.bm25 at scale: the bm25s backend agrees with rank_bm25 (the generated world, and a real corpus when
../shared/data is there), indexes in chunks without holding the texts, streams a JSON Lines corpus, and saves an
index that is reused until the corpus or the settings change. (The Okapi formula worked by hand: test_sources.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA, compose

from lark.data import bm25
from lark.data.corpora import JsonlCorpus, Streamed
from lark.data.io import BadRows, read_jsonl
from lark.data.readers import load_data
from lark.data.sources import bm25_retrieve, corpus_key, random_sample
from lark.errors import ConfigError

REAL = Path(os.environ.get("LARK_SHARED_DATA", SHARED_DATA))  # LARK_SHARED_DATA: the folder, from a worktree


@pytest.fixture(autouse=True)
def shipped_settings(monkeypatch):
    """Each test starts from the shipped source.bm25 (configure changes the module's SETTINGS)."""
    monkeypatch.setattr(bm25, "SETTINGS", dict(bm25.SETTINGS))


@pytest.fixture(scope="module")
def world():
    """(test questions, documents) of the embedded default: the generated world's abstracts and entertainment."""
    _, test, corpora, _ = load_data(compose().data)
    return [q["question"] for q in test], [d["text"] for docs in corpora.values() for d in docs]


def assert_same_top_k(queries, texts, k, rtol, **settings):
    """Every query: the same scores as rank_bm25 (within rtol), and the same top k documents, where documents
    whose scores tie with the k-th (within rtol) may swap in or out of the top k. Returns how many queries have
    the very same top k, in the same order."""
    reference, index = bm25.BM25(texts, backend="rank_bm25"), bm25.BM25(iter(texts), backend="bm25s", **settings)
    identical = 0
    for query, ranking in zip(queries, index.rankings(queries, k)):
        a, b = reference.scores(query), index.scores(query)
        np.testing.assert_allclose(b, a, rtol=rtol, atol=1e-12)
        expected = np.argsort(-a, kind="stable")[:k]
        np.testing.assert_allclose(b[ranking], a[expected], rtol=rtol, atol=1e-12)  # rank by rank
        kth = a[expected[-1]]
        above = lambda r: {int(i) for i in r if a[i] > kth + rtol * abs(kth) + 1e-12}  # noqa: E731
        assert above(ranking) == above(expected), query
        identical += ranking.tolist() == expected.tolist()
    return identical


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-5)])
def test_bm25s_agrees_with_rank_bm25_on_the_generated_world(world, dtype, rtol):
    queries, texts = world
    identical = assert_same_top_k(queries, texts, 50, rtol, dtype=dtype, chunk=97)
    if dtype == "float64":  # at float64 no tie is broken differently: the very same rankings
        assert identical == len(queries)


@pytest.mark.slow  # about 45 s: rank_bm25 scores 500 queries in Python
@pytest.mark.skipif(not (REAL / "pubmed_corpus").is_dir(), reason=f"shared data folder {REAL} is absent")
def test_bm25s_agrees_with_rank_bm25_on_real_abstracts():
    """The 4,302 RCT abstracts with the 500 PubMedQA test questions (../shared/data/SOURCES.md)."""
    texts = [r["text"] for _, r in read_jsonl(REAL / "pubmed_corpus/abstracts.jsonl")]
    queries = [r["question"] for _, r in read_jsonl(REAL / "pubmedqa/pqa_labeled.jsonl") if r["split"] == "test"]
    assert (len(texts), len(queries)) == (4302, 500)
    assert assert_same_top_k(queries, texts, 100, 1e-9, chunk=1000) == len(queries)


def test_an_index_built_in_chunks_equals_one_built_at_once(world):
    _, texts = world
    whole, parts = bm25.BM25(texts, chunk=10**6).index.index, bm25.BM25(iter(texts), chunk=7).index.index
    assert whole.vocab_dict == parts.vocab_dict
    for name in ("data", "indices", "indptr"):
        assert np.array_equal(whole.scores[name], parts.scores[name]), name
    assert whole.scores["num_docs"] == parts.scores["num_docs"] == len(texts)


LIVE = [0, 0]  # [texts alive now, most alive at once]


class Text(str):
    """A text that counts how many of its kind are alive."""

    def __new__(cls, value):
        LIVE[0] += 1
        LIVE[1] = max(LIVE)
        return super().__new__(cls, value)

    def __del__(self):
        LIVE[0] -= 1


def test_indexing_holds_at_most_a_chunk_of_texts(world):
    _, texts = world
    LIVE[:] = [0, 0]
    index = bm25.BM25((Text(t) for t in texts), chunk=50)
    assert len(index) == len(texts) and LIVE[0] == 0
    assert LIVE[1] <= 51  # one chunk, and the next text being read
    assert index.matrix(["Herons nest in reeds."]).shape == (1, len(texts))


def test_top_is_a_stable_sort_of_every_score():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=1000).astype(float)  # many exact ties
    for depth in (0, 1, 7, 200, 999, 1000, 2000):
        assert bm25.top(scores, depth).tolist() == np.argsort(-scores, kind="stable")[:depth].tolist()


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def test_a_streamed_jsonl_corpus_retrieves_what_the_list_does(tmp_path, world):
    queries, texts = world
    write_corpus(tmp_path / "c.jsonl", texts[:300] + ["dup"])
    listed = JsonlCorpus(tmp_path / "c.jsonl")(BadRows())
    streamed = JsonlCorpus(tmp_path / "c.jsonl", stream=True)(BadRows())
    assert isinstance(streamed, Streamed) and len(streamed) == len(listed) == 301
    assert streamed.take([5, 0, 5]) == [listed[5], listed[0], listed[5]] and streamed[300]["text"] == "dup"
    assert bm25_retrieve(queries[:20], streamed, 40, 5) == bm25_retrieve(queries[:20], listed, 40, 5)
    assert random_sample(docs=streamed, size=9, seed=3) == random_sample(docs=listed, size=9, seed=3)


def test_a_saved_index_is_reused_and_a_changed_corpus_rebuilt(tmp_path, world):
    queries, texts = world
    path, logs = tmp_path / "c.jsonl", []
    write_corpus(path, texts[:200])
    docs = JsonlCorpus(path, stream=True)(BadRows())
    first = bm25.cached(lambda: (d["text"] for d in docs), corpus_key(docs), tmp_path / "idx", log=logs.append)

    def never():
        raise AssertionError("the saved index should have been reused")

    again = bm25.cached(never, corpus_key(docs), tmp_path / "idx", log=logs.append)
    assert "reusing" in logs[-1] and np.array_equal(first.matrix(queries), again.matrix(queries))
    assert [r.tolist() for r in again.rankings(queries, 10)] == [r.tolist() for r in first.rankings(queries, 10)]
    write_corpus(path, texts[:199])  # the file changed: another key, a new index
    docs = JsonlCorpus(path, stream=True)(BadRows())
    changed = bm25.cached(lambda: (d["text"] for d in docs), corpus_key(docs), tmp_path / "idx", log=logs.append)
    assert "indexed" in logs[-1] and len(changed) == 199
    bm25.configure({"k1": 1.2})  # other settings: another key too
    assert bm25.index_key(corpus_key(docs)) != bm25.index_key(corpus_key(docs), {"k1": 1.5})
    assert bm25.index_key(corpus_key(docs)) == bm25.index_key(corpus_key(docs), {"chunk": 3})  # same index
    assert len(list((tmp_path / "idx").iterdir())) == 2


def test_a_saved_index_that_fails_its_checksums_is_rebuilt_not_trusted(tmp_path, world):
    """A saved index carries checksums.json: an edited array (which changed retrieval silently), a truncated one
    (a raw mmap error) or no checksums at all is indexed again, giving the fresh index's scores; the temporary
    folder of a killed save (a dead pid) is removed by the next save."""
    queries, texts = world
    docs = [{"id": str(i), "text": t} for i, t in enumerate(texts[:200])]
    key, logs = corpus_key(docs), []
    fresh = bm25.cached(lambda: (d["text"] for d in docs), key, tmp_path / "idx", log=logs.append).matrix(queries)
    path = tmp_path / "idx" / bm25.index_key(key)
    assert "checksums.json" in {p.name for p in path.iterdir()}
    arrays = sorted(p for p in path.glob("*.npy"))
    for damage in ("edit", "truncate", "unlisted"):
        if damage == "edit":
            raw = bytearray(arrays[0].read_bytes())
            raw[-1] ^= 0xFF
            arrays[0].write_bytes(bytes(raw))
        elif damage == "truncate":
            arrays[-1].write_bytes(arrays[-1].read_bytes()[:64])
        else:
            (path / "checksums.json").unlink()
        dead = tmp_path / "idx" / f"{path.name}.tmp999999999"
        dead.mkdir()
        again = bm25.cached(lambda: (d["text"] for d in docs), key, tmp_path / "idx", log=logs.append)
        assert "indexed again" in logs[-2] and "saved in" in logs[-1], (damage, logs[-2:])
        assert np.array_equal(again.matrix(queries), fresh) and not dead.exists()
        assert "reusing" in (bm25.cached(None, key, tmp_path / "idx", log=logs.append) and logs[-1])


def test_where_the_index_is_cached_changes_no_epoch_fingerprint():
    """A run resumed with another cache folder (source.bm25.index_dir follows paths.cache_dir) reuses its epochs;
    a BM25 setting that changes the retrieval does not."""
    from lark.checkpoint import epoch_fingerprint

    def fingerprint(*overrides):
        return epoch_fingerprint(compose(list(overrides)), {"checkpoint": "c"}, [], {}, 1)

    assert fingerprint() == fingerprint("source.bm25.index_dir=/elsewhere", "paths.cache_dir=/other")
    assert fingerprint() != fingerprint("source.bm25.k1=1.2")


def test_a_list_corpus_is_keyed_by_its_content():
    docs = [{"id": "a", "text": "x y"}, {"id": "b", "text": "z"}]
    assert corpus_key(docs) == corpus_key([dict(d) for d in docs])
    assert corpus_key(docs) != corpus_key([docs[0], {"id": "b", "text": "z!"}])


def test_source_bm25_is_checked_and_selects_the_backend():
    with pytest.raises(ConfigError, match="source.bm25.backend: unknown 'lucene'"):
        bm25.configure({"backend": "lucene"})
    with pytest.raises(ConfigError, match="source.bm25.k2: unknown key"):
        bm25.configure({"k2": 1})
    bm25.configure(compose(["source.bm25.backend=rank_bm25"]).source.bm25)
    assert isinstance(bm25.BM25(["a b", "b c"]).index, bm25.RankBm25Index)


def test_configure_starts_from_the_shipped_settings():
    """A sweep job (one process) whose source.bm25 left k1 out kept the previous job's k1."""
    bm25.configure({"k1": 0.9, "b": 0.5})
    bm25.configure({"b": 0.6})
    assert bm25.SETTINGS == {**bm25.DEFAULTS, "b": 0.6}


@pytest.mark.slow  # two fresh subprocesses (each imports torch)
def test_the_scale_benchmark_runs_both_backends(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bm25_scale.py"
    args = ["--sizes", "300", "--queries", "5", "--depth", "10", "--workdir", str(tmp_path)]
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| bm25s") or line.startswith("| rank_bm25")]
    assert len(rows) == 2 and all("| 300 |" in r and "did not finish" not in r for r in rows), out.stdout
    first = (tmp_path / "corpus_300.jsonl").read_text()
    (tmp_path / "corpus_300.jsonl").unlink()
    subprocess.run([sys.executable, str(script), *args, "--backends", "bm25s"], check=True, capture_output=True)
    assert (tmp_path / "corpus_300.jsonl").read_text() == first  # the generated corpus is deterministic


def test_words_keep_their_combining_marks_and_compose():
    """BM25's words: a Devanagari word keeps its vowel signs (\\w alone left lone consonants that match
    everywhere), a decomposed (NFD) word equals the composed one, a ligature is its letters, case is folded."""
    import unicodedata

    assert bm25.tokens("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert bm25.tokens(unicodedata.normalize("NFD", "Café Zürich")) == bm25.tokens("café zürich") == ["café", "zürich"]
    assert bm25.tokens("ﬁne STRASSE straße, x_2!") == ["fine", "strasse", "strasse", "x_2"]


def test_a_streamed_corpus_reports_each_bad_row_once(tmp_path, world):
    """take() stops part-way through a streamed corpus and a later full pass reads the same rows again: each bad
    row is still reported once to the run's BadRows (on_bad_rows=skip)."""
    _, texts = world
    path = tmp_path / "c.jsonl"
    write_corpus(path, texts[:60])
    lines = path.read_text().splitlines()
    lines[3] = '{"id": "broken", "text": '  # line 4
    path.write_text("\n".join(lines) + "\n")
    bad = BadRows("skip")
    docs = JsonlCorpus(path, stream=True)(bad)
    assert docs.take([10]) and len(docs) == 59 and random_sample(docs=docs, size=5, seed=1)
    assert bad.report()["skipped"] == 1 and "c.jsonl:4" in bad.messages[0], bad.messages
