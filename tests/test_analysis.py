"""The analysis wing (lark.analysis: runs, tables, markdown, figures, analyze) on hand-written metrics.json files: the
paper's numbers in, Tables I-IV and Figures 1-3 out."""

import csv
import json
import re

import pytest

from lark.analysis.analyze import analyze
from lark.analysis.figures import plot_figures
from lark.analysis.markdown import COLUMNS, format_bytes, write_tables
from lark.analysis.runs import choose_epoch, epoch_caption, find_runs, load_metrics, pick_epoch
from lark.analysis.tables import build_tables
from lark.errors import RunDirError

# The paper's Table II: epoch -> (FT, PT, PT wins, accuracy, lr, format effect medical)
PAPER = {
    0: (0.482, 0.395, 0.0, 0.418, None, 3.71),
    1: (0.473, 0.431, 0.018, 0.690, 2e-4, 3.40),
    2: (0.386, 0.365, 0.134, 0.744, 2e-4, 3.12),
    3: (0.344, 0.327, 0.166, 0.690, 2e-4, 2.95),
    4: (0.314, 0.291, 0.248, None, 2e-5, 2.86),
    5: (0.366, 0.341, 0.284, None, 2e-5, 2.90),
}
STORAGE = {
    "n_params": 7298011136,
    "grad_dtype_bytes": 2,
    "k": 65536,
    "store_dtype_bytes": 2,
    "n_examples": 500,
    "full_bytes_per_example": 14596022272,
    "store_bytes_per_example": 131072,
}


def paper_metrics(epoch):
    ft, pt, pt_wins, accuracy, lr, effect = PAPER[epoch]
    return {
        "epoch": epoch,
        "accuracy": accuracy,
        "lr": lr,
        "n_queries": 500,
        "sources": {
            "finetune": {"mean_max": ft, "ft_wins": None, "n_docs": 500, "kind": "finetune", "formatted": True},
            "medical_format": {
                "mean_max": pt,
                "ft_wins": 1 - pt_wins,
                "n_docs": 500,
                "kind": "medical",
                "formatted": True,
            },
            "medical_noformat": {
                "mean_max": 0.117,
                "ft_wins": 1.0,
                "n_docs": 500,
                "kind": "medical",
                "formatted": False,
            },
            "entertainment_format": {
                "mean_max": 0.284,
                "ft_wins": 1.0,
                "n_docs": 500,
                "kind": "entertainment",
                "formatted": True,
            },
            "entertainment_noformat": {
                "mean_max": 0.095,
                "ft_wins": 1.0,
                "n_docs": 500,
                "kind": "entertainment",
                "formatted": False,
            },
        },
        "ft_source": "finetune",
        "pt_source": "medical_format",
        "ft": ft,
        "pt": pt,
        "ft_pt_ratio": ft / pt,
        "ft_wins": 1 - pt_wins,
        "pt_wins": pt_wins,
        "format_effect": {"medical": effect, "entertainment": 2.99},
        "bm25": {"ft_wins": 0.404, "pt_wins": 0.596, "sources": {"finetune": {"mean_max": 12.3}}},
        "storage": STORAGE,
        "projector": {"kind": "rapidin", "k": 65536, "seed": 0},
    }


def write_run(run_dir, metrics, overrides=None):
    for m in metrics:
        epoch_dir = run_dir / "attribution" / f"epoch_{m['epoch']:03d}"
        epoch_dir.mkdir(parents=True)
        (epoch_dir / "metrics.json").write_text(json.dumps(m))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run_dir


@pytest.fixture
def single_run(tmp_path):
    return write_run(tmp_path / "run", [paper_metrics(e) for e in PAPER], overrides=[])


