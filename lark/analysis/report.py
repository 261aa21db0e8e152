"""The browsable report of a run or a sweep: `report/index.html`, one self-contained file (inline CSS and JS,
figures as data URIs, no CDN, no server) regenerated from the run's files by `analyze.py`.

A run's page: config summary, kernel, timings, the tables (tables/table*.md, so Table V appears when validation
wrote it), the figures, and every test question at every attributed checkpoint with its gold and predicted answer,
its answer loss, and per source the top-k documents (score, rank, text) with provenance and canary markers.
The questions travel as one JSON blob; the page builds their DOM on demand (lark/resources/report.js).
A sweep's page: one row per job with the sweep's varying override keys as columns, linking each job's own page.

    write_run_report(run_dir, metrics, out_dir)              # -> out_dir/report/index.html
    write_sweep_report(root, run_dirs, pages, epochs, out)   # -> out/report/index.html, linking the jobs' pages

Files read (all optional except attribution/epoch_NNN/metrics.json): the run's files that lark.analysis.report_data
lists, tables/*.md and figures/*.png. Missing pieces leave their section out; nothing here fails a run's analysis for
a missing extra. One that is there but unreadable (a torn CSV, invalid JSON) fails, naming the file (and line):
skipped, the page would show the run as one without it (no provenance markers reads "no document carries the fact").
"""

import base64
import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from lark.analysis.report_data import dotted, read_config, run_data, timings
from lark.analysis.runs import natural_key, read_overrides
from lark.data.io import replacing

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
    ("schedule", "scheduler.name"),
    ("peak lr", "scheduler.lr"),
    ("precision", "trainer.precision"),
    ("seed", "seed"),
    ("documents per source", "source.size"),
    ("projector", "attribution.projector._target_"),
    ("projector", "attribution.projector.kind"),  # a config saved before the projector group (lark.legacy)
    ("k", "attribution.projector.k"),
    ("kernel", "attribution.kernel._target_"),
    ("store tier", "attribution.store_dtype"),
    ("query target", "attribution.query_target"),
    ("top-k", "attribution.top_k"),
    ("token-wise", "attribution.tokens"),
    ("token pairs per query and source", "attribution.tokens_top_k"),
]
METRIC_COLUMNS = [
    ("epoch", "Epoch", "d"),
    ("accuracy", "Acc.", "%"),
    ("eval", "Test metric", ".4g"),  # metrics.json's eval: the metric that chose the epoch (answer loss, ...)
    ("ft", "FT", ".3f"),
    ("pt", "PT", ".3f"),
    ("ft_pt_ratio", "Ratio", ".2f"),
    ("pt_wins", "PT wins", "%"),
    ("ft_wins", "FT wins", "%"),  # the gradient kernel's, beside BM25's: the paper's RQ3 (Table IV)
    ("bm25_ft_wins", "BM25 FT wins", "%"),
]


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


