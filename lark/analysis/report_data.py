"""What a run's report page shows, read from the run's files: its config and overrides, the test questions, each
source's documents, the top influences and predictions of every attributed checkpoint, the world's provenance and
the timings. All optional except attribution/epoch_NNN/metrics.json: a missing piece leaves its part empty; one
that is there but unreadable fails, naming the file (and the line): the page would show a run without it.

    data = run_data(run_dir, metrics, epoch, snippet_chars)   # the JSON blob lark/resources/report.js renders

Files read: .hydra/config.yaml or checkpoints/epoch_000/lark_config.yaml, .hydra/overrides.yaml, data/test.jsonl,
data/sources/*.jsonl, data/world/provenance.json, attribution/epoch_NNN/{top_influences.csv, predictions.jsonl} and,
when the run wrote them, attribution/epoch_NNN/tokens/<source>.jsonl (token-wise attribution: read_tokens).
"""

import itertools
import re
from datetime import datetime, timezone

from lark.analysis.runs import read_json_object, reduced_lr_epochs, shaped
from lark.data.io import read_jsonl, read_yaml
from lark.errors import CorruptFile, DataError
from lark.kernel.stores import read_top_influences
from lark.kernel.tokens import TOP_TOKENS, by_character
from lark.rundir import RUN_CONFIG

LEVELS = 25  # shades per sign of a token's contribution on the page: level = round(LEVELS * c / max |c|)
SHADES = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxy"  # level -25 .. 25 as one character; "." no loss


def query_targets(run_dir, metrics):
    """{epoch: "gold" | "predicted"}: the answer whose loss each checkpoint's scores used, as its metrics.json
    records it (attribute.py may have re-attributed with another attribution.query_target), else the run's config."""
    default = dotted(read_config(run_dir), "attribution.query_target") or "gold"
    return {str(m["epoch"]): (m.get("loss_target") or {}).get("query_target") or default for m in metrics}


def read_config(run_dir):
    """The run's resolved config as a dict: the one it was started with (<run>/lark_config.yaml), else its epoch 0
    checkpoint's (runs from before that file), else .hydra's (whose interpolations are not resolved)."""
    candidates = (
        run_dir / RUN_CONFIG,
        run_dir / "checkpoints" / "epoch_000" / RUN_CONFIG,
        run_dir / ".hydra" / "config.yaml",
    )
    for path in candidates:
        if path.is_file():
            return shaped(read_yaml(path) or {}, dict, path)
    return {}


def dotted(config, key):
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def rows(path):
    return [record for _, record in read_jsonl(path)] if path.is_file() else []


def doc_text(example):
    """What a reader sees of an example: raw text, or question / context / answer of a QA-shaped one."""
    if "text" in example:
        return example["text"]
    parts = [example.get("question", ""), example.get("context", "") or " ".join(example.get("contexts", []))]
    answer = example.get("answer", example.get("final_decision"))
    return "\n".join(p for p in parts if p) + (f"\nAnswer: {answer}" if answer is not None else "")


def epoch_dir(run_dir, epoch):
    return run_dir / "attribution" / f"epoch_{epoch:03d}"


def read_top(path, query_index, doc_index):
    """{source: [per query: [doc index, score, doc index, score, ...] by rank]} from a top_influences.csv."""
    top = {source: [[] for _ in query_index] for source in doc_index}
    if not path.is_file():
        return top
    for _, query, source, doc, score in sorted(read_top_influences(path), key=lambda row: row[0]):  # by rank
        q, d = query_index.get(query), doc_index.get(source, {}).get(doc)
        if q is not None and d is not None:
            top[source][q] += [d, round(score, 4)]
    return top


def read_predictions(path, query_index):
    """[per query: [predicted label, loss, correct]] from predictions.jsonl (None when the run did not write it)."""
    if not path.is_file():
        return None
    out = [None] * len(query_index)
    for line, row in read_jsonl(path):
        loss = row.get("loss")
        if not isinstance(row.get("id"), str) or not (loss is None or isinstance(loss, (int, float))):
            raise CorruptFile(
                f"{path}:{line}: expected a string id and a numeric loss, got {row.get('id')!r}, {loss!r}"
            )
        if row["id"] in query_index:
            out[query_index[row["id"]]] = [row.get("predicted"), loss, row.get("correct")]
    return out


def read_provenance(path, tests):
    """{test id: [ids of the documents that carry its fact]} from the world's provenance.json ({test id:
    {pretrain_docs, finetune_items}}); {} without the file (a run on other data)."""
    if not path.is_file():
        return {}
    provenance, out = read_json_object(path), {}
    for t in tests:
        if t["id"] not in provenance:
            continue
        entry = provenance[t["id"]] or {}
        parts = [entry.get(key) or [] for key in ("pretrain_docs", "finetune_items")] if isinstance(entry, dict) else []
        if not parts or not all(isinstance(part, list) for part in parts):
            raise CorruptFile(f"{path}: {t['id']!r} must be an object {{pretrain_docs: [...], finetune_items: [...]}}")
        out[t["id"]] = [*parts[0], *parts[1]]
    return out


