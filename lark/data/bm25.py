"""BM25 (Okapi, rank_bm25's BM25Okapi: k1 = 1.5, b = 0.75, epsilon = 0.25), one interface for every use:
retrieving the medical source (lark.data.sources), Table IV's lexical baseline (lark.checkpoint) and Table V's
BM25 row (lark.validation). Text is lower-cased and cut at non-word characters (`tokens`).

Okapi as rank_bm25 computes it, for a query word w and a document d (f: count of w in d; |d|: words in d; N
documents, n of them containing w; avgdl: mean |d|):
  idf(w) = ln((N - n + 0.5) / (n + 0.5)); a negative idf (n > N / 2) is replaced by epsilon x the mean idf of the
           corpus's words
  score(q, d) = sum over the query's words (a repeated word counts each time) of
                idf(w) f (k1 + 1) / (f + k1 (1 - b + b |d| / avgdl))

Two backends give these scores (source.bm25.backend; tests/test_bm25.py holds them to the same top-k):
- bm25s (default): a sparse [documents x words] matrix of the per-word terms above, stored and queried by bm25s
  (its CSC index: one row of weights per word, a query sums its words' rows). LARK counts the words and computes
  the weights itself: no bm25s method is rank_bm25's Okapi ("robertson" clamps a negative idf to 0 and leaves out
  the (k1 + 1) factor, "lucene" uses ln(1 + ...), "atire" ln(N / n)). The index is built from texts in chunks,
  keeping word counts, never the texts, and can be saved and loaded (`cached`).
- rank_bm25: the pure-Python reference (a dict per document; every query scores every document in Python).
"""

import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import regex
import torch
import yaml

from lark.console import progress
from lark.data.io import check_manifest, replacing_folder, write_manifest
from lark.errors import ConfigError, CorruptFile
from lark.fingerprints import content_hash

TOKEN_PATTERN = r"[\p{L}\p{M}\p{N}_]+"  # the tokenisation (on NFKC, case-folded text), part of a saved index's key
# source.bm25 as `configure` last set it, over its shipped values (DEFAULTS: conf/source/bm25/default.yaml's, read
# from the file so the two never drift; index_dir is the retrieve kind's).
SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "source" / "bm25" / "default.yaml"
DEFAULTS = {key: value for key, value in yaml.safe_load(SHIPPED.read_text()).items() if key != "index_dir"}
SETTINGS = dict(DEFAULTS)


def tokens(text):
    """The words BM25 indexes: maximal runs of letters, combining marks, digits and _ (a Devanagari or Thai word
    keeps its vowel signs; \\w alone split it into lone consonants), on NFKC-normalised, case-folded text (a
    decomposed "café" is the composed one)."""
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


WORD = regex.compile(TOKEN_PATTERN)


def configure(cfg=None):
    """Set the BM25 every caller gets (source.bm25: backend, k1, b, epsilon, chunk, dtype), keys left out at their
    shipped values (not at a previous sweep job's); unknown keys or backends fail naming the key."""
    SETTINGS.update(DEFAULTS)
    for key in cfg or {}:
        if key == "index_dir":  # read by the retrieve kind (conf/source/kinds), not here
            continue
        if key not in SETTINGS:
            raise ConfigError(f"source.bm25.{key}: unknown key ({', '.join(SETTINGS)} or index_dir)")
        SETTINGS[key] = cfg[key]
    if SETTINGS["backend"] not in BACKENDS:
        raise ConfigError(f"source.bm25.backend: unknown '{SETTINGS['backend']}' ({', '.join(BACKENDS)})")
    if SETTINGS["dtype"] not in ("float32", "float64"):
        raise ConfigError(f"source.bm25.dtype: float32 or float64, got '{SETTINGS['dtype']}'")


# ------------------------------------------------------------------------------------------- counting words
def chunks(iterable, size):
    """Lists of up to `size` consecutive items."""
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def smallest(values, limit):
    """values as uint16 when all are below 2^16 (the usual case: 2 bytes an entry while the corpus is read), else
    as int32 (values below `limit`)."""
    return values.astype(np.uint16 if limit <= 2**16 else np.int32)