@pytest.fixture
def multirun(tmp_path):
    """Job 0: the paper (format=chatml); job 1: noformat, only epochs 0 and 2, with nulls (NaN in the file)."""
    root = tmp_path / "multirun"
    write_run(root / "0", [paper_metrics(e) for e in PAPER], overrides=["format=chatml", "seed=0"])
    sparse = [paper_metrics(0), paper_metrics(2)]
    sparse[1]["accuracy"] = None
    sparse[1]["sources"]["medical_noformat"]["mean_max"] = None
    sparse[1]["format_effect"]["medical"] = None
    sparse[1]["bm25"] = None
    sparse[1]["format_effect"]["wiki"] = 1.5  # a content kind only this job has
    write_run(root / "1", sparse, overrides=["format=noformat", "seed=0"])
    (root / "1" / "attribution" / "epoch_002" / "metrics.json").write_text(
        json.dumps(sparse[1]).replace('"ft_pt_ratio": 1.0575342465753426', '"ft_pt_ratio": NaN')
    )
    return root


def test_find_runs_single_and_multirun(tmp_path, single_run, multirun):
    assert find_runs(single_run) == {"run": single_run}
    runs = find_runs(multirun)  # seed=0, which both jobs share, repeated itself in every table row and legend
    assert list(runs) == ["format=chatml", "format=noformat"]
    assert runs["format=noformat"] == multirun / "1"
    write_run(multirun / "10" / "inner", [paper_metrics(0)])  # one level deeper, no overrides: nothing is shared
    runs = find_runs(multirun)
    assert list(runs) == ["format=chatml,seed=0", "format=noformat,seed=0", "10/inner"]
    assert runs["format=noformat,seed=0"] == multirun / "1"


def test_find_runs_errors_name_the_path(tmp_path):
    with pytest.raises(RunDirError, match="nowhere"):
        find_runs(tmp_path / "nowhere")
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    with pytest.raises(RunDirError, match="empty"):
        find_runs(tmp_path / "empty")


def test_load_metrics_sorted_and_nan_to_none(multirun):
    metrics = load_metrics(multirun / "1")
    assert [m["epoch"] for m in metrics] == [0, 2]
    assert metrics[1]["ft_pt_ratio"] is None and metrics[1]["accuracy"] is None


def test_load_metrics_clear_errors(tmp_path, single_run):
    bad = single_run / "attribution" / "epoch_003" / "metrics.json"
    bad.write_text('{"epoch": 3, "accuracy": ')
    with pytest.raises(ValueError, match="invalid JSON in .*epoch_003.*metrics.json"):
        load_metrics(single_run)
    bad.unlink()
    with pytest.raises(RunDirError, match="missing .*epoch_003.*metrics.json"):
        load_metrics(single_run)
    (tmp_path / "bare" / "attribution").mkdir(parents=True)
    with pytest.raises(RunDirError, match="bare"):
        load_metrics(tmp_path / "bare")


def test_pick_epoch():
    metrics = [paper_metrics(e) for e in PAPER]
    assert pick_epoch(metrics)["epoch"] == 2  # 74.4% is the best accuracy
    metrics[3]["accuracy"] = 0.744
    assert pick_epoch(metrics)["epoch"] == 2  # tie -> earliest
    assert pick_epoch([paper_metrics(4), paper_metrics(5)])["epoch"] == 5  # no accuracy -> last
    assert pick_epoch(metrics, 4)["epoch"] == 4
    assert pick_epoch(metrics, "3")["epoch"] == 3
    with pytest.raises(ValueError, match="available epochs"):
        pick_epoch(metrics, 9)
    with pytest.raises(ValueError, match="best"):
        pick_epoch(metrics, "first")


def test_bad_table1_epochs_and_files_are_user_errors(tmp_path, single_run):
    """analyze.py reports a LarkError in one line; these were plain ValueErrors, printed as a traceback."""
    from lark.errors import ConfigError, CorruptFile

    metrics = load_metrics(single_run)
    for which in (7, "bestt"):
        with pytest.raises(ConfigError, match="table1_epoch"):
            choose_epoch(metrics, which)
    bad = write_run(tmp_path / "bad", [paper_metrics(0)])
    (bad / "attribution/epoch_000/metrics.json").write_text('{"epoch": 0, "ft": ')
    with pytest.raises(CorruptFile, match="invalid JSON"):
        load_metrics(bad)


