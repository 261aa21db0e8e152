"""The rows of Tables I-IV (and the TracIn-CP table) from the runs' metrics (lark.analysis.runs.load_metrics).

Each row is a dict column -> number/str/None: numbers stay numbers here (lark.analysis.markdown rounds them for the
markdown only). Fractions in metrics.json (accuracy, wins) become percentages, in columns ending in `_pct`.

    tables = build_tables({"run": load_metrics(run_dir)})   # -> {"table1": rows, ..., "table4": rows}
"""

import json
from pathlib import Path

from lark.analysis import metrics as M
from lark.analysis.runs import pick_epoch, read_json_object, reduced_lr_epochs
from lark.analysis.schema import check as check_metrics
from lark.errors import CorruptFile, RunDirError

TITLES = {
    "table1": "TABLE I: Influence score comparison across data sources",
    "table2": "TABLE II: Influence score evolution during fine-tuning",
    "table3": "TABLE III: Storage requirements for attribution methods",
    "table4": "TABLE IV: Attribution accuracy: LARK (gradient) vs BM25",
    "tracin_cp": "TracIn-CP: run-level influence (learning-rate-weighted sum over checkpoints)",
}
# Table II's evaluation column per metrics.json `eval.metric` (conf/eval): (column, markdown header, percent?)
EVAL_COLUMNS = {
    "accuracy": ("accuracy_pct", "Acc.", True),
    "exact_match": ("exact_match_pct", "Exact match", True),
    "answer_loss": ("answer_loss", "Answer loss", False),
}


def build_tables(runs, table1_epoch="best"):
    """runs: label -> that run's metrics (load_metrics). Returns {"table1": rows, ..., "table4": rows}, each row
    a dict column -> number/str/None. Tables I, III and IV use epoch `table1_epoch` of each run (pick_epoch)."""
    multirun = list(runs) != ["run"]
    tables = {name: [] for name in TITLES if name != "tracin_cp"}  # tracin_cp: analyze() adds it if a run has it
    for job, metrics in runs.items():
        if not metrics:
            raise RunDirError(f"run {job!r} has no metrics")
        chosen = pick_epoch(metrics, table1_epoch, job)
        lead = {"job": job} if multirun else {}
        tables["table1"] += [lead | row for row in source_rows(chosen)]
        tables["table2"] += [lead | row for row in epoch_rows(metrics)]
        tables["table3"] += [lead | row for row in storage_rows(chosen)]
        tables["table4"] += [lead | row for row in method_rows(chosen)]
    return tables


def pct(fraction):
    return None if fraction is None else 100 * fraction


def product(a, b):
    return None if a is None or b is None else a * b


def source_rows(m):
    """Table I: one row per source at one epoch. FT wins is "-" (None) for the fine-tuning source itself."""
    rows = []
    for name, source in (m.get("sources") or {}).items():
        is_ft = name == m.get("ft_source")
        rows.append(
            {
                "epoch": m["epoch"],
                "source": name,
                "kind": source.get("kind"),
                "formatted": source.get("formatted"),
                "n_docs": source.get("n_docs"),
                "mean_max": source.get("mean_max"),
                "ft_wins_pct": None if is_ft else pct(source.get("ft_wins")),
            }
        )
    return rows


def method(m):
    """ "kernel/projector" of an epoch's metrics (e.g. "rapidin/sketch")."""
    return f"{(m.get('kernel') or {}).get('name', 'cosine')}/{(m.get('projector') or {}).get('kind', '?')}"


def epoch_rows(metrics):
    """Table II: one row per epoch, with a format_effect_<kind> column per content kind, and a `method` column
    (kernel/projector) when the run's epochs were attributed with different ones (a partial re-attribution):
    their scores are then not one series."""
    reduced = reduced_lr_epochs(metrics)
    kinds = dict.fromkeys(kind for m in metrics for kind in (m.get("format_effect") or {}))
    mixed = len({method(m) for m in metrics}) > 1
    rows = []
    for m in metrics:
        effect = m.get("format_effect") or {}
        rows.append(
            {
                "epoch": m["epoch"],
                "lr": m.get("lr"),
                "reduced_lr": m["epoch"] in reduced,
                "ft": m.get("ft"),
                "pt": m.get("pt"),
                "ratio": m.get("ft_pt_ratio"),
                "pt_wins_pct": pct(m.get("pt_wins")),
                **eval_column(m),
                **{f"format_effect_{kind}": effect.get(kind) for kind in kinds},
                **({"method": method(m)} if mixed else {}),
            }
        )
    return rows


