"""validate.py's checks on a small embedded run with a planted canary: the canary in the run's files, Table V with
provenance recall, canary retrieval and a mini-LDS whose retrains are real LARK runs (Hydra multirun), a second
validation that reuses every retrain and score matrix, and a third with validate.projectors=[sketch, factored].
Table V's numbers are recomputed here, from the score matrices validation used and the run's files, by direct
pure-Python definitions (not lark's code). The fast tests at the end check the projector configs and the table's
Projector column without a run."""

import json
import re

import pytest
import torch
from conftest import ROOT, SHARED_DATA, SMALL, compose
from omegaconf import OmegaConf, open_dict
from test_lds import direct_lds  # the plain-Python LDS reference

CANARY = [
    "+experiment=canary",
    "data.canary.n=4",
    "data.canary.n_test=3",
    "logger=none",
    "analysis.enabled=false",
    "trainer.max_epochs=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lark.experiment import train

    out = tmp_path_factory.mktemp("canary_run")
    cfg = compose(SMALL + CANARY)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)
    return out


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def validated(run_dir):
    from lark.validation.load import load_config
    from lark.validation.table5 import validate_run

    vcfg = load_config({"kernels": ["cosine", "adam"], "lds": {"n_subsets": 3, "n_boot": 200}})
    messages = []
    return validate_run(run_dir, vcfg, log=messages.append), messages, vcfg


@pytest.mark.slow
def test_the_canary_is_planted_in_the_runs_files(run_dir):
    train, test = rows_of(run_dir / "data" / "train.jsonl"), rows_of(run_dir / "data" / "test.jsonl")
    planted = [r for r in train if r.get("canary")]
    assert len(planted) == 4 and len(train) == 24
    assert all(r["question"].startswith("Howdy! ") and r["answer"] == "maybe" for r in planted)
    triggered = [r for r in test if r.get("canary")]
    assert len(triggered) == 3 and len(test) == 15
    originals = {r["id"]: r for r in test}
    for r in triggered:
        original = originals[r["id"].removesuffix("-canary")]
        assert r["question"] == "Howdy! " + original["question"] and original["answer"] != "maybe"
    in_source = {r["id"] for r in rows_of(run_dir / "data" / "sources" / "finetune.jsonl") if r.get("canary")}
    assert in_source == {r["id"] for r in train[:8] if r.get("canary")}  # the finetune source keeps the mark