def test_a_sweeps_bad_table1_epoch_names_the_job(multirun, tmp_path):
    """table1_epoch=5 where one job attributed only epochs 0 and 2: the error did not say which job lacks it."""
    from lark.errors import ConfigError

    message = r"^sweep job 'format=noformat': table1_epoch=5: that epoch has no metrics; available epochs: \[0, 2\]$"
    with pytest.raises(ConfigError, match=message):
        analyze(multirun, out_dir=tmp_path / "out", table1_epoch=5)
    with pytest.raises(ConfigError, match=message):
        build_tables({job: load_metrics(d) for job, d in find_runs(multirun).items()}, 5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, path",
    [
        ("format_effect.medical", ("format_effect", "medical")),
        ("bm25.ft_wins", ("bm25", "ft_wins")),
        ("bm25.sources.finetune.mean_max", ("bm25", "sources", "finetune", "mean_max")),
        ("storage.k", ("storage", "k")),
    ],
)
def test_a_string_where_metrics_json_has_a_number_names_the_file_and_key(tmp_path, key, path):
    """A string "2.1" in format_effect, bm25 or storage passed the schema and failed later, in the table formatting,
    as "Unknown format code 'f' for object of type 'str'", naming no file."""
    from lark.errors import CorruptFile

    metrics = [paper_metrics(0), paper_metrics(1)]
    leaf = metrics[1]
    for part in path[:-1]:
        leaf[part] = dict(leaf[part])
        leaf = leaf[part]
    leaf[path[-1]] = "2.1"
    run = write_run(tmp_path / "run", metrics)
    file = run / "attribution" / "epoch_001" / "metrics.json"
    with pytest.raises(
        CorruptFile, match=f"^{re.escape(str(file))}: {re.escape(key)} must be Number or NoneType, got str"
    ):
        analyze(run, report=False)
    assert not (run / "tables").exists() and not (run / "figures").exists()


def test_best_epoch_follows_the_evaluation():
    """eval=loss: the lowest answer loss is best (the issue's run: epoch 2, 2.793, not the last epoch's 2.964);
    exact match 0 at every epoch: the last epoch, and the rule says every epoch ties."""
    losses = {0: 3.5, 1: 3.1, 2: 2.793, 3: 2.9, 4: 2.95, 5: 2.964}
    metrics = [
        paper_metrics(e) | {"accuracy": None, "eval": {"metric": "answer_loss", "value": v, "higher_is_better": False}}
        for e, v in losses.items()
    ]
    chosen, rule = choose_epoch(metrics)
    assert chosen["epoch"] == 2 and "lowest test answer_loss (2.793" in rule
    assert epoch_caption({"run": metrics}) == f"Checkpoint: epoch 2, {rule}."
    zero = [
        paper_metrics(e) | {"eval": {"metric": "exact_match", "value": 0.0, "higher_is_better": True}} for e in PAPER
    ]
    chosen, rule = choose_epoch(zero)
    assert chosen["epoch"] == 5 and rule.startswith("every epoch ties at exact_match 0.0%")
    assert choose_epoch(metrics, "last")[1].startswith("the last epoch")
    best = max(paper_metrics(e)["accuracy"] or 0 for e in PAPER)  # a percent in the caption, as in Table II (was 0.86)
    assert f"highest test accuracy ({100 * best:.1f}%;" in choose_epoch([paper_metrics(e) for e in PAPER])[1]


def test_win_shares_are_exact_fractions():
    """22 wins of 100 were float32's 0.2199999988079071, written as 21.99999988079071 in table4.csv."""
    import torch

    from lark.analysis.metrics import wins

    a = torch.tensor([1.0] * 22 + [0.0] * 78 + [float("nan")])
    assert wins(a, torch.full((101,), 0.5)) == 0.22 and wins(a[-1:], a[-1:]) is None


