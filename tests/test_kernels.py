"""lark.kernel.kernels and lark.tracin: the math of every kernel on cases small enough to check by hand or exactly."""

import json

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from lark.errors import ConfigError
from lark.kernel.factory import make_kernel, make_projector, upgrade
from lark.kernel.kernels import Adam, whiten
from lark.kernel.normalizers import PerTensor
from lark.kernel.optimizer import AdamScale, Moments, estimate_moments, optimizer_moments
from lark.kernel.stores import save_store
from lark.tracin import write_tracin_cp

KERNELS = ROOT / "conf" / "attribution" / "kernel"
PROJECTORS = ROOT / "conf" / "attribution" / "projector"


def attribution(projector, kernel, **kernel_over):
    return OmegaConf.create(
        {
            "projector": OmegaConf.load(PROJECTORS / f"{projector}.yaml"),
            "kernel": OmegaConf.merge(OmegaConf.load(KERNELS / f"{kernel}.yaml"), kernel_over),
        }
    )


class TwoParameters(torch.nn.Module):
    """loss = 0.5 (a x + b - y)^2 with x = the mean input id, y = the mean label: d/da = r x, d/db = r."""

    def __init__(self, a=0.5, b=-1.0):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor([a])), torch.nn.Parameter(torch.tensor([b]))

    def forward(self, input_ids, attention_mask=None, labels=None):
        r = self.a * input_ids.float().mean() + self.b - labels.float().mean()
        return type("Out", (), {"loss": 0.5 * (r**2).sum()})()


BATCH = {
    "input_ids": torch.tensor([[2, 2]]),
    "attention_mask": torch.tensor([[1, 1]]),
    "labels": torch.tensor([[1, 1]]),
}


def test_adam_kernel_divides_each_coordinate_by_sqrt_v_plus_eps_by_hand():
    # r = 0.5 * 2 - 1 - 1 = -1: gradient (r x, r) = (-2, -1); sqrt(v) = (2, 0.5)
    model = TwoParameters()
    moments = Moments({"a": {"v": torch.tensor([4.0])}, "b": {"v": torch.tensor([0.25])}}, "optimizer")
    exact = make_projector(attribution("exact", "adam", eps=0.0), model, moments=moments)
    assert exact.project_batch(model, BATCH)[0].tolist() == [-1.0, -2.0]
    with_eps = make_projector(attribution("exact", "adam", eps=0.5), model, moments=moments)
    torch.testing.assert_close(with_eps.project_batch(model, BATCH)[0], torch.tensor([-2 / 2.5, -1 / 1.0]))
    plain = make_projector(attribution("exact", "cosine"), model)
    assert plain.project_batch(model, BATCH)[0].tolist() == [-2.0, -1.0]
    assert exact.spec()["precondition"]["source"] == "optimizer" and "precondition" not in plain.spec()


def test_optimizer_moments_are_adamw_bias_corrected_second_moments():
    """After one AdamW step on gradient g, exp_avg_sq = (1 - beta2) g^2 and v_hat = g^2; after two, by hand."""
    model = TwoParameters()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    grads = []
    for _ in range(2):
        opt.zero_grad()
        model(**BATCH).loss.backward()
        grads.append(torch.cat([model.a.grad, model.b.grad]).clone())
        opt.step()
    g1, g2 = grads
    want = (0.99 * 0.01 * g1**2 + 0.01 * g2**2) / (1 - 0.99**2)
    got = optimizer_moments(opt, model).tensors
    torch.testing.assert_close(torch.cat([got["a"]["v"], got["b"]["v"]]), want)
    assert optimizer_moments(torch.optim.SGD(model.parameters(), lr=0.1), model) is None  # no second moments


