"""Every config group composes, and +experiment=pubmedqa resolves to the paper's setup."""

import pytest
import torch
from conftest import ROOT, compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lark.resume import flat

GROUPS = {
    group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
    for group in (
        "model",
        "data",
        "source",
        "format",
        "scheduler",
        "trainer",
        "logger",
        "attribution",
        "attribution/projector",
        "attribution/kernel",
        "analysis",
        "eval",
    )
}


def test_default_is_the_embedded_run():
    cfg = compose()
    assert (cfg.model.name, cfg.data.name, cfg.format.name, cfg.scheduler.name) == (
        "tiny-olmo3",
        "world",
        "chatml",
        "paper",
    )
    assert cfg.trainer.accelerator == "cpu" and list(cfg.logger) == ["wandb"] and cfg.logger.wandb.offline is True
    assert cfg.attribution.projector.k == 65536 and cfg.attribution.store_dtype == "float16"
    assert list(cfg.source.sources) == [
        "finetune",
        "medical_format",
        "medical_noformat",
        "entertainment_format",
        "entertainment_noformat",
    ]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    """Choosing an option composes to that file's own values (every leaf it sets, interpolations unresolved; what
    its defaults list pulls in may add keys), and its `_target_` (projector and kernel files) imports a callable."""
    from hydra.utils import get_object

    cfg = compose([f"{group}={option}"])
    node = cfg
    for key in group.split("/"):
        node = node[key]
    own = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / f"{option}.yaml"), resolve=False)
    own.pop("defaults", None)
    composed = flat(OmegaConf.to_container(node, resolve=False)) if node is not None else {}
    assert {k: composed.get(k, "<absent>") for k in flat(own)} == flat(own)
    if own.get("_target_"):
        assert callable(get_object(node._target_))


def test_experiment_pubmedqa_is_the_paper():
    cfg = compose(["+experiment=pubmedqa"])
    assert cfg.model.hub_id == "allenai/Olmo-3-7B-Instruct" and cfg.model.dtype == "bfloat16"
    assert cfg.model.trust_remote_code is False and cfg.model.gradient_checkpointing is True
    assert (cfg.data.reader.hub_id, cfg.data.reader.hub_config, cfg.data.n_train, cfg.data.n_test) == (
        "qiaojin/PubMedQA",
        "pqa_labeled",
        500,
        500,
    )
    assert cfg.source.size == 500 and len(cfg.source.sources) == 5
    assert cfg.trainer.max_epochs == 5 and cfg.batch_size == 4 and cfg.trainer.precision == "bf16-true"
    assert cfg.attribution.projector._target_ == "lark.kernel.sketch.HookSketch"  # the fast path (issue 20)
    assert cfg.attribution.projector.k == 65536
    assert cfg.attribution.kernel._target_ == "lark.kernel.kernels.RapidIn"  # per-tensor normalisation
    replica = compose(["+experiment=pubmedqa", "attribution/projector=rapidin"]).attribution.projector
    assert replica._target_ == "lark.kernel.projectors.CountSketch.of_model" and replica.k == 65536  # RapidIn's
    assert cfg.optimizer.lr == pytest.approx(2e-4)
    assert learning_rates(cfg) == pytest.approx([2e-4, 2e-4, 2e-4, 2e-5, 2e-5])