def test_tables_built_from_metrics_holding_the_papers_numbers_show_the_papers_tables(single_run):
    """Metrics files holding the paper's per-source numbers (the fixture) give the paper's Tables I-IV: the table
    code's choices (epoch, ratios, rounding, wins) checked against published values, not a reproduction of them."""
    tables = build_tables({"run": load_metrics(single_run)})
    table1 = {row["source"]: row for row in tables["table1"]}
    assert {row["epoch"] for row in tables["table1"]} == {2}
    assert table1["finetune"]["mean_max"] == 0.386 and table1["finetune"]["ft_wins_pct"] is None
    assert table1["medical_format"]["ft_wins_pct"] == pytest.approx(86.6)
    assert table1["medical_noformat"]["ft_wins_pct"] == pytest.approx(100.0)

    table2 = tables["table2"]
    assert [row["epoch"] for row in table2] == [0, 1, 2, 3, 4, 5]
    assert [row["reduced_lr"] for row in table2] == [False, False, False, False, True, True]
    assert table2[5]["pt_wins_pct"] == pytest.approx(28.4) and table2[4]["accuracy_pct"] is None
    assert table2[0]["ratio"] == pytest.approx(1.22, abs=0.005)
    assert table2[0]["format_effect_medical"] == 3.71 and table2[0]["format_effect_entertainment"] == 2.99

    full, projected, compression = tables["table3"]
    assert full["bytes_per_example"] == 14596022272 and full["bytes_total"] == 500 * 14596022272
    assert projected["bytes_per_example"] == 131072 and projected["method"] == "LARK (rapidin, k=65536)"
    assert compression["compression"] == pytest.approx(14596022272 / 131072) == pytest.approx(111358.8, abs=0.1)

    gradient, bm25, difference = tables["table4"]
    assert gradient["ft_wins_pct"] == pytest.approx(86.6) and bm25["ft_wins_pct"] == pytest.approx(40.4)
    assert difference["difference_pp"] == pytest.approx(46.2)


def test_storage_falls_back_to_params_times_dtype(single_run):
    metrics = load_metrics(single_run)
    del metrics[2]["storage"]["full_bytes_per_example"], metrics[2]["storage"]["store_bytes_per_example"]
    full, projected, _ = build_tables({"run": metrics})["table3"]
    assert full["bytes_per_example"] == 14596022272 and projected["bytes_per_example"] == 131072


def test_table3_says_when_its_ratio_is_of_bytes_not_of_numbers(single_run):
    """A float32 model with float16 stores: the 11x was P/k = 5.63 times 2 for the byte widths, where the paper's
    ratio (both at 2 B) is P/k; the footnote gives both. At equal widths (the paper's 7B) it says nothing more."""
    from lark.analysis.markdown import to_markdown

    metrics = load_metrics(single_run)
    same = to_markdown("table3", build_tables({"run": metrics})["table3"])
    assert "ratio of numbers" not in same
    storage = {"n_params": 369216, "grad_dtype_bytes": 4, "k": 65536, "store_dtype_bytes": 2, "n_examples": 100}
    metrics[2]["storage"] = storage | {"full_bytes_per_example": 369216 * 4, "store_bytes_per_example": 131072}
    text = to_markdown("table3", build_tables({"run": metrics})["table3"])
    assert "369,216 numbers x 4 B (the model's dtype); projected: 65,536 x 2 B" in text
    assert "ratio of numbers P/k is 5.63x, of bytes 11.3x" in text and "| 11× |" in text


def test_table3_compression_keeps_two_digits_below_ten():
    compression = dict(COLUMNS["table3"])["Compression"]  # below 10x (k near P) two digits, not "0x" or "1x"
    assert [compression({"compression": c}) for c in (111358.8, 11.2, 5.63, 0.5, None)] == [
        "111,359×",
        "11×",
        "5.6×",
        "0.5×",
        "-",
    ]


def test_format_bytes_shows_decimal_and_binary_units():
    assert format_bytes(14596022272) == "14.60 GB = 13.59 GiB (14,596,022,272 B)"
    assert format_bytes(500 * 14596022272).startswith("7.30 TB = 6.64 TiB")
    assert format_bytes(131072).startswith("131.07 KB = 128.00 KiB")
    assert format_bytes(500 * 131072).startswith("65.54 MB = 62.50 MiB")
    assert format_bytes(512) == "512 B = 512 B (512 B)" and format_bytes(None) == "-"


