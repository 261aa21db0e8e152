"""The data sources whose influence is measured, and the test queries.

A source is `{kind, corpus, size, formatted}` (conf/source). Its kind names an entry of `source.kinds`, a
`_target_` config built with hydra.utils.instantiate (add your own kind there); the shipped kinds:
- finetune: every fine-tuning QA item, or the first `size` when the source sets a size of its own.
- retrieve: documents BM25-retrieved from the corpus with the test questions (round robin over the queries'
  rankings: every query's best document first, then every query's second, ...), de-duplicated, up to `size`.
- sample: `size` documents drawn at random (seeded) from the corpus.
- all: every document of the corpus.
A kind is called with keyword arguments docs (the corpus, None for finetune), train_items, test_items, size and
seed, and returns QA items or documents {id, text}. QA items become QA fields; documents are Formatted (QA fields,
rendered with the fine-tuning template) or NoFormat (raw text).
"""

import hashlib
import random

from hydra.utils import instantiate

from lark.data import bm25
from lark.data.formats import document_fields, qa_fields
from lark.data.readers import sample
from lark.errors import ConfigError, DataError


def corpus_key(docs):
    """What identifies a corpus for a saved BM25 index: a streamed corpus's fingerprint (its config and file
    state), else a hash of every document's id and text."""
    if hasattr(docs, "fingerprint"):
        return docs.fingerprint()
    digest = hashlib.sha256()
    for d in docs:
        digest.update(f"{len(d['id'])}:{d['id']}{len(d['text'])}:".encode() + d["text"].encode())
    return digest.hexdigest()


def take(docs, positions):
    """The documents at `positions` (a streamed corpus reads them in one pass)."""
    return docs.take(positions) if hasattr(docs, "take") else [docs[i] for i in positions]


def bm25_retrieve(queries, docs, n, per_query=10, index_dir=None):
    """Up to n distinct documents, taking each query's rank-1 hit, then each query's rank-2 hit, and so on; a
    document that shares no word with the query (bm25.tokens) is no hit, so a source short of matches is warned
    about (lark.notices) instead of filled with unrelated documents (a score of 0 is no test: a word in half the
    documents has idf 0). docs: a list or a streamed corpus
    (lark.data.corpora.Streamed), indexed in chunks; index_dir: where the index is saved and reused
    (lark.data.bm25.cached)."""
    index = bm25.cached(lambda: (d["text"] for d in docs), corpus_key(docs), index_dir, "BM25 indexing")
    rankings = index.rankings(queries, per_query, "BM25 retrieval")
    words = [set(bm25.tokens(q)) for q in queries]
    positions = sorted({int(i) for ranking in rankings for i in ranking})
    found = dict(zip(positions, take(docs, positions)))
    picked, seen_ids, seen_text = [], set(), set()
    for rank in range(per_query):
        for ranking, query_words in zip(rankings, words):
            if len(picked) >= n:
                return picked
            if rank >= len(ranking):
                continue
            doc = found[int(ranking[rank])]
            if query_words.isdisjoint(bm25.tokens(doc["text"])):
                continue
            text_key = " ".join(doc["text"].lower().split())
            if doc["id"] in seen_ids or text_key in seen_text:
                continue
            seen_ids.add(doc["id"])
            seen_text.add(text_key)
            picked.append(doc)
    return picked


# ------------------------------------------------------------------------------------ the shipped source kinds
def finetune(train_items, size, **_):
    """The first `size` fine-tuning items (None: all of them)."""
    return train_items[:size]


def retrieve(docs, test_items, size, per_query=10, index_dir=None, **_):
    """BM25 with the test questions as queries (round robin, de-duplicated)."""
    return bm25_retrieve([item["question"] for item in test_items], docs, size, per_query, index_dir)


def random_sample(docs, size, seed, **_):
    """`size` documents drawn without replacement (seeded), in corpus order (lark.data.readers.sample; a streamed
    corpus is read once for them)."""
    if not hasattr(docs, "take") or size >= len(docs):
        return sample(docs, size, seed)
    return docs.take(sorted(random.Random(seed).sample(range(len(docs)), size)))


def every_document(docs, **_):
    return list(docs)


# --------------------------------------------------------------------------------------------- building
def selectors(source_cfg):
    """{kind: callable} of `source.kinds` (each a `_target_` config)."""
    return {kind: instantiate(spec, _partial_=True) for kind, spec in source_cfg.kinds.items()}