def test_epoch_zero_estimate_is_the_mean_squared_batch_gradient_clipped_like_training():
    model = TwoParameters()
    b2 = {k: v.clone() for k, v in BATCH.items()}
    b2["labels"] = torch.tensor([[3, 3]])  # r = -3: gradient (-6, -3)
    est = estimate_moments(model, [BATCH, b2]).tensors
    torch.testing.assert_close(torch.cat([est["a"]["v"], est["b"]["v"]]), torch.tensor([(4 + 36) / 2, (1 + 9) / 2]))
    clipped = estimate_moments(model, [b2], clip=1.0).tensors  # |(-6, -3)| = sqrt(45) -> unit norm
    torch.testing.assert_close(
        torch.cat([clipped["a"]["v"], clipped["b"]["v"]]), torch.tensor([36 / 45, 9 / 45]), rtol=1e-5, atol=1e-6
    )
    assert model.a.grad is None and model.a.item() == 0.5  # no step, no gradient left behind


class Matrix(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))


def test_factored_moments_equal_the_full_division_when_v_has_rank_one():
    """v = u w^T: row means r = u mean(w), column means c = w mean(u), and r c^T / mean(r) = v exactly."""
    u, w = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 0.5, 1.0, 9.0])
    v = torch.outer(u, w)
    m = v.reshape(3, -1)
    factored = AdamScale(Moments({"w": {"row": m.mean(1), "col": m.mean(0)}}, "optimizer"), 0.0, Matrix())
    full = AdamScale(Moments({"w": {"v": v}}, "optimizer"), 0.0, Matrix())
    torch.testing.assert_close(factored.scale("w", (3, 4), "cpu"), 1 / v.sqrt())
    torch.testing.assert_close(full.scale("w", (3, 4), "cpu"), 1 / v.sqrt())
    assert factored.spec()["form"] == "factored" and full.spec()["form"] == "full"
    with pytest.raises(ValueError, match=r"no entry for \['w'\]"):
        AdamScale(Moments({"x": {"v": v}}, "optimizer"), 0.0, Matrix())


def test_the_full_moments_are_never_replaced_by_saved_factored_ones(tmp_path):
    """attribution.kernel.factored=false on a run that saved factored moments: an error naming the file and the
    key, not the rank-one approximation under the reference's name."""
    m = torch.rand(3, 4) + 0.1
    Moments({"w": {"row": m.mean(1), "col": m.mean(0)}}, "optimizer").save(tmp_path / "adam_moments.safetensors")
    saved = Moments.load(tmp_path / "adam_moments.safetensors")
    assert AdamScale(saved, 0.0, Matrix()).spec()["form"] == "factored"
    with pytest.raises(ValueError, match=r"factored=false needs the full v_hat.*adam_moments\.safetensors"):
        Adam(factored=False).preconditioner(saved, Matrix())


def test_adam_kernel_refuses_without_moments():
    with pytest.raises(ValueError, match=r"attribution\.kernel=adam needs the run's AdamW second moments"):
        make_projector(attribution("exact", "adam"), TwoParameters())


def test_trackstar_down_weights_the_direction_every_query_shares_by_hand():
    """Queries all along e1, mix = 1: R = e1 e1^T (eigenvalue 1), delta = damping * 1 = 1; (R + I)^-1/2 scales e1
    by 1/sqrt(2) relative to e2, so (e1 + e2)/sqrt(2) becomes (1/sqrt(2), 1)/sqrt(1.5)."""
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = whiten({"q": torch.cat([e1, e1]), "d": (e1 + e2) / 2**0.5}, "q", mix=1.0, damping=1.0)
    torch.testing.assert_close(out["d"][0], torch.tensor([0.5**0.5, 1.0]) / 1.5**0.5)
    torch.testing.assert_close(out["q"], torch.cat([e1, e1]))  # unit rows


@pytest.mark.parametrize("k", [5, 12])  # 8 finite rows: R's eigenpairs from A^T A (k = 5) or the Gram matrix (12)
def test_trackstar_whitening_equals_the_explicit_k_by_k_inverse_square_root(k):
    gen = torch.Generator().manual_seed(3)
    q, d1, d2 = (torch.randn(n, k, generator=gen) for n in (3, 2, 4))
    q[1] = float("nan")  # non-finite rows stay out of R
    mix, damping = 0.7, 0.3
    out = whiten({"q": q, "d1": d1, "d2": d2}, "q", mix, damping)
    qf, t = q[[0, 2]].double(), torch.cat([d1, d2]).double()
    r = mix * qf.T @ qf / 2 + (1 - mix) * t.T @ t / 6
    s, v = torch.linalg.eigh(r)
    delta = damping * s[s > 1e-10 * s.max()].mean()
    inv_sqrt = v @ torch.diag((s + delta).rsqrt()) @ v.T
    for name, x in {"q": q[[0, 2]], "d1": d1, "d2": d2}.items():
        y = x.double() @ inv_sqrt
        want = (y / y.norm(dim=1, keepdim=True)).float()
        got = out[name][[0, 2]] if name == "q" else out[name]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isnan(out["q"][1]).all()