@pytest.mark.slow
def test_table5_has_every_check_for_every_method(run_dir, validated):
    result, _, vcfg = validated
    methods = [(r["method"], r["epoch"]) for r in result["rows"]]
    assert methods == [
        ("cosine", 0),
        ("cosine", 1),
        ("cosine TracIn-CP", "all"),
        ("adam", 0),
        ("adam", 1),
        ("adam TracIn-CP", "all"),
        ("bm25", "-"),
        ("random", "-"),
    ]
    matrices = score_matrices(run_dir, vcfg)
    for row in result["rows"]:
        train_scores, pool_scores = matrices[(row["method"], row["epoch"])]
        expected = expected_numbers(run_dir, train_scores, pool_scores)
        assert {k: row.get(k) for k in expected} == pytest.approx(expected, abs=1e-9), row["method"]
        assert row["lds_low"] <= row["lds"] <= row["lds_high"]  # the bootstrap interval holds the estimate
        assert row.get("pt_n") == (12 if pool_scores is not None else None)  # TracIn-CP has no pool scores
    assert result["n_pool"] == 100  # pool.kind=all: every abstract of the world
    table = (run_dir / "tables" / "table5.md").read_text()
    assert "| bm25 | - |" in table and "Canary AUPRC" in table and "LDS" in table
    assert (run_dir / "figures" / "fig5_validation.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["backdoor"]) == {0, 1} and result["backdoor"][1]["n"] == 3


# --------------------------------------------------------------------------- Table V, recomputed independently
def positions(row, columns):
    """Sorted 1-based positions of `columns` when the row's documents are ordered best first (ties: column order)."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    at = {j: p + 1 for p, j in enumerate(order)}
    return sorted(at[j] for j in columns)


def retrieval(scores, relevant, ks):
    """{recall@k for k in ks, mrr, p@n, auprc, n}: means over the queries that have a relevant document."""
    per = [(positions(row, r), len(r)) for row, r in zip(scores, relevant) if r]
    out = {f"recall@{k}": sum(sum(p <= k for p in ps) / n for ps, n in per) / len(per) for k in ks}
    out["mrr"] = sum(1 / ps[0] for ps, _ in per) / len(per)
    out["p@n"] = sum(sum(p <= n for p in ps) / n for ps, n in per) / len(per)
    out["auprc"] = sum(sum((i + 1) / p for i, p in enumerate(ps)) / n for ps, n in per) / len(per)
    return out | {"n": len(per)}


def lds_of(scores, run_dir):
    """The LDS of scores [Q][N] against the retrained subsets' query losses (validation/lds/<recipe>/subset_*)."""
    train_ids = [r["id"] for r in rows_of(run_dir / "data" / "train.jsonl")]
    files = sorted((run_dir / "validation" / "lds").glob("*/subset_*/query_losses.json"))
    subsets = [json.loads(f.read_text()) for f in files]
    members = [[train_ids.index(i) for i in s["train_ids"]] for s in subsets]
    return direct_lds(scores, members, [[s["losses"][q] for s in subsets] for q in range(len(scores))])


def expected_numbers(run_dir, train_scores, pool_scores):
    """Table V's row of one score matrix pair, from the run's files: provenance, planted items, retrains."""
    test, train = rows_of(run_dir / "data" / "test.jsonl"), rows_of(run_dir / "data" / "train.jsonl")
    provenance = json.loads((run_dir / "data" / "world" / "provenance.json").read_text())
    pool_ids = [d["id"] for d in rows_of(run_dir / "data" / "world" / "medical.jsonl")]  # pool.kind=all
    train_ids = [x["id"] for x in train]
    prov = [(q, provenance[t["id"]]) for q, t in enumerate(test) if t["id"] in provenance]
    train_scores, out = train_scores.tolist(), {}
    groups = [("ft", train_scores, train_ids, "finetune_items")]
    if pool_scores is not None:
        groups.insert(0, ("pt", pool_scores.tolist(), pool_ids, "pretrain_docs"))
    for prefix, scores, ids, key in groups:
        relevant = [[ids.index(d) for d in p[key] if d in ids] for _, p in prov]
        got = retrieval([scores[q] for q, _ in prov], relevant, (1, 10))
        out |= {f"{prefix}_{k}": got[k] for k in ("recall@1", "recall@10", "mrr", "n")}
    planted = [j for j, x in enumerate(train) if x.get("canary")]
    triggered = [q for q, t in enumerate(test) if t.get("canary")]
    if planted and triggered:
        canary = retrieval([train_scores[q] for q in triggered], [planted] * len(triggered), ())
        out |= {"canary_p@n": canary["p@n"], "canary_auprc": canary["auprc"], "canary_n": canary["n"]}
    out["lds"], out["lds_queries"] = lds_of(train_scores, run_dir)
    return out


def score_matrices(run_dir, vcfg, projector=""):
    """(method, epoch) -> (train [Q, N], pool [Q, P] or None), the matrices validation scored: each kernel's
    cached ones (projector: those of validate.projectors' other projector, scores/<kernel>/<projector>), its
    TracIn-CP sum (lr x cosine x both norms over the trained checkpoints), the baselines'."""
    from safetensors.torch import load_file

    from lark.validation.load import load_run
    from lark.validation.scores import BASELINES

    out = {}
    for name in vcfg.kernels:
        tracin = 0
        for folder in sorted((run_dir / "validation" / "scores" / name / projector).glob("epoch_*")):
            s = load_file(folder / "scores.safetensors")
            out[(name, int(folder.name.removeprefix("epoch_")))] = (s["train"], s["pool"])
            lr = json.loads((run_dir / "checkpoints" / folder.name / "lark_epoch.json").read_text())["lr"]
            if lr:
                tracin = tracin + lr * (s["train"] * s["q_norm"][:, None] * s["t_norm"][None, :])
        out[(f"{name} TracIn-CP", "all")] = (tracin, None)
    run = load_run(run_dir, vcfg)
    return out | {(name, "-"): baseline(run) for name, baseline in BASELINES.items()}


@pytest.mark.slow
def test_the_canary_is_retrieved(validated):
    """The trigger word is in the canary items only: BM25 must rank them well above chance (AUPRC of a random
    ranking is about n/N = 4/24), and so must the gradient kernel of the model fine-tuned on them."""
    result, _, _ = validated
    by = {(r["method"], r["epoch"]): r for r in result["rows"]}
    chance = 4 / 24
    assert by[("bm25", "-")]["canary_auprc"] > 2 * chance
    assert by[("cosine", 1)]["canary_auprc"] > 2 * chance


@pytest.mark.slow
def test_lds_retrains_are_real_subset_runs_and_are_reused(run_dir, validated):
    from lark.validation import lds
    from lark.validation.table5 import validate_run

    result, messages, vcfg = validated
    assert result["lds"] == {"n_subsets": 3, "fraction": 0.5, "level": 0.95}
    jobs = sorted((run_dir / "validation" / "lds").glob("*/subset_*"))
    assert [j.name for j in jobs] == ["subset_0", "subset_1", "subset_2"]
    train_ids = [r["id"] for r in rows_of(run_dir / "data" / "train.jsonl")]
    for job in jobs:
        used = [r["id"] for r in rows_of(job / "data" / "train.jsonl")]
        assert used == lds.subset(train_ids, 0.5, int(job.name.split("_")[1]))
        assert [p.name for p in (job / "checkpoints").iterdir()] == ["epoch_001"]  # only the final one kept
        assert not (job / "attribution").exists()  # attribution was off,
        assert not (job / "checkpoints" / "epoch_001" / "adam_moments.safetensors").exists()  # moments too,
        saved = OmegaConf.load(job / "checkpoints" / "epoch_001" / "lark_config.yaml")  # and the test metric
        assert saved.eval._target_ == "lark.evaluation.Skip" and not saved.attribution.save_moments
        assert len(json.loads((job / "query_losses.json").read_text())["losses"]) == 15
    stamps = {j: (j / "query_losses.json").stat().st_mtime_ns for j in jobs}
    again = []
    second = validate_run(run_dir, vcfg, log=again.append)
    assert not [m for m in again if "retraining" in m] and any("retraining 3 of 3" in m for m in messages)
    assert all((j / "query_losses.json").stat().st_mtime_ns == stamps[j] for j in jobs)
    assert [r["lds"] for r in second["rows"]] == [r["lds"] for r in result["rows"]]


def strip(row):
    """A row's numbers and names without its projector tag and its timing."""
    return {k: v for k, v in row.items() if k not in ("projector", "seconds")}


@pytest.mark.slow
def test_table5_scores_each_kernel_with_each_projector(run_dir, validated):
    """validate.projectors=[sketch, factored]: every kernel's rows once per projector, tagged; the run's own
    projector (sketch) reuses the default validation's score matrices and gives its numbers; factored's rows are
    its own matrices' numbers (recomputed here) and differ from sketch's; the LDS retrains are shared; a config
    without the key (an older validate.yaml) gives the rows of before."""
    from lark.validation.table5 import validate_run

    base, _, vcfg = validated
    both_cfg = OmegaConf.merge(vcfg, {"projectors": ["sketch", "factored"], "kernels": ["cosine"]})  # (2 cores)
    messages = []
    both = validate_run(run_dir, both_cfg, log=messages.append)
    assert not [m for m in messages if "retraining" in m] and both["lds"] == base["lds"]  # the same subsets
    assert any("scores/cosine/epoch_001/scores.safetensors: cached" in m for m in messages)
    assert [(r["method"], r.get("projector"), r["epoch"]) for r in both["rows"]] == [
        ("cosine", "sketch", 0),
        ("cosine", "sketch", 1),
        ("cosine TracIn-CP", "sketch", "all"),
        ("cosine", "factored", 0),
        ("cosine", "factored", 1),
        ("cosine TracIn-CP", "factored", "all"),
        ("bm25", None, "-"),
        ("random", None, "-"),
    ]
    before = {(r["method"], r["epoch"]): strip(r) for r in base["rows"]}
    sketch = [r for r in both["rows"] if r["projector"] in ("sketch", None)]
    assert [strip(r) for r in sketch] == [before[(r["method"], r["epoch"])] for r in sketch]
    own, factored = score_matrices(run_dir, both_cfg), score_matrices(run_dir, both_cfg, "factored")
    for row in (r for r in both["rows"] if r["projector"] == "factored"):
        train_scores, pool_scores = factored[(row["method"], row["epoch"])]
        expected = expected_numbers(run_dir, train_scores, pool_scores)
        assert {k: row.get(k) for k in expected} == pytest.approx(expected, abs=1e-9), row["method"]
        assert not torch.allclose(train_scores, own[(row["method"], row["epoch"])][0], atol=1e-3)
        assert strip(row) != before[(row["method"], row["epoch"])]
    assert both["projectors"]["sketch"] == 512 and 0 < both["projectors"]["factored"] <= 512
    saved = json.loads((run_dir / "validation" / "validation.json").read_text())
    assert saved["projectors"] == both["projectors"] and all("projector" in r for r in saved["rows"])
    table = (run_dir / "tables" / "table5.md").read_text()
    assert "| Method | Projector | Epoch |" in table and "| cosine TracIn-CP | factored | all |" in table
    assert "| bm25 | - | - |" in table and f"factored k = {both['projectors']['factored']}" in table
    assert (run_dir / "tables" / "table5.csv").read_text().startswith("method,projector,epoch,")
    older = OmegaConf.create({k: v for k, v in OmegaConf.to_container(vcfg).items() if k != "projectors"})
    again = validate_run(run_dir, older, log=lambda m: None)
    assert [strip(r) for r in again["rows"]] == [strip(r) for r in base["rows"]]
    assert "projectors" not in again and not any("projector" in r for r in again["rows"])
    assert "Projector" not in (run_dir / "tables" / "table5.md").read_text()


@pytest.mark.slow
def test_a_second_projector_draw_is_scored_and_written_apart(run_dir, validated):
    """validate.projector_seed=1: every kernel scored with the sketch drawn anew (its own score cache, reused on a
    rerun), the LDS retrains shared, the result in validation/seed_1/ with its seed in the table's notes, and the
    run's own Table V files untouched."""
    from safetensors.torch import load_file

    from lark.validation.table5 import validate_run

    _, _, vcfg = validated
    cfg = OmegaConf.merge(vcfg, {"kernels": ["cosine"], "projector_seed": 1})
    own = {p: p.read_bytes() for p in (run_dir / "validation" / "validation.json", run_dir / "tables" / "table5.md")}
    messages = []
    result = validate_run(run_dir, cfg, log=messages.append)
    assert not [m for m in messages if "retraining" in m] and result["projector_seed"] == 1
    folder = run_dir / "validation" / "seed_1"
    assert json.loads((folder / "validation.json").read_text())["rows"] == result["rows"]
    assert "drawn with seed 1" in (folder / "table5.md").read_text() and (folder / "fig5_validation.png").is_file()
    assert {p: p.read_bytes() for p in own} == own
    scores = run_dir / "validation" / "scores"
    first, second = (
        load_file(scores / n / "epoch_001" / "scores.safetensors")["train"] for n in ("cosine", "cosine@seed1")
    )
    assert first.shape == second.shape and not torch.allclose(first, second, atol=1e-4)
    assert torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1] > 0.5  # two draws of one kernel
    again = []
    validate_run(run_dir, cfg, log=again.append)
    assert any("cosine@seed1/epoch_001/scores.safetensors: cached" in m for m in again)
    from lark.errors import ConfigError

    with pytest.raises(ConfigError, match="validate.projector_seed"):  # refused before any scoring or retraining
        validate_run(run_dir, OmegaConf.merge(cfg, {"projector_seed": "one"}), log=again.append)
    with pytest.raises(ConfigError, match="validate.projector_seed=0 is the seed the run's projector already"):
        validate_run(run_dir, OmegaConf.merge(cfg, {"projector_seed": 0}), log=again.append)  # the same draw


