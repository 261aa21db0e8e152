"""lark.validation.lds and lark.validation.recall on cases whose answers are known exactly."""

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch

from lark.validation import lds
from lark.validation import recall as R


def linear_world(n_train=24, n_queries=6, dim=5, seed=0):
    """A linear model theta . x with a linear loss -y * theta . x, 'trained' on a subset S by one gradient step of
    the summed loss from theta0: the trained model's query losses are EXACTLY additive over S, and the true
    influence of d on q is lr * <grad L_q, grad L_d> (a step on d lowers q's loss by that much)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train, dim, generator=g, dtype=torch.float64)
    y = torch.randn(n_train, generator=g, dtype=torch.float64)
    xq = torch.randn(n_queries, dim, generator=g, dtype=torch.float64)
    yq = torch.randn(n_queries, generator=g, dtype=torch.float64)
    theta0, lr = torch.randn(dim, generator=g, dtype=torch.float64), 0.1

    def grads(xs, ys):
        theta = theta0.clone().requires_grad_(True)
        return torch.stack([torch.autograd.grad(-(yi * (xi @ theta)), theta)[0] for xi, yi in zip(xs, ys)])

    def retrain(member):
        theta = theta0.clone().requires_grad_(True)
        loss = -(y[member] * (x[member] @ theta)).sum()
        step = torch.autograd.grad(loss, theta)[0]
        with torch.no_grad():
            return -(yq * (xq @ (theta0 - lr * step)))  # each query's loss after training on the subset

    return grads(xq, yq), grads(x, y), lr, retrain


def test_lds_recovers_the_exact_influences_of_a_linear_model():
    gq, gd, lr, retrain = linear_world()
    ids = [f"d{i}" for i in range(len(gd))]
    subsets = [lds.subset(ids, 0.5, seed) for seed in range(16)]
    membership = lds.masks(subsets, ids)
    losses = torch.stack([retrain(m.bool()) for m in membership])  # [M, Q] measured by "retraining"
    true = lr * gq @ gd.T  # [Q, N]
    exact = lds.lds(true, membership, losses)
    assert exact["lds"] == pytest.approx(1.0, abs=1e-12) and exact["n_queries"] == 6
    assert exact["low"] == pytest.approx(1.0) and exact["high"] == pytest.approx(1.0)
    assert lds.lds(-true, membership, losses)["lds"] == pytest.approx(-1.0, abs=1e-12)  # the sign matters
    noise_scores = torch.randn(true.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = lds.lds(noise_scores, membership, losses)
    members = [[ids.index(d) for d in s] for s in subsets]
    assert (noise["lds"], noise["n_queries"]) == pytest.approx(direct_lds(noise_scores.tolist(), members, losses.T))
    assert abs(noise["lds"]) < 0.35 and noise["low"] <= noise["lds"] <= noise["high"]
    cosine_scores = R_unit(gq) @ R_unit(gd).T  # right direction, wrong magnitudes
    cosine = lds.lds(cosine_scores, membership, losses)
    assert (cosine["lds"], cosine["n_queries"]) == pytest.approx(direct_lds(cosine_scores.tolist(), members, losses.T))
    assert noise["lds"] < cosine["lds"] < 1.0


def ranks(values):
    """1-based ranks, tied values sharing their mean rank (a direct definition, not lark's)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs, ys):
    """Pearson correlation of the ranks; None when either side is constant."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(sxx * syy)


def direct_lds(scores, members, losses):
    """(LDS, queries kept) in plain Python: per query q (scores [Q][N], losses [Q][M]), Spearman over the subsets
    m of sum_{d in members[m]} score(q, d) with -loss(q, m); a constant query is left out."""
    per_query = [
        spearman([sum(row[d] for d in m) for m in members], [-float(x) for x in loss])
        for row, loss in zip(scores, losses)
    ]
    kept = [v for v in per_query if v is not None]
    return sum(kept) / len(kept), len(kept)


def R_unit(v):
    return v / v.norm(dim=1, keepdim=True)


def test_subsets_are_seeded_and_sized_and_a_constant_query_is_left_out():
    ids = [f"d{i}" for i in range(10)]
    assert lds.subset(ids, 0.5, 3) == lds.subset(ids, 0.5, 3) != lds.subset(ids, 0.5, 4)
    assert len(lds.subset(ids, 0.5, 0)) == 5 and lds.subset(ids, 0.5, 0) == sorted(lds.subset(ids, 0.5, 0))
    with pytest.raises(ValueError, match="fraction"):
        lds.subset(ids, 0, 0)
    membership = lds.masks([["d0", "d1"], ["d1", "d2"], ["d0", "d2"]], ["d0", "d1", "d2"])
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    losses = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
    result = lds.lds(scores, membership, losses)
    # query 0: predictions 3, 5, 4 vs -loss -3, -1, -2: identical order -> 1; query 1: constant -> left out
    assert result["lds"] == pytest.approx(1.0) and result["n_constant"] == 1 and result["per_query"][1] is None
    with pytest.raises(KeyError, match="no score"):
        lds.masks([["d9"]], ["d0"])


def test_spearman_ranks_ties_by_their_mean_rank():
    assert lds.rank(torch.tensor([[3.0], [1.0], [3.0], [2.0]])).squeeze(1).tolist() == [3.5, 1.0, 3.5, 2.0]
    a = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 2.0], [4.0, 5.0]])
    b = torch.tensor([[10.0, 4.0], [20.0, 3.0], [30.0, 2.0], [40.0, 1.0]])
    rho = lds.spearman(a, b)
    assert rho[0] == pytest.approx(1.0)
    # column 1: ranks (1, 2.5, 2.5, 4) vs (4, 3, 2, 1): Pearson of the ranks
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([4.0, 3, 2, 1])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert rho[1].item() == pytest.approx(((ra * rb).sum() / (ra.norm() * rb.norm())).item())


def test_retrieval_metrics_on_a_hand_made_ranking():
    # query 0 ranks d2, d0, d3, d1, d4; relevant {d0, d4} at ranks 2 and 5
    # query 1 ranks d1, d0, d2, d3, d4 (ties keep column order); relevant {d1} at rank 1
    # query 2 has no relevant document: left out
    scores = torch.tensor([[0.8, 0.2, 0.9, 0.5, 0.1], [0.5, 0.7, 0.5, 0.5, 0.5], [1.0, 0, 0, 0, 0]])
    relevant = R.columns(["d0", "d1", "d2", "d3", "d4"], [["d0", "d4"], ["d1"], []])
    assert relevant == [[0, 4], [1], []]
    assert R.recall_at(scores, relevant, 1).tolist()[:2] == [0.0, 1.0]
    assert R.recall_at(scores, relevant, 2).tolist()[:2] == [0.5, 1.0]
    assert R.recall_at(scores, relevant, 5).tolist()[:2] == [1.0, 1.0]
    assert R.reciprocal_rank(scores, relevant).tolist()[:2] == [0.5, 1.0]
    assert R.precision_at(scores, relevant).tolist()[:2] == [0.5, 1.0]  # n = |relevant|
    assert R.average_precision(scores, relevant)[0].item() == pytest.approx((1 / 2 + 2 / 5) / 2)
    assert math.isnan(R.recall_at(scores, relevant, 1)[2].item())
    assert R.mean(R.reciprocal_rank(scores, relevant)) == (0.75, 2)
    with pytest.raises(KeyError, match="not among the candidates"):
        R.columns(["d0"], [["d7"]])


def test_non_finite_score_rows_are_left_out_of_table_v():
    """An example whose loss or gradient was not finite has a NaN row. A NaN query ranked documents in column order
    (a perfect recall when its relevant document came first) and got a made-up LDS; a NaN document made every subset
    holding it NaN, and the LDS of every query a rank of NaNs."""
    scores = torch.tensor([[0.1, 0.9, 0.5], [float("nan")] * 3, [0.9, float("nan"), 0.2]])
    relevant = [[0], [0], [1]]  # query 2's relevant document has no gradient: ranked last
    assert R.reciprocal_rank(scores, relevant).tolist()[0] == 1 / 3
    assert math.isnan(R.reciprocal_rank(scores, relevant)[1].item())  # was 1.0
    assert R.reciprocal_rank(scores, relevant)[2].item() == 1 / 3
    g = torch.Generator().manual_seed(0)
    ids = [f"d{i}" for i in range(20)]
    membership = lds.masks([lds.subset(ids, 0.5, m) for m in range(16)], ids)
    clean = torch.randn(3, 20, generator=g)
    losses = -(membership @ clean.double().T) + 0.1 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    reference = lds.lds(clean, membership, losses)
    nan_query = clean.clone()
    nan_query[1] = float("nan")
    result = lds.lds(nan_query, membership, losses)
    assert result["per_query"][1] is None and result["n_nonfinite"] == 1 and result["n_queries"] == 2
    assert result["per_query"][0] == pytest.approx(reference["per_query"][0])
    narrow = lds.lds(clean, membership, losses, level=0.5)  # validate's lds.level (the 95% was fixed)
    assert reference["low"] <= narrow["low"] <= narrow["high"] <= reference["high"]
    assert narrow["high"] - narrow["low"] < reference["high"] - reference["low"]
    alone = lds.lds(torch.full((1, 20), float("nan")), membership, losses[:, :1])  # every row NaN
    assert (alone["n_nonfinite"], alone["n_constant"], alone["n_queries"]) == (1, 0, 0)
    nan_doc, zero_doc = clean.clone(), clean.clone()
    nan_doc[:, 7], zero_doc[:, 7] = float("nan"), 0.0
    result = lds.lds(nan_doc, membership, losses)
    assert result["n_nonfinite"] == 0 and result["n_queries"] == 3
    assert result["per_query"] == lds.lds(zero_doc, membership, losses)["per_query"]


# ------------------------------------------------------------------------------------------ kills during retrains
def test_a_stale_batch_is_found_by_its_token_and_stopped(tmp_path):
    """batch.launch marks the whole process tree (a grandchild too) with its token; stop_stale kills exactly
    those processes and forgets the batch, and a missing or unreadable state is no batch."""
    from lark.validation import batch

    sleep = "import time; time.sleep(60)"
    child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    proc = batch.launch([sys.executable, "-c", child], tmp_path)
    token = json.loads((tmp_path / batch.STATE).read_text())["token"]
    deadline = time.monotonic() + 20
    while len(batch.members(token)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(batch.members(token)) == 2 and proc.pid in batch.members(token)
    messages = []
    marked = sorted(batch.members(token))
    assert sorted(batch.stop_stale(tmp_path, messages.append)) == marked
    proc.wait(timeout=10)
    assert batch.members(token) == [] and not (tmp_path / batch.STATE).exists()
    assert "stopping 2 retrain processes" in messages[0]
    assert batch.stop_stale(tmp_path) == []
    (tmp_path / batch.STATE).write_text("{not json")
    assert batch.stop_stale(tmp_path) == []


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 1-epoch embedded run (no analysis) to validate."""
    from conftest import SMALL, compose
    from omegaconf import OmegaConf, open_dict

    from lark.experiment import train

    out = tmp_path_factory.mktemp("lds_run") / "run"
    cfg = compose(SMALL + ["logger=none", "analysis.enabled=false", "trainer.max_epochs=1"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg)
    return out


VALIDATE = ["kernels=[cosine]", "lds.n_subsets=3", "lds.n_boot=100", "lds.poll_s=0.1"]


def validate(run_dir, kill_after=None):
    """python validate.py on run_dir; kill_after=n: SIGKILL validate.py alone (as `kill -9 <pid>` does: its
    retrain processes live on) once n subsets have their query_losses.json. Returns (stdout+stderr, returncode)."""
    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "validate.py"), f"run_dir={run_dir}", *VALIDATE]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        deadline = time.monotonic() + 300
        while len(list(run_dir.glob("validation/lds/*/subset_*/query_losses.json"))) < kill_after:
            assert proc.poll() is None and time.monotonic() < deadline, "validate.py ended before the kill"
            time.sleep(0.05)
        proc.kill()
    return proc.communicate()[0], proc.wait()