def count_chunk(texts, vocab):
    """One chunk's word counts, by word: (words [k] int32 distinct word ids, ascending; per_word [k] int64 entries of
    each; rows [nnz] documents (within the chunk), by word then document; counts [nnz]; lengths [n] int64 words
    per document). New words join `vocab` {word: id}."""
    ids, lengths = [], []
    for text in texts:
        words = tokens(text)
        lengths.append(len(words))
        ids.extend([vocab.setdefault(w, len(vocab)) for w in words])
    lengths = np.array(lengths, dtype=np.int64)
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    pairs, counts = np.unique(np.array(ids, dtype=np.int64) * len(lengths) + doc, return_counts=True)
    word, row = np.divmod(pairs, len(lengths))  # sorted by word, then document
    words, per_word = np.unique(word, return_counts=True)
    most = int(counts.max()) + 1 if len(counts) else 0
    return words.astype(np.int32), per_word, smallest(row, len(lengths)), smallest(counts, most), lengths


class Counts:
    """Word counts of a corpus read chunk by chunk (`add`): per chunk, its documents' distinct words and counts;
    the texts themselves are not kept."""

    def __init__(self):
        self.vocab, self.parts, self.lengths, self.n = {}, [], [], 0

    def add(self, texts):
        *part, lengths = count_chunk(texts, self.vocab)
        self.parts.append((*part, self.n))
        self.lengths.append(lengths)
        self.n += len(lengths)

    def okapi(self, k1, b, epsilon, dtype):
        """The CSC arrays (data [nnz] dtype, indices [nnz] int32 documents, indptr [V + 1] int64) of the [N, V]
        matrix of Okapi terms idf(w) f (k1 + 1) / (f + k1 (1 - b + b |d| / avgdl)); the chunks are consumed."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        n_words = len(self.vocab)
        df = np.zeros(n_words, dtype=np.int64)
        for words, per_word, *_ in self.parts:
            df[words] += per_word
        idf = okapi_idf(df, len(lengths), epsilon)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-300)) if len(lengths) else lengths
        indptr = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        data, indices, filled = np.empty(indptr[-1], dtype), np.empty(indptr[-1], np.int32), indptr[:-1].copy()
        while self.parts:  # each chunk's entries go after the earlier chunks' entries of the same word
            words, per_word, rows, counts, first_row = self.parts.pop(0)
            rows, word = rows.astype(np.int64) + first_row, np.repeat(words, per_word)
            start = np.repeat(filled[words] - np.cumsum(per_word) + per_word, per_word)
            at = start + np.arange(len(rows))
            data[at] = idf[word] * counts * (k1 + 1) / (counts + norm[rows])
            indices[at] = rows
            filled[words] += per_word
        self.lengths = []
        return data, indices, indptr


def okapi_idf(df, n_docs, epsilon):
    """[V] float64 rank_bm25 idf: ln((N - n + 0.5) / (n + 0.5)), negatives replaced by epsilon x the mean idf."""
    idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
    if len(idf):
        idf[idf < 0] = epsilon * idf.mean()
    return idf


# ------------------------------------------------------------------------------------------------ backends
class Bm25sIndex:
    """The Okapi terms as a bm25s index (bm25s.BM25 holding LARK's weights; its `method` is not used)."""

    def __init__(self, texts, k1, b, epsilon, chunk, dtype, **_):
        import bm25s  # imported on use: the corpus readers need no BM25

        counts = Counts()
        for part in chunks(texts, chunk):
            counts.add(part)
            part.clear()  # let this chunk's texts go before the next chunk is read
        data, indices, indptr = counts.okapi(k1, b, epsilon, dtype)
        self.index = bm25s.BM25(k1=k1, b=b, method="atire", dtype=dtype, int_dtype="int32")
        self.index.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": counts.n}
        self.index.vocab_dict, self.index.nonoccurrence_array = counts.vocab, None
        self.index.unique_token_ids_set = set(counts.vocab.values())

    def __len__(self):
        return self.index.scores["num_docs"]

    def scores(self, words):
        ids = [self.index.vocab_dict[w] for w in words if w in self.index.vocab_dict]
        if not ids:  # no query word in the corpus (bm25s would fail on an empty vocabulary)
            return np.zeros(len(self), dtype=np.float64)
        return self.index.get_scores_from_ids(ids).astype(np.float64)

    def save(self, directory):
        self.index.save(directory, show_progress=False)

    @classmethod
    def load(cls, directory):
        import bm25s

        out = cls.__new__(cls)
        out.index = bm25s.BM25.load(directory, mmap=True, show_progress=False)
        return out


class RankBm25Index:
    """rank_bm25's BM25Okapi (the reference): every text's words held, a dict per document."""

    def __init__(self, texts, k1, b, epsilon, **_):
        from rank_bm25 import BM25Okapi

        self.index = BM25Okapi([tokens(t) for t in texts], k1=k1, b=b, epsilon=epsilon)

    def __len__(self):
        return self.index.corpus_size

    def scores(self, words):
        return self.index.get_scores(words)


BACKENDS = {"bm25s": Bm25sIndex, "rank_bm25": RankBm25Index}


# --------------------------------------------------------------------------------------------- the interface
class BM25:
    """An Okapi BM25 index over `texts` (any iterable of strings; the bm25s backend reads it once, in chunks);
    scores(query) gives [len(texts)] float64 scores. backend and the parameters default to SETTINGS."""

    def __init__(self, texts, desc=None, **settings):
        self.settings = SETTINGS | settings
        texts = progress(texts, desc, unit="doc") if desc else texts
        self.index = BACKENDS[self.settings["backend"]](texts, **self.settings) if texts is not None else None

    def __len__(self):
        return len(self.index)

    def scores(self, query):
        return self.index.scores(tokens(query))

    def matrix(self, queries, desc=None):
        """[n_queries, n_docs] float64 scores."""
        queries = progress(queries, desc) if desc else queries
        return torch.from_numpy(np.stack([self.scores(q) for q in queries]))

    def rankings(self, queries, depth, desc=None):
        """Each query's `depth` best document indices, best first (ties: the lower index first, as a stable sort
        of every score would give)."""
        queries = progress(queries, desc, unit="query") if desc else queries
        return [top(self.scores(q), depth) for q in queries]

    def save(self, directory):
        """Write the index (bm25s only) to `directory` whole or not at all (a half-written one is never loaded),
        with its checksums.json (lark.data.io.write_manifest: `cached` verifies it before reuse); the temporaries
        of killed saves of the same index are removed."""
        directory = Path(directory)
        for stale in directory.parent.glob(f"{directory.name}.tmp*"):
            if not alive(stale.name.rsplit(".tmp", 1)[1]):
                shutil.rmtree(stale, ignore_errors=True)
        with replacing_folder(directory) as tmp:
            self.index.save(tmp)
            (tmp / "lark_bm25.json").write_text(json.dumps(self.settings, sort_keys=True))
            write_manifest(tmp)

    @classmethod
    def load(cls, directory):
        """The index `save` wrote (its arrays memory-mapped)."""
        out = cls(None, **json.loads((Path(directory) / "lark_bm25.json").read_text()))
        out.index = BACKENDS[out.settings["backend"]].load(directory)
        return out


def alive(pid):
    """Whether process `pid` (a string of digits) is running: a save's temporary of a live one is left alone."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def top(scores, depth):
    """The `depth` best indices of [N] scores, best first, ties by lower index (= np.argsort(-scores,
    kind="stable")[:depth] without sorting all N)."""
    if depth >= len(scores):
        return np.argsort(-scores, kind="stable")
    if depth <= 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(scores, len(scores) - depth)[len(scores) - depth]
    candidates = np.flatnonzero(scores >= threshold)
    return candidates[np.argsort(-scores[candidates], kind="stable")][:depth]


def index_key(corpus_key, settings=None):
    """The name a saved index goes by: a hash of what identifies the corpus (its config and file state, or its
    content), the tokenisation and the BM25 settings (but the chunk size, which changes nothing in the index)."""
    settings = {k: v for k, v in (SETTINGS | (settings or {})).items() if k != "chunk"}
    return content_hash("bm25", corpus_key, TOKEN_PATTERN, settings)


def cached(texts, corpus_key, directory, desc=None, log=print):
    """The bm25s index of texts() (a callable giving the texts, called only when no saved index has this corpus
    and these settings), saved under directory/<index_key> and reused from there. directory None: not saved."""
    if directory is None or SETTINGS["backend"] != "bm25s":
        return BM25(texts(), desc)
    path = Path(directory) / index_key(corpus_key)
    if (path / "lark_bm25.json").is_file():
        try:
            if check_manifest(path):
                log(f"[lark] BM25: reusing the index in {path}")
                return BM25.load(path)
            log(f"[lark] BM25: {path} has no checksums.json (saved before LARK checksummed it): indexed again")
        except (CorruptFile, OSError, ValueError) as e:
            log(f"[lark] BM25: the saved index is not used ({str(e).splitlines()[0]}): indexed again")
    index = BM25(texts(), desc)
    index.save(path)
    log(f"[lark] BM25: {len(index)} documents indexed, saved in {path}")
    return index


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