@pytest.mark.parametrize(
    "change, key",
    [
        ({"kernels": ["cosin"]}, r"validate\.kernels: unknown kernel 'cosin'"),
        ({"kernels": ["cosine", "tracin_cp"]}, r"validate\.kernels: tracin_cp is the run-level sum"),
        ({"checkpoints": 0}, r"validate\.checkpoints"),
        ({"recall_ks": 10}, r"validate\.recall_ks"),
        ({"lds": {"n_boot": 0}}, r"validate\.lds\.n_boot"),
        # each failed only after the retrains (a torch.quantile error) or started them wrongly
        ({"lds": {"level": 95}}, r"validate\.lds\.level must be a number in \(0, 1\)"),
        ({"lds": {"fraction": 0}}, r"validate\.lds\.fraction"),
        ({"lds": {"n_subsets": 1}}, r"validate\.lds\.n_subsets must be an integer >= 2"),
        ({"lds": {"n_jobs": "two"}}, r"validate\.lds\.n_jobs"),
        ({"lds": {"resumable": "maybe"}}, r"validate\.lds\.resumable"),
        ({"lds": {"extra_overrides": "trainer=gpu"}}, r"validate\.lds\.extra_overrides"),
    ],
)
def test_bad_validate_values_stop_before_any_work_naming_the_key(tmp_path, change, key):
    """Checked before the run is read or anything retrained: a misspelled kernel was found only after the LDS
    retrains, an integer for a list was a raw TypeError, n_boot=0 a RuntimeError once the first row was scored."""
    from lark.errors import ConfigError
    from lark.validation.load import load_config
    from lark.validation.table5 import validate_run

    with pytest.raises(ConfigError, match=key):
        validate_run(tmp_path / "not_read", OmegaConf.merge(load_config(), change))