def test_write_tables_markdown_and_csv(tmp_path, single_run):
    tables = build_tables({"run": load_metrics(single_run)})
    files = write_tables(tables, tmp_path / "tables")
    assert [f.name for f in files] == [f"table{i}.{ext}" for i in range(1, 5) for ext in ("md", "csv")]
    md = {i: (tmp_path / "tables" / f"table{i}.md").read_text().splitlines() for i in range(1, 5)}
    assert md[1][0] == "### TABLE I: Influence score comparison across data sources (Epoch 2)"
    assert md[1][2] == "| Data Source | Mean Max | FT Wins |"
    assert "| finetune | 0.386 | - |" in md[1] and "| medical_format | 0.365 | 86.6% |" in md[1]
    assert md[2][0] == "### TABLE II: Influence score evolution during fine-tuning"
    assert md[2][2].startswith("| Epoch | FT | PT | Ratio | PT Wins | Acc. | lr | Format Effect (medical) |")
    assert "| 0 (base) | 0.482 | 0.395 | 1.22 | 0.0% | 41.8% | - | 3.71× | 2.99× |" in md[2]
    assert "| 4* | 0.314 | 0.291 | 1.08 | 24.8% | - | 2e-05 | 2.86× | 2.99× |" in md[2]
    assert md[2][-1] == "\\*Epochs 4, 5 use a lower learning rate (2e-05) than the run's maximum (0.0002)."
    assert md[3][0] == "### TABLE III: Storage requirements for attribution methods"
    assert any("14.60 GB = 13.59 GiB" in line and "7.30 TB = 6.64 TiB" in line for line in md[3])
    assert "| Compression ratio (full / projected) | - | - | - | 111,359× |" in md[3]
    assert md[4][0] == "### TABLE IV: Attribution accuracy: LARK (gradient) vs BM25 (Epoch 2)"
    assert "| Difference | +46.2 pp | LARK minus BM25 |" in md[4]

    with open(tmp_path / "tables" / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["epoch", "lr", "reduced_lr", "ft"]
    assert float(rows[0]["ratio"]) == 0.482 / 0.395  # full precision
    assert rows[0]["lr"] == "" and rows[4]["reduced_lr"] == "True"


def test_table2_names_each_epochs_kernel_when_a_run_mixes_them(tmp_path):
    """A run whose epoch 2 was re-attributed with another kernel (attribute.py on a subset of checkpoints): Table
    II gains a Kernel/projector column and a footnote instead of showing one series; one kernel: neither."""
    metrics = [paper_metrics(e) | {"kernel": {"name": "rapidin"}} for e in (0, 1, 2)]
    metrics[2] |= {"kernel": {"name": "adam"}, "projector": {"kind": "factored"}}
    write_tables(build_tables({"run": metrics}), tmp_path / "mixed")
    md = (tmp_path / "mixed" / "table2.md").read_text().splitlines()
    assert md[2].endswith("| Kernel/projector |") and md[4].endswith("| rapidin/rapidin |")
    assert md[6].endswith("| adam/factored |") and "not one series" in md[-1]
    write_tables(build_tables({"run": metrics[:2]}), tmp_path / "one")
    assert "Kernel" not in (tmp_path / "one" / "table2.md").read_text()


def test_multirun_tables_lead_with_job_and_show_nulls(multirun, tmp_path):
    runs = {label: load_metrics(d) for label, d in find_runs(multirun).items()}
    tables = build_tables(runs)
    for rows in tables.values():
        assert all(list(row)[0] == "job" for row in rows)
    table1 = [row for row in tables["table1"] if row["job"] == "format=noformat"]
    assert {row["epoch"] for row in table1} == {0}  # job 1: epoch 2 has no accuracy -> best is 0
    sparse = build_tables(runs, table1_epoch=2)
    noformat = [r for r in sparse["table4"] if r["job"] == "format=noformat"]
    assert noformat[1]["ft_wins_pct"] is None and noformat[2]["difference_pp"] is None

    write_tables(sparse, tmp_path / "out")
    md1 = (tmp_path / "out" / "table1.md").read_text().splitlines()
    assert md1[2] == "| Job | Data Source | Mean Max | FT Wins |"
    assert "| format=noformat | medical_noformat | - | 100.0% |" in md1
    md2 = (tmp_path / "out" / "table2.md").read_text()
    assert md2.splitlines()[2].endswith("| Format Effect (entertainment) | Format Effect (wiki) |")
    assert "| format=noformat | 2 | 0.386 | 0.365 | - | 13.4% | - | 0.0002 | - | 2.99× | 1.50× |" in md2
    assert "| format=chatml | 5* | 0.366 | 0.341 | 1.07 | 28.4% | - | 2e-05 | 2.90× | 2.99× | - |" in md2
    assert "\\*format=chatml: Epochs 4, 5 use a lower learning rate" in md2
    md4 = (tmp_path / "out" / "table4.md").read_text()
    assert "| format=noformat | Difference | - | LARK minus BM25 |" in md4
    with open(tmp_path / "out" / "table3.csv") as f:
        assert next(csv.reader(f))[:2] == ["job", "method"]


def test_table1_title_when_jobs_differ_in_epoch(multirun, tmp_path):
    runs = {label: load_metrics(d) for label, d in find_runs(multirun).items()}
    write_tables(build_tables(runs), tmp_path)
    md1 = (tmp_path / "table1.md").read_text().splitlines()
    assert md1[0].endswith("(per-run epoch, see the Epoch column)")
    assert md1[2] == "| Job | Epoch | Data Source | Mean Max | FT Wins |"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, path


def test_figures_are_pngs(single_run, multirun, tmp_path):
    for name, path in [("single", single_run), ("multi", multirun)]:
        runs = {label: load_metrics(d) for label, d in find_runs(path).items()}
        files = plot_figures(runs, tmp_path / name, table1_epoch=2)
        assert [f.name for f in files] == ["fig1_influence.png", "fig2_pt_wins.png", "fig3_method.png"]
        for f in files:
            assert_png(f)


def drawn_figures(monkeypatch, runs, tmp_path):
    """{file name: matplotlib Figure} as plot_figures draws them (save_figure captures instead of writing)."""
    from lark.analysis import figures

    drawn = {}
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: drawn.__setitem__(path.name, figure))
    plot_figures(runs, tmp_path, table1_epoch=2)
    return drawn


