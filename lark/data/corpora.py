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

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.data.bm25 import tokens
from lark.data.io import read_jsonl
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


def non_medical(docs):
    return [d for d in docs if not MEDICAL_TERMS.intersection(tokens(d["text"]))]


class Corpus:
    """Documents {id, text} of a reader's (where, record) rows (`rows`, in a subclass): each row checked, ids
    unique, at most `limit` documents (null or 0: all); with `exclude_medical`, documents with medical vocabulary
    are left out (a non-medical control group from a mixed corpus)."""

    name = "corpus"

    def __init__(self, text_field="text", id_field="id", limit=None, exclude_medical=False):
        self.text_field, self.id_field, self.limit, self.exclude_medical = text_field, id_field, limit, exclude_medical

    def rows(self, bad):
        raise NotImplementedError

    def document(self, where, record):
        return where, document(record, where, self.text_field, self.id_field)

    def __call__(self, bad, qa_reader=None):
        docs, seen = [], set()
        for where, doc in checked(self.rows(bad), self.document, bad):
            if unique(doc, seen, where, bad):
                docs.append(doc)
            if self.limit and len(docs) >= self.limit:
                break
        if not docs:
            raise DataError(f"{self.name}: no documents")
        return non_medical(docs) if self.exclude_medical else docs


class JsonlCorpus(Corpus):
    """The documents of a local JSON Lines file (`path`); a bad line is named by file:line."""

    def __init__(self, path, text_field="text", id_field="id", limit=None, exclude_medical=False):
        super().__init__(text_field, id_field, limit, exclude_medical)
        self.path, self.name = path, str(path)

    def rows(self, bad):
        return ((f"{self.path}:{n}", r) for n, r in read_jsonl(self.path, bad))


class HubCorpus(Corpus):
    """The documents of a `datasets` dataset (`hub_id`: a hub name or a local folder), streamed: only the first
    `limit` are read."""

    def __init__(
        self,
        hub_id,
        hub_config=None,
        split="train",
        text_field="text",
        id_field="id",
        limit=None,
        exclude_medical=False,
    ):
        super().__init__(text_field, id_field, limit, exclude_medical)
        self.hub_id, self.hub_config, self.split, self.name = hub_id, hub_config, split, str(hub_id)

    def rows(self, bad):
        import datasets  # imported on use: a heavy optional dependency

        rows = datasets.load_dataset(self.hub_id, self.hub_config, split=self.split, streaming=True)
        return ((f"{self.hub_id} row {n}", r) for n, r in enumerate(rows))


def corpus_reader(spec):
    """The reader of one data.corpora entry: its `_target_`, or the reader its location key names (SHORTHAND)."""
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    if "_target_" not in spec:
        given = [key for key in SHORTHAND if spec.get(key)]
        if len(given) != 1:
            raise DataError("corpus: give a path (JSON Lines), a hub_id (a datasets name or folder) or a _target_")
        spec = {"_target_": SHORTHAND[given[0]], **spec}
    return instantiate(spec)


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
            corpus_reader(spec)
        except Exception as e:  # noqa: BLE001 -- hydra wraps a reader's errors of any kind
            raise ConfigError(f"data.corpora.{name}: {str(e).splitlines()[-1]}") from None