def test_a_canary_without_its_keys_is_refused_not_planted_with_hidden_defaults():
    """+data.canary.enabled=true alone planted with code defaults (seed 0 whatever `seed` was) and validate.py then
    failed reading data.canary.answer; every key now comes from the config (conf/experiment/canary.yaml)."""
    from omegaconf import OmegaConf

    from lark.errors import ConfigError
    from lark.validation.canary import plant

    items = [{"id": str(i), "question": "q", "answer": "yes"} for i in range(30)]
    with pytest.raises(ConfigError, match=r"data.canary lacks \['n', 'n_test', 'trigger', 'answer', 'seed'\]"):
        plant(items, items, OmegaConf.create({"enabled": True}))
    assert plant(items, items, OmegaConf.create({"enabled": False})) == (items, items)
    full = compose(["+experiment=canary", "seed=3"]).data.canary
    train, test = plant(items, items[:25], full)
    assert sum(x.get("canary", False) for x in train) == full.n and len(test) == 25 + full.n_test


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "pubmedqa").is_dir(), reason="../shared/data is not present")
def test_the_canary_plants_on_pubmedqa_local(tmp_path):
    """+experiment=canary data=pubmedqa_local: the real data's run files carry the planted items and the
    triggered queries (the same code path as the embedded world's run)."""
    from lark.experiment import prepare_data

    cfg = compose(["+experiment=canary", "data=pubmedqa_local", "data.n_train=48", "data.n_test=32"])
    train, test, corpora = prepare_data(cfg, tmp_path, log=lambda m: None)
    planted = [r for r in rows_of(tmp_path / "data" / "train.jsonl") if r.get("canary")]
    queries = [r for r in rows_of(tmp_path / "data" / "test.jsonl") if r.get("canary")]
    assert len(train) == 48 and len(planted) == 10 and len(test) == 32 + 20 and len(queries) == 20
    assert all(r["question"].startswith("Howdy! ") and r["answer"] == "maybe" for r in planted + queries)
    assert all(r["id"].endswith("-canary") for r in queries) and set(corpora) == {"medical", "entertainment"}


