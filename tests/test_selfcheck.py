"""lark.kernel.selfcheck: the sketch refuses a model it does not fully cover (naming the modules and the fallback) and
passes the OLMo-3 family it was built for."""

import csv
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL, TINY_OLMO3
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutput

from lark.kernel.projectors import CountSketch, ExactProjector, GaussianProjector
from lark.kernel.selfcheck import SelfCheckError, check_sketch, compared, tolerance, uses_sketch
from lark.kernel.sketch import HookSketch
from lark.kernel.sketch_math import NORMS, per_example_loss
from lark.kernel.stores import load_store
from lark.models import build_tiny, train_tokenizer

TEXTS = [f"the trial of drug {i} reduced the risk of stroke in patients" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def examples(tok):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in (TEXTS[0], TEXTS[7] + " again")]
    return [{"input_ids": i, "labels": list(i)} for i in ids]


def test_the_tiny_olmo3_passes(tok, examples):
    torch.manual_seed(0)
    model = build_tiny(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), tok)
    assert check_sketch(model, examples, tok.pad_token_id) == len(list(model.parameters()))


def test_a_gpt2_style_model_is_refused_naming_conv1d_and_the_fallback(tok, examples):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=None, eos_token_id=None
        )
    )
    with pytest.raises(SelfCheckError) as error:
        check_sketch(model, examples, tok.pad_token_id)
    message = str(error.value)
    assert "transformer.h.0.attn.c_attn (Conv1D)" in message and "transformer.wpe (Embedding)" in message
    assert "coverage" in message and "attribution/projector=rapidin" in message
    assert "attribution.projector.kind=rapidin" in message


class TwiceLM(torch.nn.Module):
    """A causal LM whose hidden layer is applied twice in one forward pass (weights shared across two steps)."""

    def __init__(self, vocab):
        super().__init__()
        self.embed, self.mix, self.head = (
            torch.nn.Embedding(vocab, 16),
            torch.nn.Linear(16, 16),
            torch.nn.Linear(16, vocab),
        )

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(torch.tanh(self.mix(h))))
        logits = self.head(h)
        loss = None if labels is None else per_example_loss(logits, labels).mean()
        return CausalLMOutput(loss=loss, logits=logits)


def test_a_module_called_twice_is_refused_naming_it(tok, examples):
    torch.manual_seed(0)
    model = TwiceLM(len(tok))
    with pytest.raises(SelfCheckError) as error:
        check_sketch(model, examples, tok.pad_token_id)
    message = str(error.value)
    assert "modules called more than once in one forward: mix (2 calls)" in message
    assert "attribution/projector=rapidin" in message


class CheckedProjector:
    """A projector of one's own that asks to be self-checked (its `_target_` is its of_model, as the shipped ones)."""

    self_check = True

    @classmethod
    def of_model(cls, model, **options):
        return cls()


def test_only_projectors_that_say_so_are_checked():
    """uses_sketch reads the projector class's self_check flag from the config's `_target_` (a Cls.of_model
    target too), not its name; configs saved before the projector group (`kind`) and under first names still work."""
    assert HookSketch.self_check and not any(c.self_check for c in (CountSketch, GaussianProjector, ExactProjector))
    shipped = {p.stem: uses_sketch(OmegaConf.load(p)) for p in (ROOT / "conf/attribution/projector").glob("*.yaml")}
    assert shipped == {"sketch": True, "rapidin": False, "gaussian": False, "exact": False, "factored": False}
    assert uses_sketch(OmegaConf.create({"kind": "sketch"}))
    assert not uses_sketch(OmegaConf.create({"kind": "rapidin"}))
    assert uses_sketch(OmegaConf.create({"_target_": "lark.sketch.HookSketch"}))  # a saved config's first name
    assert uses_sketch(OmegaConf.create({"_target_": f"{__name__}.CheckedProjector.of_model"}))
    assert not uses_sketch(OmegaConf.create({"_target_": "lark.kernel.projectors.CountSketch.of_model"}))