def tables_html(folder):
    files = sorted(Path(folder).glob("table*.md"), key=lambda f: natural_key(f.name))
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
    for f in sorted(Path(folder).glob("*.png"), key=lambda f: natural_key(f.name)):
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
    if data is not None:  # no "<" inside the JSON ("</script>", "<!--" + "<script" end or swallow the element)
        blob = (
            "<script type='application/json' id='lark-data'>"
            + json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
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


NAV = "<nav>" + " ".join(f"<a href='#{a}'>{a}</a>" for a in ("config", "tables", "figures", "questions")) + "</nav>"
QUESTIONS = (
    "<section id='questions'><h2>Test questions and their most influential documents</h2>"
    "<div id='controls'></div><div id='count'></div><div id='list'></div><div id='sentinel'></div>"
    "<noscript>The question browser needs JavaScript.</noscript></section>"
)


def write_run_report(run_dir, metrics, out_dir=None, epoch=None, snippet_chars=280, title=None, rule=None, data=None):
    """out_dir/report/index.html (out_dir defaults to the run dir) for one run; returns its path.
    metrics: the run's metrics.json dicts by epoch (lark.analysis.runs.load_metrics); epoch: the checkpoint
    shown first, chosen by `rule` (in words, lark.analysis.runs.choose_epoch; shown on the page); data: the
    page's run_data when the caller read it already (analyze reads it before writing the tables)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    overrides = read_overrides(run_dir)
    last = metrics[-1] if metrics else {}
    kernel = {"kernel": (last.get("kernel") or {}).get("name", "-"), **(last.get("projector") or {})}
    if data is None:
        data = run_data(run_dir, metrics, metrics[-1]["epoch"] if epoch is None else epoch, snippet_chars)
    body = "".join(
        [
            NAV,
            "<div class='grid'>",
            section("Config", pairs_html(config_summary(run_dir)), "config"),
            section("Kernel and projector (last checkpoint)", pairs_html(kernel.items()), "kernel"),
            section("Timings (files' modification times)", pairs_html(timings(run_dir, metrics)), "timings"),
            "</div>",
            f"<p class='note'>overrides: <code>{esc(' '.join(overrides) or '(none)')}</code></p>",
            f"<p class='note' id='chosen-epoch'>Tables I, III, IV and the questions first show epoch {data['epoch']}: "
            f"{esc(rule)}.</p>"
            if rule
            else "",
            section("Tables", tables_html(out_dir / "tables"), "tables"),
            section("Figures", figures_html(out_dir / "figures"), "figures"),
            QUESTIONS,
        ]
    )
    return write_page(out_dir / "report" / "index.html", page(title or f"LARK run {run_dir.name}", body, data))


def config_summary(run_dir):
    """(label, value) of each SUMMARY_KEYS entry the run's config has, then the run directory."""
    config = read_config(run_dir)
    summary = [(label, value) for label, key in SUMMARY_KEYS if (value := dotted(config, key)) is not None]
    return summary + [("run directory", str(run_dir))]


def varying(overrides_by_job):
    """The override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    parsed = {job: dict(o.split("=", 1) for o in items if "=" in o) for job, items in overrides_by_job.items()}
    keys = list(dict.fromkeys(k for items in parsed.values() for k in items))
    return [k for k in keys if len({items.get(k) for items in parsed.values()}) > 1], parsed


def metric_cell(m, key, spec):
    if key == "eval":  # {"metric", "value"}: the number first (the table sorts by it), then which metric
        score = m.get("eval") or {}
        return "-" if score.get("value") is None else f"{score['value']:{spec}} ({score.get('metric', '?')})"
    if key == "accuracy" and (m.get("eval") or {}).get("metric", "accuracy") != "accuracy":
        return "-"  # metrics.json's `accuracy` holds exact match then: the Test metric column names it
    value = (m.get("bm25") or {}).get("ft_wins") if key == "bm25_ft_wins" else m.get(key)
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if spec == "%" else f"{value:{spec}}"


def write_sweep_report(root, run_dirs, pages, epochs, out_dir=None):
    """out_dir/report/index.html comparing the jobs of a sweep (out_dir defaults to the sweep folder `root`), linking
    each job's own page (written before, by lark.analysis.analyze, in out_dir/<job>/report/: job_out_dir).
    run_dirs / pages / epochs: job label -> run dir / its page / the metrics of its Table I epoch."""
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
    for job in run_dirs:
        cells = [job, *(parsed[job].get(k, "-") for k in keys), *sweep_metric_cells(epochs[job], kinds)]
        link = page_link(Path(pages[job]), page_file, out_dir)
        body_rows.append(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + f"<td><a href='{esc(str(link))}'>open</a></td></tr>"
        )
    body = "".join(
        [
            section("Jobs", jobs_table(head, body_rows), "jobs"),
            section("Tables", tables_html(out_dir / "tables"), "tables"),
            section("Figures", figures_html(out_dir / "figures"), "figures"),
        ]
    )
    return write_page(page_file, page(f"LARK sweep {root.name} ({len(run_dirs)} jobs)", body, {"sweep": True}))


def job_out_dir(root, run_dir, out_dir):
    """Where a sweep job's tables, figures and page go: its path under the sweep folder `root`, taken under out_dir
    (the job's own folder when out_dir is the sweep folder, the default). None: the sweep folder."""
    return Path(out_dir or root) / Path(run_dir).relative_to(root)


def sweep_metric_cells(m, kinds):
    """A job's METRIC_COLUMNS cells and format-effect cells (one per content kind) at its Table I epoch."""
    return [
        *(metric_cell(m, key, spec) for key, _, spec in METRIC_COLUMNS),
        *(metric_cell(m.get("format_effect") or {}, k, ".2f") for k in kinds),
    ]


def page_link(target, page_file, out_dir):
    """The link from page_file to target: relative when both lie under out_dir, else a file:// URI."""
    if target.is_relative_to(out_dir):
        return Path(*[".."] * len(page_file.parent.relative_to(out_dir).parts)) / target.relative_to(out_dir)
    return target.resolve().as_uri()


def jobs_table(head, body_rows):
    """The sweep page's sortable table of jobs."""
    return (
        "<p class='note'>One row per job at its Table I epoch; the columns after <i>job</i> are the overrides "
        "that vary across the sweep. Click a header to sort.</p><table class='sortable'><thead><tr>"
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(body_rows)
        + "</tbody></table>"
    )