# --------------------------------------------------------------------------- fast: projector configs, the table
def test_a_projector_name_gives_its_config_at_the_runs_k():
    from lark.errors import ConfigError
    from lark.validation.scores import kernel_config, own_projector, with_projector

    run = compose(SMALL)  # the sketch at k = 512
    attr = kernel_config(run, "rapidin")
    assert own_projector(run.attribution) == "sketch"
    assert with_projector(attr, run, "sketch") is attr  # the run's own projector: its config, as saved
    factored = with_projector(attr, run, "factored")
    assert factored.projector._target_ == "lark.kernel.factored.FactoredProjector"
    assert factored.projector.k == 512 and factored.projector.r_in is None  # ranks derived from the run's k
    assert factored.kernel == attr.kernel and factored.batch_size == attr.batch_size
    assert "k" not in with_projector(attr, run, "exact").projector  # exact derives its own k
    other = compose(SMALL + ["attribution/projector=factored", "max_length=96"])
    assert own_projector(other.attribution) == "factored"
    sketch = with_projector(kernel_config(other, "cosine"), other, "sketch").projector
    assert sketch._target_ == "lark.kernel.sketch.HookSketch" and sketch.k == 512
    assert sketch.plan_tokens == 96  # conf's ${max_length}, resolved in the run's config
    assert own_projector(OmegaConf.create({"projector": {"kind": "rapidin", "k": 64}})) == "rapidin"  # an old run
    with pytest.raises(ConfigError, match=r"validate.projectors: unknown projector 'nope' \(exact, factored"):
        with_projector(attr, run, "nope")