def test_kernel_options_are_checked_naming_the_key():
    for kernel, over, key in [
        ("trackstar", {"mix": 1.5}, "mix"),
        ("trackstar", {"damping": 0}, "damping"),
        ("adam", {"eps": -1}, "eps"),
    ]:
        with pytest.raises(ValueError, match=rf"attribution\.kernel\.{key}"):
            make_kernel(attribution("sketch", kernel, **over))


def test_kernels_say_what_they_need_in_class_attributes():
    """What the run asks of a kernel is a class attribute, never its name: the normaliser it hands the projector,
    whether it needs the AdamW moments, whether it whitens (store_dtype=bit is refused then), whether it also
    scores the whole run."""
    flags = {}
    for path in sorted(KERNELS.glob("*.yaml")):
        k = make_kernel(attribution("sketch", path.stem))
        flags[path.stem] = (k.normalizer.name, k.uses_optimizer, k.whitens, k.run_level)
    assert flags == {
        "adam": ("none", True, False, False),
        "cosine": ("none", False, False, False),
        "rapidin": ("per_tensor", False, False, False),
        "tracin_cp": ("none", False, False, True),
        "trackstar": ("none", True, True, False),
    }
    adam = make_kernel(attribution("sketch", "adam", normalize="per_tensor"))
    assert isinstance(adam.normalizer, PerTensor) and adam.spec()["normalize"] == "per_tensor"
    with pytest.raises(ConfigError, match=r"attribution\.kernel\.normalize: unknown 'l2' \(none or per_tensor\)"):
        Adam(normalize="l2")
    projector = make_projector(attribution("exact", "rapidin"), TwoParameters())
    assert projector.normalizer is make_kernel(attribution("exact", "rapidin")).normalizer  # the kernel's own


def test_legacy_configs_map_to_the_targets_they_meant():
    old = OmegaConf.create(
        {
            "projector": {
                "kind": "rapidin",
                "k": 64,
                "seed": 3,
                "normalize": "per_tensor",
                "method": "auto",
                "plan_tokens": 128,
                "max_dense_elements": 10,
            }
        }
    )
    new = upgrade(old)
    assert OmegaConf.to_container(new.projector) == {
        "_target_": "lark.kernel.projectors.CountSketch.of_model",
        "_partial_": True,
        "k": 64,
        "seed": 3,
    }
    assert new.kernel._target_ == "lark.kernel.kernels.RapidIn"
    sketch = upgrade(
        OmegaConf.create(
            {
                "projector": {
                    "kind": "sketch",
                    "k": 8,
                    "seed": 0,
                    "normalize": "none",
                    "method": "auto",
                    "plan_tokens": 64,
                }
            }
        )
    )
    assert sketch.projector._target_ == "lark.kernel.sketch.HookSketch" and sketch.projector.plan_tokens == 64
    assert sketch.kernel._target_ == "lark.kernel.kernels.Cosine"
    assert upgrade(new) is new  # today's form: unchanged


