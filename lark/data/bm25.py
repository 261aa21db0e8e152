"""BM25 (Okapi, rank_bm25's defaults k1 = 1.5, b = 0.75, epsilon = 0.25), one interface for every use:
retrieving the medical source (lark.data.sources), Table IV's lexical baseline (lark.checkpoint) and Table V's
BM25 row (lark.validation). Text is lower-cased and cut at non-word characters (`tokens`)."""

import re

import numpy as np
import torch

from lark.console import progress


def tokens(text):
    """The words BM25 indexes: maximal runs of word characters, lower-cased."""
    return re.findall(r"\w+", text.lower())


class BM25:
    """An Okapi BM25 index over `texts`; scores(query) gives [len(texts)] float64 scores."""

    def __init__(self, texts, desc=None):
        from rank_bm25 import BM25Okapi  # imported on use: the corpus readers need no BM25

        texts = progress(texts, desc, unit="doc") if desc else texts
        self.index = BM25Okapi([tokens(t) for t in texts])

    def scores(self, query):
        return self.index.get_scores(tokens(query))

    def matrix(self, queries, desc=None):
        """[n_queries, n_docs] float64 scores."""
        queries = progress(queries, desc) if desc else queries
        return torch.from_numpy(np.stack([self.scores(q) for q in queries]))

    def rankings(self, queries, depth, desc=None):
        """Each query's `depth` best document indices, best first (stable on ties)."""
        queries = progress(queries, desc, unit="query") if desc else queries
        return [np.argsort(-self.scores(q), kind="stable")[:depth] for q in queries]


def source_scores(queries, source_texts):
    """{source: [n_queries, n_docs] float64 scores} of each query against each source's documents, with one index
    over the union of all sources (so that scores are comparable across sources)."""
    names = list(source_texts)
    scores = BM25([t for n in names for t in source_texts[n]]).matrix(queries, "BM25 baseline")
    out, start = {}, 0
    for n in names:
        out[n] = scores[:, start : start + len(source_texts[n])]
        start += len(source_texts[n])
    return out