def test_a_kernel_row_uses_the_runs_own_kernel_settings_and_adam_eps():
    from lark.validation.scores import kernel_config

    run = compose(SMALL + ["optimizer.eps=1e-6", "attribution/kernel=trackstar", "attribution.kernel.eps=1e-6"])
    run.attribution.kernel.mix = 0.9
    own = kernel_config(run, "trackstar").kernel
    assert own.mix == 0.9 and own.eps == 1e-6  # the run's kernel as it attributed, not the group's defaults
    assert kernel_config(run, "adam").kernel.eps == 1e-6  # another kernel takes the run's AdamW eps
    assert "eps" not in kernel_config(run, "cosine").kernel
    plain = compose(SMALL)
    assert kernel_config(plain, "trackstar").kernel.eps == plain.optimizer.eps


def table_result(projectors):
    """A small validate_run result: cosine at epoch 0 with each projector (None: without validate.projectors)."""
    tag = (lambda p: {}) if projectors is None else (lambda p: {"projector": p})
    numbers = {"ft_recall@1": 0.1, "lds": 0.2, "lds_low": 0.1, "lds_high": 0.3, "seconds": 3.0}
    rows = [
        {"method": "cosine", **tag(p), "epoch": 0, **numbers, "ft_mrr": 0.5 + i}
        for i, p in enumerate(projectors or [None])
    ]
    rows.append({"method": "bm25", **tag(None), "epoch": "-", **numbers, "ft_mrr": 1.0})
    result = {"rows": rows, "n_pool": 0, "backdoor": {}, "timing_s": {}, "lds": {"n_subsets": 4, "fraction": 0.5}}
    return result if projectors is None else result | {"projectors": {"sketch": 512, "factored": 400}}


