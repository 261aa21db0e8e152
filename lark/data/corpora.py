"""The corpora sources draw their documents from (data.corpora): each entry a reader `_target_`.

- JsonlCorpus: a local JSON Lines file.
- HubCorpus: a Hugging Face `datasets` dataset, streamed (a hub name or a local folder).
- lark.data.world.WorldCorpus: a part of the generated world (its abstracts or its entertainment text).
A corpus reader is called as reader(bad, qa_reader) with the bad-row policy (lark.data.io.BadRows) and the QA
reader (data.reader, which a corpus may be part of: the world's abstracts), and returns documents {id, text}.
Add your own by giving a corpus a `_target_` with that call.

Without a `_target_`, an entry's one location key names the reader (SHORTHAND): {path: x} is a JsonlCorpus,
{hub_id: x} a HubCorpus, {world: medical_docs} a WorldCorpus. That is the form of command lines
('data.corpora={web: {path: corpus.jsonl}}') and of the configs runs saved before corpora were readers.
"""

import re
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.data.bm25 import tokens
from lark.data.io import chunks, read_jsonl, sha256
from lark.data.records import checked, document, unique
from lark.errors import ConfigError, DataError

SHORTHAND = {
    "path": "lark.data.corpora.JsonlCorpus",
    "hub_id": "lark.data.corpora.HubCorpus",
    "world": "lark.data.world.WorldCorpus",
}

# Words whose presence marks a document as medical when sampling a non-medical control group from a mixed corpus.
MEDICAL_TERMS = frozenset(
    "patient patients clinical disease diseases treatment therapy drug drugs trial trials hospital cancer tumor "
    "symptoms diagnosis medical medicine physician surgery infection vaccine dose doses randomized placebo".split()
)


def medical(doc, terms=MEDICAL_TERMS):
    """Whether a document has one of `terms` (medical vocabulary: left out of a non-medical control group)."""
    return bool(terms.intersection(tokens(doc["text"])))


class Corpus:
    """Documents {id, text} of a reader's (where, record) rows (`rows`, in a subclass): each row checked, ids
    unique, at most `limit` documents (null or 0: all); with `exclude_medical` (true: MEDICAL_TERMS, or a list of
    your own words), documents holding one of those words are left out (a non-medical control group from a mixed
    corpus). With `stream`, the reader gives a Streamed
    corpus (read again when used, never held) instead of a list: for corpora of millions of documents."""

    name = "corpus"
    key = None  # its config key, data.corpora.<name> (set by corpus_reader when it has one): named in errors

    def __init__(self, text_field="text", id_field="id", limit=None, exclude_medical=False, stream=False):
        if not exclude_medical:  # null or 0: keep every document, as false
            exclude_medical = False
        elif not isinstance(exclude_medical, bool):  # a list of words (lower-case: they match casefolded text)
            exclude_medical = sorted(str(word).casefold() for word in exclude_medical)
        self.text_field, self.id_field, self.limit, self.exclude_medical = text_field, id_field, limit, exclude_medical
        self.stream = stream

    def rows(self, bad):
        raise NotImplementedError

    @property
    def where(self):
        """What errors name: the config key and the source, or the source alone."""
        return f"{self.key} ({self.name})" if self.key else self.name

    def document(self, where, record):
        return where, document(record, where, self.text_field, self.id_field)

    def fingerprint(self):
        """What identifies these documents for a saved BM25 index (lark.data.bm25.cached): the reader's settings
        (a subclass adds its source's state)."""
        return {"reader": type(self).__name__, **{k: v for k, v in vars(self).items() if k != "key"}}

    def documents(self, bad):
        """Yield the documents one at a time (what __call__ lists); nothing is kept but the ids seen."""
        seen, n, kept = set(), 0, 0
        terms = MEDICAL_TERMS if self.exclude_medical is True else frozenset(self.exclude_medical or ())
        for where, doc in checked(self.rows(bad), self.document, bad):
            if not unique(doc, seen, where, bad):
                continue
            n += 1
            if not (terms and medical(doc, terms)):
                kept += 1
                yield doc
            if self.limit and n >= self.limit:
                break
        if not n:
            raise DataError(f"{self.where}: no documents")
        if not kept:  # an empty corpus would fail later, in the sources, naming no corpus
            fix = (
                f"limit: {self.limit} counts the documents read, not those kept: raise it"
                if n == self.limit
                else "read a corpus with non-medical documents, or set exclude_medical: false"
            )
            raise DataError(
                f"{self.where}: exclude_medical left out all {n} documents read, each has one of its words "
                f"({'lark.data.corpora.MEDICAL_TERMS' if terms is MEDICAL_TERMS else sorted(terms)}); {fix}"
            )

    def __call__(self, bad, qa_reader=None):
        return Streamed(self, bad) if self.stream else list(self.documents(bad))


class JsonlCorpus(Corpus):
    """The documents of a local JSON Lines file (`path`); a bad line is named by file:line."""

    def __init__(self, path, text_field="text", id_field="id", limit=None, exclude_medical=False, stream=False):
        super().__init__(text_field, id_field, limit, exclude_medical, stream)
        self.path, self.name = path, str(path)

    def fingerprint(self):
        """The settings and the sha256 of the file's bytes: a file rewritten with the same size and its time restored
        (cp -p, rsync -t, tar x) is another corpus (hashing reads it once, far less work than tokenising it)."""
        return super().fingerprint() | {"path": str(Path(self.path).resolve()), "sha256": sha256(chunks(self.path))}

    def rows(self, bad):
        return ((f"{self.path}:{n}", r) for n, r in read_jsonl(self.path, bad))