SOURCE_KEYS = ("kind", "corpus", "formatted", "size")  # a source.sources entry's keys (conf/source/default.yaml)


def check_sources(source_cfg, corpus_names):
    """Fail at start (ConfigError naming the key) on a source with an unknown key, kind or corpus."""
    kinds = list(source_cfg.kinds)
    for name, spec in source_cfg.sources.items():
        unknown = [key for key in spec if key not in SOURCE_KEYS]
        if unknown:  # a misspelt size or corpus was dropped silently
            raise ConfigError(f"source.sources.{name}.{unknown[0]}: unknown key ({', '.join(SOURCE_KEYS)})")
        if not isinstance(spec.get("formatted"), bool):
            raise ConfigError(f"source.sources.{name}.formatted must be true or false, got {spec.get('formatted')!r}")
        if spec.get("kind") not in kinds:
            raise ConfigError(
                f"source.sources.{name}.kind: unknown '{spec.get('kind')}' ({', '.join(kinds)}; "
                "or add source.kinds.<kind> with a _target_)"
            )
        corpus = spec.get("corpus")
        if corpus is not None and corpus not in corpus_names:
            raise ConfigError(
                f"source.sources.{name}.corpus: unknown '{corpus}' (data.corpora has "
                f"{', '.join(corpus_names) or 'none'})"
            )
        if corpus is None and spec.kind != "finetune":
            raise ConfigError(
                f"source.sources.{name}.corpus: a '{spec.kind}' source needs a corpus "
                f"(one of data.corpora: {', '.join(corpus_names) or 'none'})"
            )
        size = source_size(source_cfg, spec)
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise ConfigError(f"source.sources.{name}.size must be a positive integer, got {size}")


def source_size(source_cfg, spec):
    """How many examples a source asks for: its own `size`, else source.size -- except a `finetune` source, which
    takes every fine-tuning item unless it names a size of its own (None = all)."""
    return spec.get("size", None if spec.kind == "finetune" else source_cfg.size)


def shortfalls(source_cfg, sets, n_train):
    """[(source, got, asked, kind)] of the sources that hold fewer examples than they asked for (a corpus smaller
    than the size, BM25 candidates exhausted) or, for `finetune`, fewer than the fine-tuning items."""
    found = []
    for name, spec in source_cfg.sources.items():
        asked = source_size(source_cfg, spec)
        asked = n_train if spec.kind == "finetune" else asked
        if asked is not None and spec.kind != "all" and len(sets[name]) < asked:
            found.append((name, len(sets[name]), asked, spec.kind))
    return found


def build_sources(source_cfg, fmt, train_items, test_items, corpora, seed):
    """{source name: [example]} where an example is QA fields {id, question, context, answer} or {id, text}.
    corpora: {name: [document]}. Sources with the same kind, corpus and size share one selection. source.bm25
    sets the BM25 of this run (lark.data.bm25.configure)."""
    check_sources(source_cfg, list(corpora))
    bm25.configure(source_cfg.get("bm25"))
    select, chosen, sets = selectors(source_cfg), {}, {}
    for name, spec in source_cfg.sources.items():
        size = source_size(source_cfg, spec)
        key = (spec.kind, spec.get("corpus"), size)
        if key not in chosen:
            chosen[key] = select[spec.kind](
                docs=corpora.get(spec.get("corpus")),
                train_items=train_items,
                test_items=test_items,
                size=size,
                seed=seed,
            )
        picked = chosen[key]
        if picked and "question" in picked[0]:
            sets[name] = [qa_fields(item, fmt.answer_template) for item in picked]
        else:
            sets[name] = (
                [document_fields(d) for d in picked]
                if spec.formatted
                else [{"id": d["id"], "text": d["text"]} for d in picked]
            )
        if not sets[name]:
            raise DataError(
                f"source.sources.{name}: no documents selected (kind {spec.kind}, corpus {spec.get('corpus')}: an "
                "empty fine-tuning file or corpus, or nothing retrieved)"
            )
    return sets


def query_examples(test_items, fmt, answers=None):
    """The test queries as QA fields; `answers` (e.g. the model's predictions) replace the gold answers."""
    if answers is not None:
        test_items = [dict(item, answer=a) for item, a in zip(test_items, answers)]
    return [qa_fields(item, fmt.answer_template) for item in test_items]


def example_text(example):
    """The plain text of an example (BM25 baseline)."""
    if "text" in example:
        return example["text"]
    return " ".join([example["question"], example["context"], example["answer"]])
