"""The data sources whose influence is measured, and the test queries.

- finetune: the fine-tuning QA items.
- medical: documents BM25-retrieved from the medical corpus with the test questions (round robin over the
  queries' rankings: every query's best document first, then every query's second, ...), de-duplicated, up to N.
- entertainment: N documents drawn at random (seeded) from the entertainment corpus.
Each source is Formatted (QA fields, rendered with the fine-tuning template) or NoFormat (raw text).
"""
from lark.console import progress
from lark.data import sample
from lark.formats import document_fields, qa_fields
from lark.metrics import bm25_tokens

# Words whose presence marks a document as medical when sampling a non-medical control group from a mixed corpus.
MEDICAL_TERMS = frozenset(
    "patient patients clinical disease diseases treatment therapy drug drugs trial trials hospital cancer tumor "
    "symptoms diagnosis medical medicine physician surgery infection vaccine dose doses randomized placebo".split())


def bm25_retrieve(queries, docs, n, per_query=10):
    """Up to n distinct documents, taking each query's rank-1 hit, then each query's rank-2 hit, and so on."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([bm25_tokens(d["text"]) for d in progress(docs, "BM25 indexing", unit="doc")])
    rankings = [np.argsort(-index.get_scores(bm25_tokens(q)), kind="stable")[:per_query]
                for q in progress(queries, "BM25 retrieval", unit="query")]
    picked, seen_ids, seen_text = [], set(), set()
    for rank in range(per_query):
        for ranking in rankings:
            if len(picked) >= n:
                return picked
            if rank >= len(ranking):
                continue
            doc = docs[ranking[rank]]
            text_key = " ".join(doc["text"].lower().split())
            if doc["id"] in seen_ids or text_key in seen_text:
                continue
            seen_ids.add(doc["id"])
            seen_text.add(text_key)
            picked.append(doc)
    return picked


def non_medical(docs):
    return [d for d in docs if not MEDICAL_TERMS.intersection(bm25_tokens(d["text"]))]


def select_documents(source_cfg, test_items, corpora, seed):
    """{kind: documents} for the pretraining kinds used by the configured sources."""
    kinds = {s.kind for s in source_cfg.sources.values()}
    chosen = {}
    if "medical" in kinds:
        queries = [item["question"] for item in test_items]
        chosen["medical"] = bm25_retrieve(queries, corpora["medical"], source_cfg.size, source_cfg.bm25_per_query)
    if "entertainment" in kinds:
        docs = corpora["entertainment"]
        if corpora.get("exclude_medical"):
            docs = non_medical(docs)
        chosen["entertainment"] = sample(docs, source_cfg.size, seed)
    return chosen


def build_sources(source_cfg, fmt, train_items, test_items, corpora, seed):
    """{source name: [example]} where an example is QA fields {id, question, context, answer} or {id, text}."""
    documents = select_documents(source_cfg, test_items, corpora, seed)
    sets = {}
    for name, spec in source_cfg.sources.items():
        if spec.kind == "finetune":
            sets[name] = [qa_fields(item, fmt.answer_template) for item in train_items[: source_cfg.size]]
        elif spec.kind in documents:
            docs = documents[spec.kind]
            sets[name] = [document_fields(d) for d in docs] if spec.formatted else [
                {"id": d["id"], "text": d["text"]} for d in docs]
        else:
            raise ValueError(f"source.sources.{name}.kind: unknown kind '{spec.kind}' "
                             "(finetune, medical or entertainment)")
        if not sets[name]:
            raise ValueError(f"source.sources.{name}: no documents selected")
    return sets


def query_examples(test_items, fmt, answers=None):
    """The test queries as QA fields; `answers` (e.g. the model's predictions) replace the gold labels."""
    if answers is not None:
        test_items = [dict(item, final_decision=a) for item, a in zip(test_items, answers)]
    return [qa_fields(item, fmt.answer_template) for item in test_items]


def example_text(example):
    """The plain text of an example (BM25 baseline)."""
    if "text" in example:
        return example["text"]
    return " ".join([example["question"], example["context"], example["answer"]])