def results(run_dir):
    """validation.json's rows without their timings (the only thing that may differ between two validations)."""
    rows = json.loads((run_dir / "validation" / "validation.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_validate_killed_during_its_retrains_keeps_the_finished_ones_and_ends_as_an_uninterrupted_run(
    small_run, tmp_path
):
    from lark.validation import batch

    reference = tmp_path / "reference"
    shutil.copytree(small_run, reference)
    log, code = validate(reference)
    assert code == 0, log
    out, code = validate(small_run, kill_after=1)
    assert code == -9
    done = {
        p.parent.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in small_run.glob("validation/lds/*/subset_*/query_losses.json")
    }
    assert done and len(done) < 3
    log, code = validate(small_run)  # the same command again
    assert code == 0, log
    base = next(small_run.glob("validation/lds/*"))
    for name, (data, stamp) in done.items():  # never retrained nor re-measured
        assert (base / name / "query_losses.json").read_bytes() == data
        assert (base / name / "query_losses.json").stat().st_mtime_ns == stamp
    retrained = [line for line in log.splitlines() if "mini-LDS: retraining" in line]
    assert not retrained or int(retrained[0].split("retraining ")[1].split(" of")[0]) <= 3 - len(done)
    assert results(small_run) == results(reference)  # Table V: every LDS (and every other value) equal
    for name in ("subset_0", "subset_1", "subset_2"):
        ref = next(reference.glob(f"validation/lds/*/{name}/query_losses.json"))
        assert (base / name / "query_losses.json").read_bytes() == ref.read_bytes()
    assert not (base / batch.STATE).exists()


def test_resumable_retrains_keep_their_resume_state_and_resume():
    """lds.resumable: the retrains run with resume=true and Lightning's resume checkpoint (a killed one continues
    from its last epoch); by default they have neither, and a killed one starts again."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"launcher": "joblib", "n_jobs": 2, "extra_overrides": [], "resumable": False})
    plain = lds.retrain_command("/c", "/s", 0.5, [0, 1], cfg)
    assert "resume=false" in plain and "trainer.enable_checkpointing=false" in plain
    assert "resume=true" not in plain and "++data.train_subset.seed=0,1" in plain
    cfg.resumable = True
    resumable = lds.retrain_command("/c", "/s", 0.5, [0, 1], cfg)
    assert "resume=true" in resumable and "trainer.enable_checkpointing=true" in resumable
    assert "resume=false" not in resumable and "trainer.enable_checkpointing=false" not in resumable


def test_the_retrains_key_follows_the_overrides_that_change_a_retrain():
    """lds.extra_overrides that change training (optimizer.lr=...) give other retrains; Hydra's own (a launcher's
    partition) and none at all keep the key, so finished retrains are reused only when they are the same recipe."""
    from conftest import compose

    from lark.validation.lds import recipe_key

    cfg = compose()
    plain = recipe_key(cfg, 0.5)
    assert recipe_key(cfg, 0.5, []) == plain == recipe_key(cfg, 0.5, ["hydra.launcher.partition=gpu"])
    assert recipe_key(cfg, 0.5, ["optimizer.lr=0.05"]) != plain != recipe_key(cfg, 0.4)


def test_the_retrains_start_from_the_runs_own_base_model(tmp_path):
    """The retrains load the run's checkpoints/epoch_000 (the embedded model's pretraining cache is keyed by config
    and corpus, and another thread count pretrains other weights under the same key), and those weights are in the
    retrains' key; a run without a checksummed epoch_000 keeps its config and key."""
    from conftest import compose

    from lark.validation.lds import own_base, recipe_key

    cfg = compose()
    assert own_base(tmp_path, cfg) == (cfg, None)
    folder = tmp_path / "checkpoints" / "epoch_000"
    folder.mkdir(parents=True)
    (folder / "checksums.json").write_text(json.dumps({"model.safetensors": "ab12"}))
    retrain, weights = own_base(tmp_path, cfg)
    assert retrain.model.load._target_ == "lark.models.hub_model" and retrain.model.hub_id == str(folder.resolve())
    assert cfg.model.load._target_ == "lark.pretrain.tiny_model"  # the run's own config untouched
    assert recipe_key(cfg, 0.5, (), weights) != recipe_key(cfg, 0.5) != recipe_key(cfg, 0.5, (), {"x": "cd34"})