# ---------------------------------------------------------------------------------------------- TracIn-CP
def test_tracin_cp_is_the_lr_weighted_sum_of_inner_products_by_hand(tmp_path):
    """Epoch 1 (lr 0.1): q = (3, 4), d = (1, 0) -> <q, d> = 3; epoch 2 (lr 0.01): q = (0, 2), d = (0, 3) -> 6;
    epoch 0 has no lr and takes no part: TracIn-CP = 0.1 * 3 + 0.01 * 6 = 0.36. The other document: -0.4 + 0."""
    meta = {"projector": {"kind": "exact", "kernel": {"name": "tracin_cp"}}, "checkpoint": "c", "format": "f"}
    vectors = {
        0: ([[9.0, 9.0]], [[9.0, 9.0], [1.0, 1.0]]),
        1: ([[3.0, 4.0]], [[1.0, 0.0], [0.0, -1.0]]),
        2: ([[0.0, 2.0]], [[0.0, 3.0], [1.0, 0.0]]),
    }
    for epoch, (q, d) in vectors.items():
        folder = tmp_path / "attribution" / f"epoch_{epoch:03d}"
        save_store(folder / "stores" / "test_queries.safetensors", torch.tensor(q), ["q1"], meta, "float16")
        for name in ("ft", "pt"):
            save_store(folder / "stores" / f"{name}.safetensors", torch.tensor(d), ["d1", "d2"], meta, "float16")
        (folder / "metrics.json").write_text(json.dumps({"epoch": epoch, "lr": [None, 0.1, None][epoch]}))
    # epoch 2's lr as training recorded it beside the checkpoint (read as attribute.py and validate.py read it)
    (tmp_path / "checkpoints" / "epoch_002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "epoch_002" / "lark_epoch.json").write_text(json.dumps({"lr": 0.01}))
    cfg = OmegaConf.create(
        {
            "source": {"sources": {"ft": {}, "pt": {}}, "ft_source": "ft", "pt_source": "pt", "format_pairs": {}},
            "attribution": {"store_dtype": "float16", "top_k": 2, "save_scores": True},
        }
    )
    metrics = write_tracin_cp(tmp_path, cfg, log=lambda m: None)
    assert metrics["epochs"] == [1, 2] and metrics["lr"] == [0.1, 0.01]
    out = tmp_path / "attribution" / "tracin_cp"
    from safetensors import safe_open

    scores = safe_open(str(out / "scores" / "ft.safetensors"), "pt").get_tensor("scores")
    torch.testing.assert_close(scores, torch.tensor([[0.36, -0.4]]), rtol=2e-3, atol=2e-3)
    assert metrics["sources"]["ft"]["mean_max"] == pytest.approx(0.36, abs=2e-3)
    assert (out / "top_influences.csv").read_text().splitlines()[1].startswith("q1,ft,1,d1,0.36")
    assert json.loads((out / "metrics.json").read_text())["kernel"] == "tracin_cp"


def test_tracin_cp_sums_only_the_tracin_cp_kernels_stores_in_their_own_tier(tmp_path):
    """An epoch re-attributed with another kernel (RapidIn's normalised vectors, here in the bit tier) is left out of
    the sum and named in the log, never added in; the tier is the stores' own, whatever attribution.store_dtype
    says; the blockwise top-k equals the whole matrix's."""
    torch.manual_seed(0)
    q, d = torch.randn(3, 16), torch.randn(50, 16)
    for epoch, kernel, tier in ((1, "rapidin", "bit"), (2, "tracin_cp", "int8"), (3, "tracin_cp", "int8")):
        meta = {"projector": {"kind": "sketch", "kernel": {"name": kernel}}, "checkpoint": f"c{epoch}"}
        folder = tmp_path / "attribution" / f"epoch_{epoch:03d}"
        save_store(folder / "stores" / "test_queries.safetensors", q * epoch, ["a", "b", "c"], meta, tier)
        for name in ("ft", "pt"):
            save_store(folder / "stores" / f"{name}.safetensors", d, [f"d{i}" for i in range(50)], meta, tier)
        (folder / "metrics.json").write_text(json.dumps({"epoch": epoch, "lr": 0.1 * epoch}))
    cfg = OmegaConf.create(
        {
            "source": {"sources": {"ft": {}, "pt": {}}, "ft_source": "ft", "pt_source": "pt", "format_pairs": {}},
            "attribution": {"store_dtype": "float16", "top_k": 50, "save_scores": True},
        }
    )
    logs = []
    metrics = write_tracin_cp(tmp_path, cfg, log=logs.append)
    assert metrics["epochs"] == [2, 3] and any("epochs [1] left out" in m and "rapidin" in m for m in logs)
    import shlex

    from conftest import compose

    told = next(m for m in logs if "left out" in m).split("to include them: ")[1]  # a command Hydra takes as given
    script, run_dir, *overrides = shlex.split(told)
    assert script == "attribute.py" and run_dir == "run_dir=<run>"
    attribute_cfg = compose(["run_dir=x", *overrides], config_name="attribute")
    assert attribute_cfg.attribution.checkpoints == [1]
    assert attribute_cfg.attribution.kernel._target_ == "lark.kernel.kernels.TracInCP"
    from safetensors import safe_open

    from lark.tracin import tracin_top

    scores = safe_open(str(tmp_path / "attribution/tracin_cp/scores/ft.safetensors"), "pt").get_tensor("scores")
    dot = q @ d.T  # int8 decoding of unit vectors: the sum 0.2 * 2 <q, d> + 0.3 * 3 <q, d>
    torch.testing.assert_close(scores, 1.3 * dot, rtol=0.03, atol=0.03 * dot.abs().max().item())
    rows = (tmp_path / "attribution/tracin_cp/top_influences.csv").read_text().splitlines()[1:]
    assert [r.split(",")[3] for r in rows[:50]] == [f"d{i}" for i in scores[0].argsort(descending=True).tolist()]
    parts = [(0.2, (q * 2, torch.full((3,), 1.0)), (d, torch.ones(50)))]
    whole, small = tracin_top(parts, "float16", 7, block=4096), tracin_top(parts, "float16", 7, block=3)
    assert torch.equal(whole[1], small[1])  # (values: equal up to the BLAS's summation order per block shape)
    torch.testing.assert_close(whole[0], small[0])


# ------------------------------------------------------------------------------ end to end through train.py
@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """`python train.py attribution/kernel=<adam|trackstar|tracin_cp>` on the small embedded run, one epoch."""
    import subprocess
    import sys

    from conftest import SMALL

    root = tmp_path_factory.mktemp("kernels")
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1", "logger=none"]
    runs = {}
    for kernel, extra in (
        ("adam", []),
        ("trackstar", ["attribution.checkpoints=[1]"]),
        ("tracin_cp", ["attribution.checkpoints=[1]"]),
    ):  # TracIn-CP leaves epoch 0 out
        runs[kernel] = root / kernel
        out = subprocess.run(
            [
                sys.executable,
                "train.py",
                *overrides,
                *extra,
                f"attribution/kernel={kernel}",
                f"hydra.run.dir={runs[kernel]}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    return runs


def header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


def saved_scores(folder, source):
    """The [queries, documents] score matrix a run saved for one source (attribution.save_scores)."""
    from safetensors import safe_open

    with safe_open(str(folder / "scores" / f"{source}.safetensors"), "pt") as f:
        return f.get_tensor("scores").double()


def mean_max(scores):
    """The paper's MeanMax recomputed from a full score matrix: each query's best document, averaged over the
    queries whose best score is finite (the run computes it from its running top-k instead)."""
    best = scores.nan_to_num(float("-inf")).max(dim=1).values
    assert torch.isfinite(best).sum() > 0
    return best[torch.isfinite(best)].mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["adam", "trackstar", "tracin_cp"])
def test_every_kernel_runs_end_to_end_and_writes_its_spec(kernel_runs, kernel):
    run = kernel_runs[kernel]
    for epoch in (0, 1) if kernel == "adam" else (1,):
        metrics = json.loads((run / f"attribution/epoch_{epoch:03d}/metrics.json").read_text())
        assert metrics["kernel"]["name"] == kernel
        scores = saved_scores(run / f"attribution/epoch_{epoch:03d}", metrics["ft_source"])
        assert metrics["ft"] == pytest.approx(mean_max(scores), rel=1e-4, abs=1e-6)  # from top-k: the same number
        assert metrics["loss_target"] == {"answer_template": "{answer}", "query_target": "gold"}
        meta = header(run / f"attribution/epoch_{epoch:03d}/stores/test_queries.safetensors")
        assert meta["projector"]["kernel"]["name"] == kernel
        assert ("precondition" in meta["projector"]) == (kernel != "tracin_cp")
        moments = Moments.load(run / f"checkpoints/epoch_{epoch:03d}/adam_moments.safetensors")
        assert moments.source == ("estimate" if epoch == 0 else "optimizer")
        if kernel != "tracin_cp":
            assert meta["projector"]["precondition"]["moments"] == moments.fingerprint()
    assert "Loss target: answer `{answer}`, queries `gold`." in (run / "tables/table2.md").read_text()
    if kernel == "tracin_cp":
        tracin = json.loads((run / "attribution/tracin_cp/metrics.json").read_text())
        assert tracin["epochs"] == [1]
        scores = saved_scores(run / "attribution/tracin_cp", tracin["ft_source"])
        assert tracin["ft"] == pytest.approx(mean_max(scores), rel=1e-4, abs=1e-6)
        assert (run / "tables/tracin_cp.md").read_text().startswith("### TracIn-CP")


@pytest.mark.slow
def test_stores_of_different_kernels_refuse_to_mix(kernel_runs):
    from lark.errors import StoreMismatch
    from lark.kernel.stores import score_stores

    a = kernel_runs["adam"] / "attribution/epoch_001/stores/test_queries.safetensors"
    b = kernel_runs["tracin_cp"] / "attribution/epoch_001/stores/finetune.safetensors"
    with pytest.raises(StoreMismatch, match=r"projector\.kernel differs"):
        score_stores(a, b)


@pytest.mark.slow
def test_reattribution_with_saved_moments_equals_the_training_run(kernel_runs, tmp_path):
    """attribute.py on a tracin_cp run with attribution/kernel=adam reads the saved moments and gives the adam run's
    scores; a run saved before the projector/kernel groups (projector.kind, no kernel) still resumes and
    re-attributes."""
    import shutil

    from conftest import SMALL, compose
    from safetensors import safe_open

    from lark.experiment import attribute
    from lark.resume import check_same_run

    def scores(run):
        return safe_open(str(run / "attribution/epoch_001/scores/finetune.safetensors"), "pt").get_tensor("scores")

    run = tmp_path / "run"
    shutil.copytree(kernel_runs["tracin_cp"], run)
    before = scores(run)
    attribute(run, {"kernel": OmegaConf.to_container(OmegaConf.load(KERNELS / "adam.yaml"))}, log=lambda m: None)
    torch.testing.assert_close(scores(run), scores(kernel_runs["adam"]))
    assert json.loads((run / "attribution/epoch_001/metrics.json").read_text())["kernel"]["name"] == "adam"

    (run / "lark_config.yaml").unlink()  # runs of then had no run-level config: resume compared epoch_000's
    for path in (run / ".hydra/config.yaml", run / "checkpoints/epoch_000/lark_config.yaml"):  # the old form
        old = OmegaConf.load(path)
        projector = OmegaConf.to_container(old.attribution.projector)
        old.attribution.projector = {
            "kind": "sketch",
            "normalize": "none",
            "max_dense_elements": 200000000,
            **{k: v for k, v in projector.items() if not k.startswith("_")},
        }
        del old.attribution["kernel"], old.attribution["save_moments"]
        old.model = {"kind": "tiny", **{k: v for k, v in old.model.items() if k != "load"}}  # before model.load,
        old.data = {
            "name": "world",
            "kind": "world",
            "world": old.data.world,  # data.reader/corpora,
            "n_train": old.data.n_train,
            "n_test": old.data.n_test,
        }
        for spec in old.source.sources.values():  # the corpus kinds,
            if spec.kind != "finetune":
                spec.kind = {"retrieve": "medical", "sample": "entertainment"}[spec.kind]
                del spec["corpus"]
        del old.source["kinds"]
        old.format = {"kind": "chat", **{k: v for k, v in old.format.items() if k != "layout"}}  # format.layout
        old.format.answer_template = "{final_decision}"  # and the answer field
        del old["eval"]  # and eval=
        OmegaConf.save(old, path)
    overrides = [o for o in SMALL if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1", "logger=none"]
    check_same_run(compose(overrides + ["attribution.checkpoints=[1]", f"paths.output_dir={run}"]), run)
    attribute(run, {"checkpoints": [1]}, log=lambda m: None)
    torch.testing.assert_close(scores(run), before)  # today's cosine = the old run's
    assert json.loads((run / "attribution/epoch_001/metrics.json").read_text())["kernel"]["name"] == "cosine"