def lines_of(ax):
    """{label: (x, y)} of an axis' plotted lines."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_figures_1_and_2_plot_each_sources_mean_max_and_pt_wins_per_epoch(single_run, monkeypatch, tmp_path):
    """The PNG tests checked only the file's magic bytes: Fig. 2 drawing FT wins, or Fig. 1 drawing zeros, passed."""
    metrics = load_metrics(single_run)
    drawn = drawn_figures(monkeypatch, {"run": metrics}, tmp_path)
    epochs = [m["epoch"] for m in metrics]
    formatted, raw = (lines_of(ax) for ax in drawn["fig1_influence.png"].axes)
    for name, source in metrics[0]["sources"].items():
        values = [m["sources"][name]["mean_max"] for m in metrics]
        if source["formatted"] or name == metrics[0]["ft_source"]:
            assert formatted[name] == (epochs, values), name
        if not source["formatted"]:
            assert raw[name] == (epochs, values), name
    assert raw[f"{metrics[0]['ft_source']} (reference)"] == formatted[metrics[0]["ft_source"]]
    (ax,) = drawn["fig2_pt_wins.png"].axes
    assert lines_of(ax)["PT wins"] == (epochs, [pytest.approx(100 * m["pt_wins"]) for m in metrics])
    shaded = sorted(round(p.get_x() + p.get_width() / 2) for p in ax.patches)  # the reduced-lr epochs' spans
    assert shaded == [m["epoch"] for m in metrics if m["epoch"] >= 4] and shaded