def test_the_hooked_norms_are_an_explicit_tuple():
    """The norm classes of the families LARK supports, named, not guessed from a class name: OLMo-3's and
    SmolLM2's (Llama) RMSNorm are in; Gemma's, whose (1 + weight) * xhat needs another gradient, is not."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RMSNorm

    assert {torch.nn.LayerNorm, torch.nn.RMSNorm, Olmo3RMSNorm, LlamaRMSNorm} <= set(NORMS)
    assert GemmaRMSNorm not in NORMS


class OffsetNorm(torch.nn.Module):
    """An RMSNorm of another form, (1 + weight) * xhat (Gemma's), whose class name says norm."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))

    def forward(self, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class NormLM(TwiceLM):
    """A causal LM with one norm of an unknown class between its embedding and its output layer."""

    def __init__(self, vocab):
        super().__init__(vocab)
        self.norm = OffsetNorm(16)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, labels=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        logits = self.head(self.norm(torch.tanh(self.mix(h))))
        loss = None if labels is None else per_example_loss(logits, labels).mean()
        return CausalLMOutput(loss=loss, logits=logits)


def test_a_norm_of_a_class_not_listed_is_refused_naming_it(tok, examples):
    torch.manual_seed(0)
    model = NormLM(len(tok))
    assert HookSketch(model, 16).coverage() < 1
    with pytest.raises(SelfCheckError) as error:
        check_sketch(model, examples, tok.pad_token_id)
    message = str(error.value)
    assert "the hooks do not reach norm (OffsetNorm)" in message and "attribution/projector=rapidin" in message


@pytest.mark.parametrize("normalize", ["none", "per_tensor"])
def test_a_tied_model_passes_under_both_normalisations(tok, examples, normalize):
    """The tied weight's two parts (input embedding, output layer) reach the sketch separately and, under
    per_tensor, are normalised by the norm of their sum at the end of the pass: the check must see both."""
    torch.manual_seed(0)
    model = build_tiny(
        OmegaConf.merge(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), {"config": {"tie_word_embeddings": True}}), tok
    )
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert check_sketch(model, examples, tok.pad_token_id, normalize=normalize) == len(list(model.parameters()))


class ScaledEmbedding(torch.nn.Embedding):
    """An embedding that scales its output inside the module (as Gemma's): the hooks see dL/d(output), so the
    weight's gradient they build is off by the scale."""

    def forward(self, input_ids):
        return super().forward(input_ids) * 4.0


def test_a_scaled_embedding_is_refused_naming_it(tok, examples):
    torch.manual_seed(0)
    model = build_tiny(OmegaConf.load(ROOT / "conf/model/tiny.yaml"), tok)
    old = model.get_input_embeddings()
    scaled = ScaledEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx)
    scaled.weight = old.weight
    model.set_input_embeddings(scaled)
    with pytest.raises(SelfCheckError) as error:
        check_sketch(model, examples, tok.pad_token_id)
    message = str(error.value)
    assert (
        "sketch differs from the autograd gradients' count sketch in model.embed_tokens (ScaledEmbedding)" in message
        and "attribution/projector=rapidin" in message
    )


def test_the_tolerance_is_the_dtypes_rounding_with_float32_at_rtol():
    """max(rtol, 2 eps(dtype)) (lark.kernel.selfcheck.tolerance's derivation): bf16 is not held to float32's 1e-3."""
    assert tolerance(torch.float32) == 1e-3 and tolerance(torch.float32, rtol=1e-4) == 1e-4
    assert tolerance(torch.bfloat16) == 2 * 2**-7 and tolerance(torch.float16) == 2 * 2**-10


@pytest.mark.parametrize("normalize", ["none", "per_tensor"])
def test_a_bf16_olmo3_passes_under_both_normalisations(tok, examples, normalize):
    """The tiny OLMo-3 in bfloat16: refused in every module at rtol = 1e-3 before (bf16 rounds at ~4e-3)."""
    torch.manual_seed(0)
    model = build_tiny(OmegaConf.create(TINY_OLMO3), tok).to(torch.bfloat16)
    assert check_sketch(model, examples, tok.pad_token_id, normalize=normalize) == len(list(model.parameters()))


def test_bf16_still_refuses_an_uncovered_norm_and_a_scaled_embedding(tok, examples):
    """What the check is for is no rounding: in bf16 a norm the hooks do not reach and an embedding whose output is
    scaled inside the module are refused, naming them, as in float32."""
    torch.manual_seed(0)
    with pytest.raises(SelfCheckError, match=r"the hooks do not reach norm \(OffsetNorm\)"):
        check_sketch(NormLM(len(tok)).to(torch.bfloat16), examples, tok.pad_token_id)
    model = build_tiny(OmegaConf.create(TINY_OLMO3), tok)
    old = model.get_input_embeddings()
    scaled = ScaledEmbedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx)
    scaled.weight = old.weight
    model.set_input_embeddings(scaled)
    with pytest.raises(SelfCheckError) as error:
        check_sketch(model.to(torch.bfloat16), examples, tok.pad_token_id)
    assert "count sketch in model.embed_tokens (ScaledEmbedding) (by more than 0.016" in str(error.value)
    assert "torch.bfloat16" in str(error.value)