def eval_column(m):
    """{column: value} of the epoch's evaluation (`eval` in metrics.json; runs before it: accuracy)."""
    score = m.get("eval") or {"metric": "accuracy", "value": m.get("accuracy")}
    column, _, percent = EVAL_COLUMNS.get(score["metric"], (score["metric"], score["metric"], False))
    return {column: pct(score["value"]) if percent else score["value"]}


def storage_rows(m):
    """Table III: bytes per example and for all examples, full gradient vs projected, and their ratio."""
    storage = m.get("storage") or {}
    n, k = storage.get("n_examples"), storage.get("k")
    full = storage.get("full_bytes_per_example") or product(storage.get("n_params"), storage.get("grad_dtype_bytes"))
    projected = storage.get("store_bytes_per_example") or product(k, storage.get("store_dtype_bytes"))
    kind = (m.get("projector") or {}).get("kind") or "projected"
    widths = {"numbers": storage.get("n_params"), "number_bytes": storage.get("grad_dtype_bytes")}  # the footnote's
    return [
        storage_row("Full gradient (TracIn)", n_examples=n, bytes_per_example=full, bytes_total=product(full, n))
        | widths,
        storage_row(
            f"LARK ({kind}, k={k})", k=k, n_examples=n, bytes_per_example=projected, bytes_total=product(projected, n)
        )
        | {"numbers": k, "number_bytes": storage.get("store_dtype_bytes")},
        storage_row("Compression ratio (full / projected)", compression=M.ratio(full, projected)),
    ]


def storage_row(method, k=None, n_examples=None, bytes_per_example=None, bytes_total=None, compression=None):
    return {
        "method": method,
        "k": k,
        "n_examples": n_examples,
        "bytes_per_example": bytes_per_example,
        "bytes_total": bytes_total,
        "compression": compression,
    }


def method_rows(m):
    """Table IV: FT wins (%) of the gradient kernel and of BM25 at one epoch, and their difference."""
    gradient, bm25 = pct(m.get("ft_wins")), pct((m.get("bm25") or {}).get("ft_wins"))
    difference = None if gradient is None or bm25 is None else gradient - bm25
    base = {"epoch": m["epoch"], "pt_source": m.get("pt_source"), "difference_pp": None}
    return [
        base | {"method": "LARK (gradient)", "ft_wins_pct": gradient, "interpretation": "Gradient-based"},
        base | {"method": "BM25", "ft_wins_pct": bm25, "interpretation": "Lexical similarity"},
        base
        | {
            "method": "Difference",
            "ft_wins_pct": None,
            "difference_pp": difference,
            "interpretation": "LARK minus BM25",
        },
    ]


def tracin_rows(run_dirs):
    """TracIn-CP rows (attribution/tracin_cp/metrics.json, attribution/kernel=tracin_cp): one per run and source."""
    rows = []
    for job, run_dir in run_dirs.items():
        file = Path(run_dir) / "attribution" / "tracin_cp" / "metrics.json"
        if file.is_file():
            m = read_tracin(file)
            lead = {} if list(run_dirs) == ["run"] else {"job": job}
            rows += [lead | row | {"epochs": ", ".join(map(str, m["epochs"]))} for row in source_rows(m)]
    return rows


def read_tracin(file):
    """attribution/tracin_cp/metrics.json, the run-level score's metrics: checked as an epoch's metrics.json is
    (lark.analysis.schema) but for its epoch ("all") and lr (one per summed checkpoint), plus its `epochs` list."""
    m = read_json_object(file)
    if not isinstance(m.get("epochs"), list):
        raise CorruptFile(f"{file}: epochs must be the list of the summed checkpoints' epochs")
    check_metrics({k: v for k, v in m.items() if k not in ("epoch", "lr")} | {"epoch": 0}, file)
    return m


def loss_target_caption(runs):
    """What carried the loss of fine-tuning items and of queries (metrics.json loss_target), per run."""
    parts = []
    for job, metrics in runs.items():
        targets = {json.dumps(m["loss_target"], sort_keys=True) for m in metrics if m.get("loss_target")}
        for target in map(json.loads, sorted(targets)):
            prefix = "" if job == "run" else f"{job}: "
            parts.append(f"{prefix}answer `{target.get('answer_template')}`, queries `{target.get('query_target')}`")
    return f"Loss target: {'; '.join(parts)}." if parts else None