def learning_rates(cfg):
    """The lr of each epoch under the configured optimizer and scheduler factories."""
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.scheduler.scheduler)(optimizer=optimizer)
    rates = []
    for _ in range(cfg.trainer.max_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedulers():
    assert learning_rates(compose(["scheduler=constant"])) == pytest.approx([2e-4] * 5)
    cosine = learning_rates(compose(["scheduler=cosine"]))
    assert cosine[0] == pytest.approx(2e-4) and all(a > b for a, b in zip(cosine, cosine[1:]))


def test_local_pubmedqa_points_at_shared_data():
    cfg = compose(["data=pubmedqa_local"])
    assert cfg.data.reader.path.endswith("shared/data/pubmedqa/pqa_labeled.jsonl")
    assert cfg.data.corpora.medical.path.endswith("pubmed_corpus/abstracts.jsonl")
    assert cfg.data.corpora.entertainment.path.endswith("entertainment/documents.jsonl")


def test_trainer_gpu_and_ddp():
    gpu = compose(["trainer=gpu"]).trainer
    ddp = compose(["trainer=ddp"]).trainer
    assert gpu.precision == "bf16-true" and gpu.accelerator == "gpu"
    assert ddp.precision == "bf16-true"
    strategy = instantiate(ddp.strategy)  # its collective timeout is a key (the token pass runs on rank 0 alone)
    assert type(strategy).__name__ == "DDPStrategy" and strategy._timeout.total_seconds() == 30 * 60
    longer = instantiate(compose(["trainer=ddp", "trainer.strategy.timeout.minutes=120"]).trainer.strategy)
    assert longer._timeout.total_seconds() == 120 * 60


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_epochs=-1", "trainer.max_epochs"),
        ("attribution.projector.k=0", "attribution.projector.k"),
        ("attribution.projector._target_=lark.nope.Projector", "attribution.projector._target_"),
        ("attribution.kernel._target_=lark.kernel.kernels.Nope", "attribution.kernel._target_"),
        ("source.pt_source=nope", "source.pt_source"),
        ("attribution.top_k=-3", "attribution.top_k"),
        ("attribution.batch_size=0", "attribution.batch_size"),
        ("batch_size=0", "batch_size"),
        ("attribution.checkpoints=5", "attribution.checkpoints"),
        ("attribution.checkpoints=[0,9]", "attribution.checkpoints"),  # the run has epochs 0-5
        ("data.reader.path=/nonexistent/train.jsonl", "data.reader.path"),  # named before the sources drawn from it
        ("+optimizer.weight_decy=0.1", "optimizer.weight_decy"),  # misspelt: failed only when training began
        ("+trainer.max_epoch=3", "trainer.max_epoch"),
        ("+scheduler.scheduler.milestone=[2]", "scheduler.scheduler.milestone"),
        ("optimizer._target_=torch.optim.Nope", "optimizer._target_"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.labels=[yes,no]", "eval.labels"),  # data.answers has "maybe": accuracy silently lost it
        ("data.answers=null eval.labels=[]", "eval.labels must be a non-empty"),  # crashed once epoch_000 was written
        ("analysis.table1_epoch=99", "analysis.table1_epoch"),  # the run has epochs 0-5: failed after training
        ("source.bm25_per_query=0", "source.bm25_per_query"),  # a ValueError naming a source, not the key
        ("+data.n_train=-1", "data.n_train"),  # items[:-1]: one row dropped silently
        ("data=pubmedqa_local data.n_test=-2", "data.n_test"),
        ("+source.sources.medical_format.sise=3", "source.sources.medical_format.sise"),  # dropped silently
        ("source.sources.finetune.formatted=maybe", "source.sources.finetune.formatted"),
        ("+experiment=canary data.canary.answer=perhaps", "data.canary.answer"),
        # the fine-tuning's numbers: each gave a traceback when training began, after the model's load
        ("scheduler.interval=epochs", "scheduler.interval"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("scheduler.lr=abc", "scheduler.lr"),
        ("max_length=0", "max_length"),
        ("num_workers=-1", "num_workers"),
        ("model.dtype=bf16", "model.dtype"),
        ("gradient_clip_val=-1", "gradient_clip_val"),  # Lightning skipped clipping, the moments estimate did not
        ("trainer.gradient_clip_val=0.5", "trainer.gradient_clip_val"),  # the root key stayed 1.0 for the estimate
        # each failed when the first example was encoded, after the model's load
        ("format.user_template='{answer}'", "format.user_template"),
        ("format.layout._target_=lark.data.formats.Nope", "format.layout"),
        ("format.system_prompt=[1]", "format.system_prompt"),
        # passed, and broke or meant something else later
        ("seed=abc", "seed"),
        ("attribution.enabled=maybe", "attribution.enabled"),
        ("analysis.report=maybe", "analysis.report"),
        ("analysis.report_snippet_chars=-1", "analysis.report_snippet_chars"),
        ("+data.n_tset=5", "data.n_tset"),  # misspelt data keys were dropped silently
        ("+data.fields.contexts=abstract", "data.fields.contexts"),
        ("+data.extras.long=3", "data.extras.long"),  # a TypeError naming no key when the rows were read
        ("source.format_pairs.medical=[medical_format]", "source.format_pairs.medical"),
    ],
)
def test_bad_values_fail_at_start_naming_the_key(override, key):
    from lark.config_checks import check_config

    overrides = (["data=jsonl"] if override.startswith("data.reader") else []) + override.split()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(compose(overrides))


def test_a_run_that_attributes_nothing_may_keep_query_target_predicted():
    """The LDS retrains of a query_target=predicted run turn attribution off and the evaluation to Skip: the check
    "predicted needs an evaluator that predicts" refused every retrain at start."""
    from lark.config_checks import check_config

    check_config(compose(["attribution.query_target=predicted", "attribution.enabled=false", "eval=none"]))
    with pytest.raises(ValueError, match="attribution.query_target=predicted: eval"):
        check_config(compose(["attribution.query_target=predicted", "eval=none"]))


class WhitensWithoutMap:
    """A plug-in kernel that whitens (transform maps by a matrix) but gives no linear_map."""

    name, uses_optimizer, run_level, whitens = "mine", False, False, True

    def __init__(self):
        from lark.kernel.normalizers import NoNorm

        self.normalizer = NoNorm()


def test_a_whitening_kernel_without_its_linear_map_is_refused_for_tokens_at_start():
    """attribution.tokens=topk splits a score through the kernel's linear map: a plug-in whitening kernel without
    linear_map() is refused by check_config, naming attribution.kernel._target_, not after the stores are built."""
    from lark.config_checks import check_config

    mine = "attribution.kernel._target_=test_config.WhitensWithoutMap"
    check_config(compose([mine]))  # without tokens it is a kernel like any other
    with pytest.raises(ValueError, match=r"attribution\.kernel\._target_ test_config\.WhitensWithoutMap"):
        check_config(compose([mine, "attribution.tokens=topk"]))
    check_config(compose(["attribution/kernel=trackstar", "attribution.tokens=topk"]))  # TrackStar has its map


@pytest.mark.parametrize(
    "recipe,projector",
    [("pubmedqa", "lark.kernel.sketch.HookSketch"), ("pubmedqa_small", "lark.kernel.sketch.HookSketch")],
)
def test_both_paper_recipes_compose_to_rapidins_per_tensor_normalisation(recipe, projector):
    """Both recipes: the hook sketch with RapidIn's kernel (pubmedqa in bf16 weights, bf16-true training). Both
    name their loss target (the decision alone, gold queries)."""
    from lark.kernel.factory import make_kernel

    cfg = compose([f"+experiment={recipe}"])
    assert cfg.attribution.projector._target_ == projector and cfg.attribution.projector.k == 65536
    kernel = make_kernel(cfg.attribution)
    assert kernel.name == "rapidin" and kernel.normalizer.name == "per_tensor"
    assert (cfg.format.answer_template, cfg.attribution.query_target) == ("{answer}", "gold")
    if recipe == "pubmedqa":
        assert (cfg.model.dtype, cfg.trainer.precision) == ("bfloat16", "bf16-true")
    text = (ROOT / "conf" / "experiment" / f"{recipe}.yaml").read_text()
    assert "answer_template:" in text and "query_target:" in text  # named in the recipe, with its reason


def test_kernel_menu_composes_and_the_loss_target_sweeps_like_multirun():
    """`python train.py -m format.answer_template=...,... attribution.query_target=gold,predicted
    attribution/kernel=rapidin,adam` expands to 8 jobs, each composing to its own loss target and kernel."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lark.kernel.factory import make_kernel

    sweep = OverridesParser.create().parse_overrides(
        [
            'format.answer_template="{answer}","{answer}. {long_answer}"',
            "attribution.query_target=gold,predicted",
            "attribution/kernel=rapidin,adam",
        ]
    )
    jobs = list(itertools.product(*[[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in sweep]))
    assert len(jobs) == 8
    seen = set()
    for job in jobs:
        cfg = compose(list(job))
        seen.add((cfg.format.answer_template, cfg.attribution.query_target, make_kernel(cfg.attribution).name))
    assert seen == set(
        itertools.product(["{answer}", "{answer}. {long_answer}"], ["gold", "predicted"], ["rapidin", "adam"])
    )


def test_attribute_py_takes_another_projector_or_kernel_by_group():
    cfg = compose(["run_dir=x", "attribution/kernel=trackstar", "attribution/projector=rapidin"], "attribute")
    assert cfg.attribution.kernel._target_ == "lark.kernel.kernels.TrackStar"
    assert cfg.attribution.projector._target_ == "lark.kernel.projectors.CountSketch.of_model"
    assert dict(compose(["run_dir=x"], "attribute").attribution) == {}  # default: the run's own


def test_a_pure_bf16_fine_tune_is_said_once_and_kept_with_the_run(tmp_path):
    """trainer=gpu (bf16-true, the paper recipe's) rounds small AdamW updates away: a warning on the console and
    in data/warnings.json (every metrics.json carries it); float32 and bf16-mixed runs get none."""
    from lark import notices

    lines = []
    notices.warn_precision(compose(["trainer=gpu"]), tmp_path, lines.append)
    assert len(lines) == 1 and "bf16-mixed model.dtype=float32" in lines[0]
    assert "bf16_true" in notices.read(tmp_path)
    notices.warn_precision(compose(["trainer.precision=bf16-mixed"]), tmp_path / "mixed", lines.append)
    notices.warn_precision(compose([]), tmp_path / "f32", lines.append)
    assert len(lines) == 1


def test_a_sweep_runs_every_job_when_one_fails(tmp_path):
    """A job's user error (a LarkError) ended the whole sweep with sys.exit(2): the jobs after it never ran (with
    joblib, a running one was killed). Now each job's error is printed and Hydra reports the first at the end."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "attribution.top_k=0,-1", f"hydra.sweep.dir={tmp_path}/s"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("[lark] error:")]
    assert [e.split("got ")[-1] for e in errors] == ["0", "-1"], done.stderr[-2000:]


@pytest.mark.parametrize("evaluator", ["choices", "loss", "exact_match"])
def test_the_evaluation_batch_is_a_key(evaluator):
    """Answers were scored 16 at a time whatever the model: at 7B, 16 x 1,024 tokens of logits are ~6.6 GB."""
    assert instantiate(compose([f"eval={evaluator}", "eval.batch_size=2"]).eval).batch_size == 2
