"""The browsable report of a run or a sweep: `report/index.html`, one self-contained file (inline CSS and JS,
figures as data URIs, no CDN, no server) regenerated from the run's files by `analyze.py`.

A run's page: config summary, kernel, timings, the tables (tables/table*.md, so Table V appears when validation
wrote it), the figures, and every test question at every attributed checkpoint with its gold and predicted answer,
its answer loss, and per source the top-k documents (score, rank, text) with provenance and canary markers.
The questions travel as one JSON blob; the page builds their DOM on demand (lark/resources/report.js).
A sweep's page: one row per job with the sweep's varying override keys as columns, linking each job's own page.

    write_run_report(run_dir, metrics, out_dir)            # -> out_dir/report/index.html
    write_sweep_report(root, run_dirs, metrics, epochs)    # -> root/report/index.html (+ each job's page)

Files read (all optional except attribution/epoch_NNN/metrics.json): .hydra/config.yaml or
checkpoints/epoch_000/lark_config.yaml, .hydra/overrides.yaml, data/test.jsonl, data/sources/*.jsonl,
data/world/provenance.json, attribution/epoch_NNN/{top_influences.csv, predictions.jsonl}, tables/*.md,
figures/*.png. Missing pieces leave their section out; nothing here fails a run's analysis for a missing extra.
"""

import base64
import csv
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lark.data.io import read_jsonl, replacing

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
# (label, dotted config key): the config summary at the top of a run's page
SUMMARY_KEYS = [
    ("model", "model.name"),
    ("hub id", "model.hub_id"),
    ("data", "data.name"),
    ("format", "format.name"),
    ("fine-tuning epochs", "trainer.max_epochs"),
    ("batch size", "batch_size"),
    ("max length", "max_length"),
    ("peak lr", "scheduler.lr"),
    ("precision", "trainer.precision"),
    ("seed", "seed"),
    ("documents per source", "source.size"),
    ("projector", "attribution.projector.kind"),
    ("k", "attribution.projector.k"),
    ("kernel", "attribution.kernel"),
    ("store tier", "attribution.store_dtype"),
    ("query target", "attribution.query_target"),
    ("top-k", "attribution.top_k"),
]
METRIC_COLUMNS = [
    ("epoch", "Epoch", "d"),
    ("accuracy", "Acc.", "%"),
    ("ft", "FT", ".3f"),
    ("pt", "PT", ".3f"),
    ("ft_pt_ratio", "Ratio", ".2f"),
    ("pt_wins", "PT wins", "%"),
    ("bm25_ft_wins", "BM25 FT wins", "%"),
]


# ------------------------------------------------------------------------------------------------ reading