def label_set(run_dir, tests, most=10):
    """Are the gold answers a label set (data.answers in the run's config; a run without a config: at most `most`
    distinct answers)? The page then filters by gold label, else by answer-loss thirds."""
    config = read_config(run_dir)
    if "answers" in (config.get("data") or {}):
        return config["data"]["answers"] is not None
    return len({t.get("answer", t.get("final_decision")) for t in tests}) <= most


def timings(run_dir, metrics):
    """(label, text) rows from file modification times: start (the saved config) and each epoch's metrics.json."""
    stamps = [(m["epoch"], epoch_dir(run_dir, m["epoch"]) / "metrics.json") for m in metrics]
    stamps = [(epoch, path.stat().st_mtime) for epoch, path in stamps if path.is_file()]
    starts = [p.stat().st_mtime for p in (run_dir / ".hydra" / "config.yaml",) if p.is_file()]
    out, previous = [], (starts[0] if starts else None)
    if previous is not None:
        out.append(("started", datetime.fromtimestamp(previous, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")))
    for epoch, stamp in sorted(stamps, key=lambda s: s[1]):
        since = f" (+{duration(stamp - previous)})" if previous is not None else ""
        out.append(
            (f"epoch {epoch} attributed", datetime.fromtimestamp(stamp, timezone.utc).strftime("%H:%M:%S") + since)
        )
        previous = stamp
    if starts and stamps:
        out.append(("start to last attribution", duration(max(s for _, s in stamps) - starts[0])))
    return out


def duration(seconds):
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def run_data(run_dir, metrics, epoch, snippet_chars):
    """The JSON blob the page renders questions from (see report.js for the layout)."""
    tests = rows(run_dir / "data" / "test.jsonl")
    query_index = {t["id"]: i for i, t in enumerate(tests)}
    sources = list(dict.fromkeys(s for m in metrics for s in (m.get("sources") or {})))
    docs, doc_index = {}, {}
    for source in sources:
        examples = rows(run_dir / "data" / "sources" / f"{source}.jsonl")
        docs[source] = [[e["id"], doc_text(e), int(bool(e.get("canary")))] for e in examples]
        doc_index[source] = {e["id"]: i for i, e in enumerate(examples)}
    provenance = read_provenance(run_dir / "data" / "world" / "provenance.json", tests)
    epochs = [m["epoch"] for m in metrics]
    top = {str(e): read_top(epoch_dir(run_dir, e) / "top_influences.csv", query_index, doc_index) for e in epochs}
    tokens = read_tokens(run_dir, epochs, top, query_index, doc_index)
    data = {
        "epochs": epochs,
        "epoch": epoch,
        "reduced_lr": reduced_lr_epochs(metrics),  # trained at a lower learning rate (Table II's *)
        "sources": sources,
        "snippet": snippet_chars,
        "target": query_targets(run_dir, metrics),  # {epoch: gold | predicted}: whose loss the scores used
        "ft_source": next((m.get("ft_source") for m in metrics if m.get("ft_source")), None),
        "accuracy": {str(m["epoch"]): m.get("accuracy") for m in metrics},
        "accuracy_metric": next(((m.get("eval") or {}).get("metric") for m in metrics if m.get("eval")), "accuracy"),
        "label_set": label_set(run_dir, tests),
        "queries": [
            {
                "id": t["id"],
                "q": t.get("question", t.get("text", "")),
                "c": t.get("context") or " ".join(t.get("contexts", [])),
                "gold": t.get("answer", t.get("final_decision")),
                "canary": int(bool(t.get("canary"))),
            }
            for t in tests
        ],
        "docs": docs,
        "top": top,
        "pred": {str(e): read_predictions(epoch_dir(run_dir, e) / "predictions.jsonl", query_index) for e in epochs},
        "prov": provenance,
    }
    return data | ({"tokens": tokens} if tokens else {})  # a run without tokens/: the page of before


# ------------------------------------------------------------------------------------------ token-wise attribution


def read_tokens(run_dir, epochs, top, query_index, doc_index):
    """The token-wise attribution of the pairs the page lists (attribution/epoch_NNN/tokens/<source>.jsonl, one line
    per (query, document) pair; the pairs not in `top`, read_top's lists, are left out to keep the page small), or
    None when no checkpoint has a tokens/ folder. Layout (lark/resources/report.js renders it):
    {"levels": LEVELS, "texts": [[text, [gap, length, gap, length, ...] per page token]] (each tokenised text once, in
     UTF-16 code units, JavaScript's string indices, where the files' offsets are Python's code points),
     "kernel": {epoch: kernel}, "split": {epoch: loss | position (attribution.tokens_split)},
     "pairs": {epoch: {source: {query index: {doc index:
        [doc text index, doc shades, doc top, query text index, query shades, query top]}}}}}
    A page token is a file's token, or a character split over byte tokens with their contributions added
    (lark.kernel.tokens.by_character). shades: one character per page token (SHADES[level + LEVELS], "." where
    the token carries no loss, ".n" for n such tokens in a row); top: the TOP_TOKENS largest |contribution| page
    tokens as [page token index, contribution (4 significant digits)] by |c|."""
    folders = {e: epoch_dir(run_dir, e) / "tokens" for e in epochs}
    if not any(folder.is_dir() for folder in folders.values()):
        return None
    texts, kernel, split, pairs = {}, {}, {}, {}
    for epoch, folder in folders.items():
        for source, ranked in top[str(epoch)].items():
            shown = {(q, d) for q, flat in enumerate(ranked) for d in flat[::2]}
            path = folder / f"{source}.jsonl"
            if not shown or not path.is_file():
                continue
            for line, row in read_jsonl(path):
                q, d = query_index.get(row.get("query_id")), doc_index[source].get(row.get("doc_id"))
                if (q, d) not in shown:
                    continue
                kernel.setdefault(str(epoch), row.get("kernel"))
                split.setdefault(str(epoch), row.get("split", "loss"))
                entry = [
                    *token_entry(row.get("doc"), texts, f"{path}:{line}: doc"),
                    *token_entry(row.get("query"), texts, f"{path}:{line}: query"),
                ]
                pairs.setdefault(str(epoch), {}).setdefault(source, {}).setdefault(str(q), {})[str(d)] = entry
    return {"levels": LEVELS, "texts": list(texts), "kernel": kernel, "split": split, "pairs": pairs}


def token_entry(part, texts, where):
    """[text index, shades, top] of one side of a pair ({"text", "tokens": [[piece, start, end, c or None]]});
    texts: {(text, offsets): index} the page's table of tokenised texts, extended here."""
    try:
        text, tokens = part["text"], part["tokens"]
        spans = [(int(start), int(end)) for _, start, end, _ in tokens]
        values = [None if c is None else float(c) for *_, c in tokens]
    except (TypeError, KeyError, ValueError) as e:
        raise DataError(f"{where}: expected {{text, tokens: [[piece, start, end, contribution or null]]}} ({e!r})")
    for n, ((piece, *_), (start, end)) in enumerate(zip(tokens, spans)):
        if text[start:end] != piece:
            raise DataError(f"{where}: token {n} {piece!r} is not text[{start}:{end}] = {text[start:end]!r}")
    merged = by_character([[None, a, b, c] for (a, b), c in zip(spans, values)])  # a split character as one token
    values = [c for *_, c in merged]
    offsets, previous, unit = [], 0, utf16(text)
    for start, end in ((unit(a), unit(b)) for _, a, b, _ in merged):
        offsets += [start - previous, end - start]
        previous = end
    index = texts.setdefault((text, tuple(offsets)), len(texts))
    return [index, shades(values), top_tokens(values)]


def utf16(text):
    """position in code points (Python's, the token files') -> in UTF-16 code units (JavaScript's string indices, the
    page's): a character outside the Basic Multilingual Plane (an emoji) is two units."""
    if text.isascii() or max(map(ord, text)) <= 0xFFFF:
        return int
    units = list(itertools.accumulate((1 + (ord(ch) > 0xFFFF) for ch in text), initial=0))
    return units.__getitem__


def shades(values):
    """One character per token: SHADES[level + LEVELS] with level = round(LEVELS * c / max |c|), at least 1 for
    c != 0; "." for a token that carries no loss (None), ".n" for n > 1 of them in a row (a prompt's tokens)."""
    peak = max((abs(c) for c in values if c is not None), default=0.0) or 1.0
    out = []
    for c in values:
        level = 0 if not c else max(1, round(LEVELS * abs(c) / peak)) * (1 if c > 0 else -1)
        out.append("." if c is None else SHADES[level + LEVELS])
    return re.sub(r"\.{2,}", lambda run: f".{len(run[0])}", "".join(out))  # n tokens without loss in a row: ".n"


def top_tokens(values):
    """[token index, contribution, ...] of the TOP_TOKENS largest |c| (contributions to 4 significant digits)."""
    ranked = sorted((n for n, c in enumerate(values) if c is not None), key=lambda n: -abs(values[n]))
    return [x for n in ranked[:TOP_TOKENS] for x in (n, float(f"{values[n]:.4g}"))]
