"""The schema of metrics.json, one per attributed checkpoint (attribution/epoch_NNN/metrics.json). The writer
(lark.checkpoint.attribute_checkpoint) checks every file against it before writing; the readers (lark.analysis.analyze,
the resume check in lark.checkpoint) check what they read. Numbers may be null (NaN/inf are written as null).

| key            | type            | meaning                                                                     |
|----------------|-----------------|-----------------------------------------------------------------------------|
| epoch          | int             | checkpoint epoch (0 = the base model)                                       |
| accuracy       | number or null  | the evaluation's value when higher is better (Table I's "best" epoch), else null |
| eval           | object          | {metric (accuracy, exact_match, answer_loss...), value, higher_is_better}   |
| lr             | number or null  | the epoch's learning rate (null for epoch 0)                                 |
| fingerprint    | str or null     | hash of everything the epoch's attribution depends on (resume)             |
| n_queries      | int             | test queries attributed                                                      |
| sources        | object          | {source: {mean_max, ft_wins, n_nonfinite, n_docs, kind, corpus, formatted}}  |
| ft_source, pt_source | str       | the sources of the FT/PT ratio (conf/source)                                |
| ft, pt, ft_pt_ratio, ft_wins, pt_wins | number or null | the paper's metrics (lark.analysis.metrics)                |
| format_effect  | object          | {content: MeanMax(formatted) / MeanMax(noformat)}                           |
| bm25           | object or null  | {ft_wins, pt_wins, sources: {source: {mean_max}}}: the lexical baseline     |
| storage        | object          | {n_params, grad_dtype_bytes, k, store_dtype_bytes, n_examples,              |
|                |                 |  full_bytes_per_example, store_bytes_per_example}                           |
| projector      | object          | the projector's spec (kind, k, seed, ...)                                   |
| nonfinite      | object          | {count, ids: {set: [example id]}}: examples left out for a non-finite gradient |
| fingerprints   | object          | {checkpoint, tokenizer, format}                                             |

Only epoch, sources, ft_source and pt_source are required of a file (runs from older versions lack the others).
"""

from numbers import Number

from lark.errors import CorruptFile

NUMBER = (Number, type(None))
OBJECT = (dict,)
FIELDS = {
    "epoch": ((int,), True),
    "accuracy": (NUMBER, False),
    "eval": (OBJECT, False),
    "lr": (NUMBER, False),
    "fingerprint": ((str, type(None)), False),
    "n_queries": ((int,), False),
    "sources": (OBJECT, True),
    "ft_source": ((str,), True),
    "pt_source": ((str,), True),
    "ft": (NUMBER, False),
    "pt": (NUMBER, False),
    "ft_pt_ratio": (NUMBER, False),
    "ft_wins": (NUMBER, False),
    "pt_wins": (NUMBER, False),
    "format_effect": (OBJECT, False),
    "bm25": ((dict, type(None)), False),
    "storage": (OBJECT, False),
    "projector": (OBJECT, False),
    "nonfinite": (OBJECT, False),
    "fingerprints": (OBJECT, False),
}
SOURCE_FIELDS = {
    "mean_max": NUMBER,
    "ft_wins": NUMBER,
    "n_nonfinite": (int,),
    "n_docs": (int,),
    "kind": (str,),
    "corpus": (str, type(None)),
    "formatted": (bool,),
}
EVAL_FIELDS = {"metric": (str,), "value": NUMBER, "higher_is_better": (bool,)}
BM25_FIELDS = {"ft_wins": NUMBER, "pt_wins": NUMBER, "sources": OBJECT}
STORAGE_FIELDS = dict.fromkeys(
    (
        "n_params",
        "grad_dtype_bytes",
        "k",
        "store_dtype_bytes",
        "n_examples",
        "full_bytes_per_example",
        "store_bytes_per_example",
    ),
    NUMBER,
)


def check(metrics, where):
    """The metrics, unchanged, if they follow the schema; else CorruptFile naming the file and the key.
    The numbers the tables and the report format (format_effect, bm25, storage) are checked to the leaf: a string
    there failed later, far from the file, as "Unknown format code 'f' for object of type 'str'"."""

    def fail(key, problem):
        raise CorruptFile(f"{where}: {key} {problem} (see lark/analysis/schema.py)")

    if not isinstance(metrics, dict):
        fail("the file", f"must be a JSON object, got {type(metrics).__name__}")
    for key, (types, required) in FIELDS.items():
        if key not in metrics:
            if required:
                fail(key, "is missing")
        elif problem := wrong_type(metrics[key], types):
            fail(key, problem)
    for key, value, fields in nested(metrics):
        if not isinstance(value, dict):
            fail(key, "must be an object")
        for name, types in (fields or dict.fromkeys(value, NUMBER)).items():
            if name in value and (problem := wrong_type(value[name], types)):
                fail(f"{key}.{name}", problem)
    for key in ("ft_source", "pt_source"):
        if metrics[key] not in metrics["sources"]:
            fail(key, f"'{metrics[key]}' is not one of the sources")
    return metrics


def nested(metrics):
    """(dotted key, object, {field: types}, or None: every field a number) of the objects inside metrics.json."""
    bm25 = metrics.get("bm25") or {}
    out = [(f"sources.{name}", s, SOURCE_FIELDS) for name, s in metrics["sources"].items()]
    out += [("eval", metrics["eval"], EVAL_FIELDS)] if "eval" in metrics else []
    out += [("format_effect", metrics["format_effect"], None)] if "format_effect" in metrics else []
    out += [("storage", metrics["storage"], STORAGE_FIELDS)] if "storage" in metrics else []
    out += [("bm25", bm25, BM25_FIELDS)] if bm25 else []
    if isinstance(bm25, dict) and isinstance(bm25.get("sources"), dict):
        out += [(f"bm25.sources.{name}", s, {"mean_max": NUMBER}) for name, s in bm25["sources"].items()]
    return out


def wrong_type(value, types):
    """What is wrong with value's type (None: nothing); a bool is no number (JSON true is not 1)."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return None
    return f"must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}"