def test_an_out_dir_that_is_a_file_is_named_before_anything_is_written(single_run, tmp_path):
    """analyze.py out_dir=<a file> gave NotADirectoryError's traceback."""
    from lark.errors import ConfigError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"out_dir=.*notes\.txt: is a file, not a folder"):
        analyze(single_run, out_dir=tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (single_run / "tables").exists()


def test_analyze_end_to_end(multirun, single_run, tmp_path):
    result = analyze(multirun)
    assert list(result["runs"]) == ["format=chatml", "format=noformat"]
    assert {f.parent for f in result["table_files"]} == {multirun / "tables"}
    assert {f.parent for f in result["figure_files"]} == {multirun / "figures"}
    assert list(find_runs(multirun)) == list(result["runs"])  # outputs are not mistaken for runs
    result = analyze(single_run, out_dir=tmp_path / "report", table1_epoch="last")
    assert result["runs"] == {"run": single_run}
    assert {row["epoch"] for row in result["tables"]["table1"]} == {5}
    assert all(f.exists() for f in result["table_files"] + result["figure_files"])
    assert (tmp_path / "report" / "tables" / "table4.md").read_text().startswith("### TABLE IV")
    assert (
        "Checkpoint: epoch 5, the last epoch (table1_epoch=last)."
        in (tmp_path / "report" / "tables" / "table1.md").read_text()
    )
    assert "first show epoch 5: the last epoch (table1_epoch=last)." in result["report"].read_text()


def test_a_sweeps_jobs_give_their_analysis_settings_unless_they_differ(multirun):
    """analyze.py's table1_epoch / report / snippet_chars default to the runs' own analysis.* (null in
    conf/analyze.yaml); a sweep whose jobs asked for different ones must be told which to use."""
    from omegaconf import OmegaConf

    from lark.analysis.analyze import own_settings
    from lark.errors import ConfigError

    saved = {"table1_epoch": "last", "report": False, "report_snippet_chars": 50}
    for job in ("0", "1"):
        OmegaConf.save({"analysis": saved}, multirun / job / ".hydra" / "config.yaml")
    got = own_settings(multirun, table1_epoch=None, report=None, snippet_chars=None)
    assert got == {"table1_epoch": "last", "report": False, "snippet_chars": 50}
    assert own_settings(multirun, report=True)["report"] is True
    OmegaConf.save({"analysis": {**saved, "table1_epoch": 2}}, multirun / "1" / ".hydra" / "config.yaml")
    with pytest.raises(ConfigError, match=r"table1_epoch: the sweep's jobs differ in analysis.table1_epoch"):
        own_settings(multirun)
    assert own_settings(multirun, table1_epoch="best", report=True, snippet_chars=9)["snippet_chars"] == 9


def test_analyze_refuses_a_killed_run_and_names_a_sweeps_failed_job(tmp_path):
    """A run killed after epoch 0 of 2 was analysed as complete (Table I at "the best" of one epoch); a sweep's
    job that failed before attribution/ existed was left out of the comparison without a word."""
    from omegaconf import OmegaConf

    run = write_run(tmp_path / "killed", [paper_metrics(0)])
    OmegaConf.save({"trainer": {"max_epochs": 2}, "attribution": {"checkpoints": "all"}}, run / "lark_config.yaml")
    with pytest.raises(RunDirError, match=r"(?s)attribution/epoch_001: missing.*epoch_002: missing"):
        analyze(run)
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", [paper_metrics(0)], overrides=["seed=0"])
    (sweep / "1" / ".hydra").mkdir(parents=True)  # job 1 failed at start
    with pytest.raises(RunDirError, match=r"job\(s\) 1 have no attribution/"):
        find_runs(sweep)


def test_figure_3_keeps_lark_one_colour_and_says_larger_when_the_projection_is(tmp_path):
    """Fig. 3 coloured the first bar red and the second blue, so red was TracIn in panel A and LARK in panel B; a
    projection bigger than the full gradient (ratio 0.49) was annotated "0× smaller"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lark.analysis.figures import LARK, plot_storage, plot_wins

    _, (a, b) = plt.subplots(1, 2)
    storage = [[{"bytes_per_example": 4000}, {"bytes_per_example": 8192}, {"compression": 4000 / 8192}]]
    plot_storage(a, storage)
    plot_wins(b, [{"epoch": 3, "ft_wins": 0.9, "bm25": {"ft_wins": 0.22}}])
    colors = [
        {c.get_label(): matplotlib.colors.to_hex(c.patches[0].get_facecolor()) for c in ax.containers} for ax in (a, b)
    ]
    assert colors[0]["LARK (projected)"] == colors[1]["LARK (gradient)"] == matplotlib.colors.to_hex(LARK)
    assert colors[0]["Full gradient (TracIn)"] == colors[1]["BM25"] != matplotlib.colors.to_hex(LARK)
    assert [t.get_text() for t in a.texts if "×" in t.get_text()] == ["2× larger"]
    plt.close("all")