def read_config(run_dir):
    """The run's resolved config as a dict (a checkpoint's lark_config.yaml is resolved; .hydra's may not be)."""
    for path in (run_dir / "checkpoints" / "epoch_000" / "lark_config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def read_overrides(run_dir):
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.is_file() else []


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
    with open(path, newline="") as f:
        ranked = sorted(csv.DictReader(f), key=lambda r: int(r["rank"]))
    for row in ranked:
        q, source = query_index.get(row["query_id"]), row["source"]
        d = doc_index.get(source, {}).get(row["doc_id"])
        if q is not None and d is not None:
            top[source][q] += [d, round(float(row["score"]), 4)]
    return top


def read_predictions(path, query_index):
    """[per query: [predicted label, loss]] from predictions.jsonl (None when the run did not write it)."""
    if not path.is_file():
        return None
    out = [None] * len(query_index)
    for row in rows(path):
        if row.get("id") in query_index:
            out[query_index[row["id"]]] = [row.get("predicted"), row.get("loss")]
    return out


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
    provenance_file = run_dir / "data" / "world" / "provenance.json"
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    epochs = [m["epoch"] for m in metrics]
    return {
        "epochs": epochs,
        "epoch": epoch,
        "sources": sources,
        "snippet": snippet_chars,
        "ft_source": next((m.get("ft_source") for m in metrics if m.get("ft_source")), None),
        "accuracy": {str(m["epoch"]): m.get("accuracy") for m in metrics},
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
        "top": {str(e): read_top(epoch_dir(run_dir, e) / "top_influences.csv", query_index, doc_index) for e in epochs},
        "pred": {str(e): read_predictions(epoch_dir(run_dir, e) / "predictions.jsonl", query_index) for e in epochs},
        "prov": {
            t["id"]: list((provenance.get(t["id"]) or {}).get("pretrain_docs", []))
            + list((provenance.get(t["id"]) or {}).get("finetune_items", []))
            for t in tests
            if t["id"] in provenance
        },
    }


# ------------------------------------------------------------------------------------------------ HTML pieces


def esc(value):
    return html.escape("" if value is None else str(value))


def markdown_html(text):
    """The GitHub markdown that analysis writes (### titles, pipe tables, plain lines) as HTML."""
    out, table = [], []

    def flush():
        if table:
            cells = [
                [c.strip().replace("\\|", "|").replace("\\*", "*") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                for line in table
                if not re.fullmatch(r"\|[-:| ]+\|", line)
            ]
            head, body = cells[0], cells[1:]
            out.append(
                "<table><thead><tr>"
                + "".join(f"<th>{esc(c)}</th>" for c in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
                + "</tbody></table>"
            )
            table.clear()

    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append(f"<h3>{esc(line.lstrip('#').strip())}</h3>")
        elif line:
            out.append(f"<p class='note'>{esc(line.replace(chr(92) + '*', '*'))}</p>")
    flush()
    return "\n".join(out)


def natural(path):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def tables_html(folder):
    files = sorted(Path(folder).glob("table*.md"), key=natural)
    out = []
    for f in files:  # the markdown's "### title" line becomes the summary; Table II is open
        lines = f.read_text().splitlines()
        titled = bool(lines) and lines[0].startswith("#")
        title, body = (lines[0].lstrip("#").strip(), lines[1:]) if titled else (f.stem, lines)
        out.append(
            f"<details {'open ' * (f.stem == 'table2')}class='table'><summary>{esc(title)}</summary>"
            f"{markdown_html(chr(10).join(body))}</details>"
        )
    return "\n".join(out)


def figures_html(folder):
    out = []
    for f in sorted(Path(folder).glob("*.png"), key=natural):
        data = base64.b64encode(f.read_bytes()).decode()
        out.append(
            f"<figure><img alt='{esc(f.stem)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{esc(f.name)}</figcaption></figure>"
        )
    return f"<details><summary>{len(out)} figures</summary>{''.join(out)}</details>" if out else ""


def pairs_html(pairs):
    return "<table class='kv'>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs) + "</table>"


def section(title, body, anchor):
    return f"<section id='{anchor}'><h2>{esc(title)}</h2>{body}</section>" if body else ""


def page(title, body, data=None):
    """A whole HTML document with the stylesheet, the data blob and the script inline."""
    css = (RESOURCES / "report.css").read_text()
    blob = ""
    if data is not None:  # "</" cannot close the script element inside JSON: escape it
        blob = (
            "<script type='application/json' id='lark-data'>"
            + json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("</", "<\\/")
            + "</script>"
        )
    js = f"<script>{(RESOURCES / 'report.js').read_text()}</script>"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{css}</style></head>"
        f"<body><header class='top'><h1>{esc(title)}</h1><span class='gen'>LARK report, generated {generated}"
        f"</span></header><main>{body}</main>{blob}{js}</body></html>"
    )


def write_page(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ pages


def write_run_report(run_dir, metrics, out_dir=None, epoch=None, snippet_chars=280, title=None):
    """out_dir/report/index.html (out_dir defaults to the run dir) for one run; returns its path.
    metrics: the run's metrics.json dicts by epoch (lark.analysis.analyze.load_metrics); epoch: the checkpoint
    shown first."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    config = read_config(run_dir)
    overrides = read_overrides(run_dir)
    summary = [(label, value) for label, key in SUMMARY_KEYS if (value := dotted(config, key)) is not None]
    summary.append(("run directory", str(run_dir)))
    kernel = (metrics[-1].get("projector") or {}) if metrics else {}
    data = run_data(run_dir, metrics, metrics[-1]["epoch"] if epoch is None else epoch, snippet_chars)
    body = "".join(
        [
            "<nav>"
            + " ".join(
                f"<a href='#{a}'>{t}</a>"
                for a, t in [
                    ("config", "config"),
                    ("tables", "tables"),
                    ("figures", "figures"),
                    ("questions", "questions"),
                ]
            )
            + "</nav>",
            "<div class='grid'>",
            section("Config", pairs_html(summary), "config"),
            section("Kernel (projector spec, last checkpoint)", pairs_html(kernel.items()), "kernel"),
            section("Timings (files' modification times)", pairs_html(timings(run_dir, metrics)), "timings"),
            "</div>",
            f"<p class='note'>overrides: <code>{esc(' '.join(overrides) or '(none)')}</code></p>",
            section("Tables", tables_html(out_dir / "tables"), "tables"),
            section("Figures", figures_html(out_dir / "figures"), "figures"),
            "<section id='questions'><h2>Test questions and their most influential documents</h2>"
            "<div id='controls'></div><div id='count'></div><div id='list'></div><div id='sentinel'></div>"
            "<noscript>The question browser needs JavaScript.</noscript></section>",
        ]
    )
    return write_page(out_dir / "report" / "index.html", page(title or f"LARK run {run_dir.name}", body, data))


def varying(overrides_by_job):
    """The override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    parsed = {job: dict(o.split("=", 1) for o in items if "=" in o) for job, items in overrides_by_job.items()}
    keys = list(dict.fromkeys(k for items in parsed.values() for k in items))
    return [k for k in keys if len({items.get(k) for items in parsed.values()}) > 1], parsed


def metric_cell(m, key, spec):
    value = (m.get("bm25") or {}).get("ft_wins") if key == "bm25_ft_wins" else m.get(key)
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if spec == "%" else f"{value:{spec}}"


def write_sweep_report(root, run_dirs, metrics, epochs, out_dir=None, snippet_chars=280):
    """out_dir/report/index.html comparing the jobs of a sweep, and each job's own page in <job>/report/.
    run_dirs / metrics / epochs: job label -> run dir / metrics list / the metrics of its Table I epoch."""
    root, out_dir = Path(root), Path(out_dir or root)
    page_file = out_dir / "report" / "index.html"
    overrides = {job: read_overrides(d) or [o for o in job.split(",") if "=" in o] for job, d in run_dirs.items()}
    keys, parsed = varying(overrides)
    kinds = list(dict.fromkeys(k for m in epochs.values() for k in (m.get("format_effect") or {})))
    head = [
        "job",
        *keys,
        *(label for _, label, _ in METRIC_COLUMNS),
        *(f"Format effect ({k})" for k in kinds),
        "report",
    ]
    body_rows = []
    for job, run_dir in run_dirs.items():
        job_page = write_run_report(
            run_dir,
            metrics[job],
            epoch=epochs[job]["epoch"],
            snippet_chars=snippet_chars,
            title=f"LARK sweep job {job}",
        )
        link = (
            Path(*[".."] * len(page_file.parent.relative_to(out_dir).parts)) / job_page.relative_to(out_dir)
            if job_page.is_relative_to(out_dir)
            else job_page.resolve().as_uri()
        )
        m = epochs[job]
        cells = [
            job,
            *(parsed[job].get(k, "-") for k in keys),
            *(metric_cell(m, key, spec) for key, _, spec in METRIC_COLUMNS),
            *(metric_cell(m.get("format_effect") or {}, k, ".2f") for k in kinds),
        ]
        body_rows.append(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + f"<td><a href='{esc(str(link))}'>open</a></td></tr>"
        )
    table = (
        "<p class='note'>One row per job at its Table I epoch; the columns after <i>job</i> are the overrides "
        "that vary across the sweep. Click a header to sort.</p><table class='sortable'><thead><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(body_rows)
        + "</tbody></table>"
    )
    body = "".join(
        [
            section("Jobs", table, "jobs"),
            section("Tables", tables_html(out_dir / "tables"), "tables"),
            section("Figures", figures_html(out_dir / "figures"), "figures"),
        ]
    )
    return write_page(page_file, page(f"LARK sweep {root.name} ({len(run_dirs)} jobs)", body, {"sweep": True}))