class HubCorpus(Corpus):
    """The documents of a `datasets` dataset (`hub_id`: a hub name or a local folder), streamed: only the first
    `limit` are read. `revision` pins a hub dataset to a branch, tag or commit: part of the fingerprint, so a saved
    BM25 index is rebuilt when it changes (a hub name left at null, its newest, or at a branch cannot be seen to
    change: the run says so once)."""

    def __init__(
        self,
        hub_id,
        hub_config=None,
        split="train",
        text_field="text",
        id_field="id",
        limit=None,
        exclude_medical=False,
        stream=False,
        revision=None,
    ):
        super().__init__(text_field, id_field, limit, exclude_medical, stream)
        self.hub_id, self.hub_config, self.split, self.name = hub_id, hub_config, split, str(hub_id)
        self.revision = revision

    def fingerprint(self):
        """The settings and, for a local folder, the sha256 of each of its files; a hub name is known by its name
        and revision only (a floating one is logged once: unpinned)."""
        folder = Path(str(self.hub_id))
        if not folder.is_dir():
            self.unpinned()
        files = sorted(folder.rglob("*")) if folder.is_dir() else []
        state = [[f.relative_to(folder).as_posix(), sha256(chunks(f))] for f in files if f.is_file()]
        return super().fingerprint() | {"files": state}

    def unpinned(self, log=print):
        """Log once per run, for a hub dataset whose revision is not a commit (null: its newest, or a branch or tag
        name, which can move), that a saved BM25 index of it is reused without knowing whether it changed."""
        if COMMIT.fullmatch(str(self.revision or "")) or (self.hub_id, self.revision) in UNPINNED:
            return
        UNPINNED.add((self.hub_id, self.revision))
        key = self.key or "data.corpora.<name>"
        at = f"revision {self.revision!r} (a branch or tag can move)" if self.revision else "no revision (its newest)"
        log(
            f"[lark] BM25: {key} streams {self.hub_id} at {at}: a saved index of it is reused without knowing "
            f"whether the dataset changed; pin it to a commit with {key}.revision=<commit sha>"
        )

    def rows(self, bad):
        import datasets  # imported on use: a heavy optional dependency

        pinned = {"revision": str(self.revision)} if self.revision else {}
        rows = datasets.load_dataset(self.hub_id, self.hub_config, split=self.split, streaming=True, **pinned)
        return ((f"{self.hub_id} row {n}", r) for n, r in enumerate(rows))


COMMIT = re.compile(r"[0-9a-fA-F]{40}")  # a full commit hash: the one revision that cannot move
UNPINNED = set()  # the (hub_id, revision) of the hub corpora logged as unpinned in this process


class Streamed:
    """A corpus read again on every use instead of held in memory (Corpus with stream: true): iterating yields its
    documents; len() and take(positions) read it once (the first complete pass also counts it)."""

    def __init__(self, corpus, bad):
        self.corpus, self.bad, self.size, self.reported = corpus, bad, None, set()

    def fingerprint(self):
        return self.corpus.fingerprint()

    def report(self, error):
        """A bad row goes to the run's BadRows the first time a pass meets it (a pass cut short by take() and the
        full pass after it both read the same rows)."""
        if self.bad.mode == "error" or str(error) not in self.reported:
            self.reported.add(str(error))
            self.bad(error)

    def __iter__(self):
        n = 0
        for n, doc in enumerate(self.corpus.documents(self.report), start=1):
            yield doc
        self.size = n

    def __len__(self):
        if self.size is None:
            for _ in self:
                pass
        return self.size

    def __getitem__(self, i):
        return self.take([i])[0]

    def take(self, positions):
        """[document at each position] (positions into the documents, any order), read in one pass."""
        wanted, found = set(positions), {}
        for i, doc in enumerate(self):
            if i in wanted:
                found[i] = doc
                if len(found) == len(wanted):
                    break
        if len(found) < len(wanted):
            raise IndexError(f"{self.corpus.name}: no document at {sorted(wanted - set(found))[:5]}")
        return [found[i] for i in positions]


def corpus_reader(spec, name=None):
    """The reader of one data.corpora entry (`name`: its key, which a Corpus names in errors): its `_target_`, or
    the reader its location key names (SHORTHAND)."""
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    if "_target_" not in spec:
        given = [key for key in SHORTHAND if spec.get(key)]
        if len(given) != 1:
            raise DataError("corpus: give a path (JSON Lines), a hub_id (a datasets name or folder) or a _target_")
        spec = {"_target_": SHORTHAND[given[0]], **spec}
    reader = instantiate(spec)
    if name is not None and isinstance(reader, Corpus):
        reader.key = f"data.corpora.{name}"
    return reader


def check_corpora(corpora):
    """Fail at start (ConfigError naming the key) on a data.corpora entry with no reader, one that cannot be made
    from its keys, or a missing file."""
    for name, spec in corpora.items():
        given = [key for key in SHORTHAND if spec.get(key)]
        if "_target_" not in spec and len(given) != 1:
            raise ConfigError(
                f"data.corpora.{name}: give exactly one of path (JSON Lines), hub_id (a datasets name or folder) "
                f"or world, or a _target_, got {given or 'none'}"
            )
        if spec.get("path") and not Path(spec.path).is_file():
            raise ConfigError(f"data.corpora.{name}.path: {spec.get('path')} is not a file")
        try:
            corpus_reader(spec, name)
        except Exception as e:  # noqa: BLE001 -- hydra wraps a reader's errors of any kind
            raise ConfigError(f"data.corpora.{name}: {str(e).splitlines()[-1]}") from None