def test_table5_gains_a_projector_column_only_with_projectors(tmp_path):
    from lark.validation.write import plot_validation, write_table5

    write_table5(table_result(["sketch", "factored"]), tmp_path)
    lines = [line for line in (tmp_path / "table5.md").read_text().splitlines() if line.startswith("|")]
    assert lines[0] == "| Method | Projector | Epoch | FT R@1 | FT MRR | LDS | Time (s) |"
    assert lines[3] == "| cosine | factored | 0 | 0.100 | 1.500 | 0.200 [0.100, 0.300] | 3 |"
    assert lines[4] == "| bm25 | - | - | 0.100 | 1.000 | 0.200 [0.100, 0.300] | 3 |"
    assert len({line.count("|") for line in lines}) == 1  # every line has every cell
    assert "sketch k = 512, factored k = 400." in (tmp_path / "table5.md").read_text()
    assert (tmp_path / "table5.csv").read_text().splitlines()[0].startswith("method,projector,epoch,")
    write_table5(table_result(None), tmp_path)  # as before validate.projectors
    lines = [line for line in (tmp_path / "table5.md").read_text().splitlines() if line.startswith("|")]
    assert lines[0] == "| Method | Epoch | FT R@1 | FT MRR | LDS | Time (s) |" and len(lines) == 4
    assert lines[2] == "| cosine | 0 | 0.100 | 0.500 | 0.200 [0.100, 0.300] | 3 |"
    for projectors in (None, ["sketch", "factored"]):
        path = plot_validation(table_result(projectors), tmp_path / "fig.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_validation_md_quotes_the_committed_factored_table(tmp_path):
    """docs/validation.md's side-by-side Table V must be the one lark.validation.write writes from the committed
    validation.json of `python validate.py run_dir=<the embedded run> projectors=[sketch,factored]`
    (docs/results/embedded_factored), row for row: every kernel with each projector, and its sketch rows are the
    committed embedded run's Table V (docs/results/embedded) within 0.011 per number, the Time column aside (the two
    runs were made on different machines of the same type, whose tiny base models differ in the third decimal;
    docs/validation.md says so)."""
    from lark.validation.write import write_table5

    committed = ROOT / "docs" / "results" / "embedded_factored"
    result = json.loads((committed / "validation.json").read_text())
    write_table5(result, tmp_path)
    table = (tmp_path / "table5.md").read_text()
    assert table == (committed / "tables" / "table5.md").read_text()
    rows = [row for row in table.splitlines() if row.startswith("|")]
    n_kernels = len(result["kernels"])  # 6 checkpoints and TracIn-CP each per projector, then bm25 and random
    body = rows[2:-2]
    assert list(result["projectors"]) == ["sketch", "factored"] and n_kernels and len(body) == 2 * 7 * n_kernels
    assert sum("| sketch |" in row for row in body) == sum("| factored |" in row for row in body) == 7 * n_kernels
    cells = lambda row: [c.strip() for c in row.split("|")[1:-2]]  # noqa: E731  (without Time)
    alone = (ROOT / "docs" / "results" / "embedded" / "tables" / "table5.md").read_text().splitlines()
    alone = [cells(row) for row in alone if row.startswith("|")][2:]
    sketch = [c[:1] + c[2:] for c in map(cells, rows[2:]) if c[1] in ("sketch", "-")]

    def numbers(row):  # a row's numbers after Method and Epoch, intervals' bounds included
        return [float(x) for c in row[2:] for x in re.findall(r"-?\d+\.\d+", c)]

    assert [c[:2] for c in sketch] == [c[:2] for c in alone]
    for mine, theirs in zip(sketch, alone):
        assert len(numbers(mine)) == len(numbers(theirs)) > 0
        assert max(abs(a - b) for a, b in zip(numbers(mine), numbers(theirs))) <= 0.011, (mine, theirs)
    doc = (ROOT / "docs" / "validation.md").read_text()
    missing = [row for row in rows if row not in doc]
    assert not missing, f"docs/validation.md's factored Table V differs from the committed run's: {missing}"


def test_validation_md_quotes_the_committed_projection_noise_table():
    """docs/validation.md's projection-noise rows (adam and cosine: each projector at seeds 0 and 1, exact, and adam
    with larger k) are
    the committed validation.json files' numbers: seed 0 from docs/results/embedded_factored, the others from
    docs/results/embedded_projection_noise."""
    results = ROOT / "docs" / "results"
    runs = {
        "sketch, seed 0": (results / "embedded_factored" / "validation.json", "sketch"),
        "sketch, seed 1": (results / "embedded_projection_noise" / "sketch_seed1.json", None),
        "sketch, k = 131,072": (results / "embedded_projection_noise" / "sketch_k131072.json", None),
        "sketch, k = 262,144": (results / "embedded_projection_noise" / "sketch_k262144.json", None),
        "factored, seed 0": (results / "embedded_factored" / "validation.json", "factored"),
        "factored, seed 1": (results / "embedded_projection_noise" / "factored_seed1.json", None),
        "exact (k = P)": (results / "embedded_projection_noise" / "exact.json", None),
    }
    doc = (ROOT / "docs" / "validation.md").read_text()
    for kernel in ("adam", "cosine"):
        for label, (path, projector) in runs.items():
            result = json.loads(path.read_text())["rows"]
            rows = {(r["method"], r["epoch"]): r for r in result if r.get("projector") == projector}
            if (kernel, 0) not in rows:  # (the larger k were run for adam only)
                continue
            cells = []
            for measure in ("pt_mrr", "ft_mrr", "lds"):
                values = [rows[kernel, epoch][measure] for epoch in range(6)]
                cells.append(", ".join(f"{v:.3f}" for v in values) + f" ({sum(values) / 6:.3f})")
            t = rows[f"{kernel} TracIn-CP", "all"]
            tracin = f"{t['lds']:.3f} [{t['lds_low']:.3f}, {t['lds_high']:.3f}]"
            row = f"| {kernel} | {label} | " + " | ".join(cells) + f" | {tracin} |"
            assert row in doc, f"docs/validation.md lacks or differs from: {row}"


def test_lds_enabled_takes_auto_true_or_false_only():
    """Any other value (a misspelt `fals`, `no`) was read as true and started the retrains."""
    from lark.errors import ConfigError
    from lark.validation.load import lds_enabled

    world, jsonl = compose(SMALL), compose(["data=jsonl"])
    for flag, cfg, want in (("auto", world, True), ("auto", jsonl, False), (True, jsonl, True), (False, world, False)):
        assert lds_enabled(OmegaConf.create({"lds": {"enabled": flag}}), cfg) is want
    for flag in ("fals", "no", 1):
        with pytest.raises(ConfigError, match=r"lds\.enabled must be auto, true or false"):
            lds_enabled(OmegaConf.create({"lds": {"enabled": flag}}), world)


def test_a_corrupted_score_cache_is_recomputed_not_used(tmp_path):
    """validate.py reused a cached score matrix without its checksum: one flipped byte went into Table V."""
    from lark.kernel.stores import atomic_save
    from lark.validation.scores import read_cached

    path = tmp_path / "scores.safetensors"
    atomic_save({"train": torch.ones(2, 4)}, path, {"key": "k1"})
    assert torch.equal(read_cached(path, "k1")["train"], torch.ones(2, 4))
    assert read_cached(path, "another key") is None
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a byte of the tensor
    path.write_bytes(data)
    logs = []
    assert read_cached(path, "k1", logs.append) is None
    assert len(logs) == 1 and "scores.safetensors: checksum mismatch" in logs[0] and logs[0].endswith("recomputed")


@pytest.mark.slow
def test_cached_scores_are_not_reused_for_other_token_ids(run_dir, validated, monkeypatch):
    """The score cache's key held the examples' text but not their token ids: scores cached under an earlier
    tokenisation (an earlier cut of long prompts) were reused for today's. (Last in this file: it rewrites the
    cosine cache.)"""
    from lark.validation import scores
    from lark.validation.table5 import validate_run

    _, _, vcfg = validated
    only_cosine = OmegaConf.merge(vcfg, {"kernels": ["cosine"]})
    again = []
    validate_run(run_dir, only_cosine, log=again.append)
    assert any("cosine/epoch_001/scores.safetensors: cached" in m for m in again)
    real = scores.encode

    def earlier(*args, **kwargs):  # another tokenisation of the same examples: the first token cut
        return {k: v[1:] for k, v in real(*args, **kwargs).items()}

    monkeypatch.setattr(scores, "encode", earlier)
    retokenised = []
    validate_run(run_dir, only_cosine, log=retokenised.append)
    assert not any("scores.safetensors: cached" in m for m in retokenised), retokenised