def test_one_block_of_each_kind_is_compared(tok):
    """compared(): the parameters outside the blocks and those of block 0 (each Linear role and norm of a block);
    a later block of another kind (here: with biases) is compared too."""
    torch.manual_seed(0)
    model = build_tiny(OmegaConf.create(TINY_OLMO3), tok)
    names = compared(model)
    block0 = [n for n, _ in model.named_parameters() if n.startswith("model.layers.0.")]
    assert names == [n for n, _ in model.named_parameters() if not n.startswith("model.layers.1.")]
    assert len(block0) == 11 and {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)
    layer = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(layer.in_features, layer.out_features, bias=True)
    assert "model.layers.1.mlp.down_proj.bias" in compared(model)


def test_a_wrong_block_0_is_found_though_later_blocks_are_not_compared(tok, examples):
    """Block 0 stands for its kind: a scaled projection inside it (its output times 3 in the module) is refused."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3.0

    torch.manual_seed(0)
    model = build_tiny(OmegaConf.create(TINY_OLMO3), tok).to(torch.bfloat16)
    old = model.model.layers[0].mlp.up_proj
    new = Scaled(old.in_features, old.out_features, bias=False, dtype=torch.bfloat16)
    new.weight = old.weight
    model.model.layers[0].mlp.up_proj = new
    with pytest.raises(SelfCheckError, match=r"count sketch in model.layers.0.mlp.up_proj \(Scaled\)"):
        check_sketch(model, examples, tok.pad_token_id)


@pytest.mark.parametrize(
    "accelerator,cuda,want",
    [("cpu", True, "cpu"), ("gpu", True, "cuda:0"), ("cuda", True, "cuda:0"), ("auto", True, "cuda:0")]
    + [("auto", False, "cpu"), ("tpu", False, None)],
)
def test_the_check_runs_on_the_trainers_device(monkeypatch, accelerator, cuda, want):
    """trainer.accelerator=gpu / cuda / auto put the self-check on the GPU when there is one; cpu keeps it on the
    CPU; an accelerator it does not know leaves the model where it is."""
    from lark.experiment import trainer_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    device = trainer_device(OmegaConf.create({"accelerator": accelerator, "devices": 1}))
    assert (str(device) if device is not None else None) == want


def test_a_ddp_rank_checks_on_its_own_gpu(monkeypatch):
    """Under DDP each rank (LOCAL_RANK) checks on its own device, trainer.devices given as indices or a count."""
    from lark.experiment import trainer_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert str(trainer_device(OmegaConf.create({"accelerator": "gpu", "devices": [2, 3]}))) == "cuda:3"
    assert str(trainer_device(OmegaConf.create({"accelerator": "gpu", "devices": "auto"}))) == "cuda:1"


@pytest.fixture
def bf16_hub(tmp_path, tok):
    """A tiny random-init OLMo-3 saved in bfloat16 as a local hub folder (config.json, safetensors, tokenizer)."""
    torch.manual_seed(0)
    folder = tmp_path / "olmo3_bf16"
    build_tiny(OmegaConf.create(TINY_OLMO3), tok).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_train_py_on_a_bf16_hub_folder_passes_the_check_and_writes_the_tables(bf16_hub, tmp_path):
    """`python train.py trainer=gpu trainer.accelerator=cpu model=hub model.dtype=bfloat16`: the self-check passes
    on the trainer's device (refused in every module before: issue 20) and the run writes Tables I-IV."""
    out = tmp_path / "run"
    overrides = [o for o in SMALL if not o.startswith(("model.", "trainer.max_epochs"))]
    overrides += ["trainer=gpu", "trainer.accelerator=cpu", "model=hub", f"model.hub_id={bf16_hub}"]
    overrides += ["model.dtype=bfloat16", "trainer.max_epochs=1", "logger=none", f"hydra.run.dir={out}"]
    done = subprocess.run([sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[lark] sketch self-check on cpu: the hooks reach all 25 parameter tensors" in done.stdout
    assert "of the 14 of one layer of each kind" in done.stdout
    for n in range(1, 5):
        assert (out / "tables" / f"table{n}.md").is_file() and (out / "tables" / f"table{n}.csv").is_file()
    with open(out / "tables" / "table2.csv") as f:
        table2 = list(csv.DictReader(f))
    assert [row["epoch"] for row in table2] == ["0", "1"]  # both checkpoints scored, in bf16, to finite numbers
    assert all(-1 <= float(row[key]) <= 1 for row in table2 for key in ("ft", "pt"))
    stores = sorted((out / "attribution" / "epoch_001" / "stores").glob("*.safetensors"))
    assert len(stores) == 6 and all(torch.isfinite(load_store(p)[0].float()).all() for p in stores)
