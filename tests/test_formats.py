"""lark.data.formats: chat / plain / raw-text encodings and their loss masks, document fields, truncation,
candidates."""

import pytest
import torch
from conftest import data_spec
from omegaconf import OmegaConf

from lark.data.formats import (
    CHATML_TEMPLATE,
    IGNORE,
    candidate_answer,
    chat_template,
    document_fields,
    encode,
    encode_qa,
    encode_text,
    messages,
    qa_fields,
    render,
    truncate_middle,
)
from lark.data.world import generate_world
from lark.errors import ConfigError
from lark.models import train_tokenizer

SYSTEM = "Answer the biomedical research question with yes, no, or maybe."


def shipped(name, layout):
    """conf/format/<name>.yaml's shape with the PubMedQA system prompt."""
    user = "Context: {context}\nQuestion: {question}"
    return OmegaConf.create(
        {"name": name, "layout": {"_target_": layout}, "system_prompt": SYSTEM, "user_template": user}
        | {"answer_template": "{answer}"}
    )


CHAT = shipped("chatml", "lark.data.formats.Chat")
PLAIN = shipped("noformat", "lark.data.formats.Plain")


@pytest.fixture(scope="module")
def world():
    """A small generated world whose QA items are mapped by data=world (as a run sees them)."""
    from lark.data.readers import load_data

    sizes = dict(n_train=40, n_test=20, n_facts=30, n_medical_docs=100, n_entertainment_docs=100)
    spec = data_spec("world", **{f"world.{k}": v for k, v in sizes.items()}, **{"world.seed": 0})
    train, test, _, world = load_data(OmegaConf.create(spec))
    assert world.config == generate_world(seed=0, **sizes).config  # the world the reader made
    world.train, world.test = train, test
    return world


@pytest.fixture(scope="module")
def tok(world):
    texts = [d["text"] for d in world.medical_docs + world.entertainment_docs]
    texts += [" ".join(x["contexts"]) + " " + x["question"] for x in world.train]
    return train_tokenizer(texts, 600)


@pytest.fixture(scope="module")
def fields(world):
    return qa_fields(world.test[0])


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled(enc):
    return [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]


def check_mask_shape(enc):
    """Labels equal the input ids where set, and the set positions are one block at the end."""
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert all(lab == IGNORE for lab in labels[:first])
    assert labels[first:] == ids[first:]
    return first


def test_the_formats_match_the_shipped_configs():
    for name, fmt in [("chatml", CHAT), ("noformat", PLAIN)]:
        shipped = OmegaConf.load(f"{__file__.rsplit('/tests/', 1)[0]}/conf/format/{name}.yaml")
        assert OmegaConf.to_container(shipped) == OmegaConf.to_container(fmt)


# ----------------------------------------------------------------------------- chat
def test_trained_tokenizer_has_chatml(tok):
    assert tok.chat_template == CHATML_TEMPLATE and chat_template(tok) == CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert len(ids_of(tok, "<|im_start|>")) == 1 and len(ids_of(tok, "<|im_end|>")) == 1


def test_chat_rendering_and_loss_only_on_the_assistant_answer(tok, fields):
    prompt, answer = render(tok, fields, CHAT)
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nContext: {fields['context']}\n"
        f"Question: {fields['question']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert answer.startswith(fields["answer"] + "<|im_end|>")
    enc = encode_qa(tok, fields, CHAT, max_length=512)
    first = check_mask_shape(enc)
    assert enc["input_ids"][:first] == ids_of(tok, prompt)  # nothing of the prompt carries loss
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    target = ids_of(tok, fields["answer"]) + [im_end]
    assert labelled(enc)[: len(target)] == target  # answer tokens, then end-of-turn
    assert tok.decode(labelled(enc), skip_special_tokens=True).strip() == fields["answer"]
    assert tok.decode(enc["input_ids"]) == prompt + answer


def test_chat_loss_is_exactly_answer_plus_end_of_turn(tok, fields):
    enc = encode_qa(tok, fields, CHAT, max_length=512)
    assert labelled(enc) == ids_of(tok, fields["answer"]) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.decode(labelled(enc), skip_special_tokens=True) == fields["answer"]


def test_chat_without_system_prompt_has_no_system_turn(tok, fields):
    fmt = OmegaConf.merge(CHAT, {"system_prompt": None})
    assert [m["role"] for m in messages(fields, fmt)] == ["user", "assistant"]
    assert [m["role"] for m in messages(fields, CHAT)] == ["system", "user", "assistant"]
    prompt, _ = render(tok, fields, fmt)
    assert prompt.startswith("<|im_start|>user\n") and "system" not in prompt


def test_chat_long_answer_template(tok, world):
    fmt = OmegaConf.merge(CHAT, {"answer_template": "{answer}. {long_answer}"})
    item = world.test[1]
    f = qa_fields(item, fmt.answer_template)
    assert f["answer"] == f"{item['answer']}. {item['long_answer']}"
    enc = encode_qa(tok, f, fmt, max_length=512)
    check_mask_shape(enc)
    assert tok.decode(labelled(enc), skip_special_tokens=True).strip() == f["answer"]


# ----------------------------------------------------------------------------- plain
def test_plain_rendering_loss_only_on_space_answer_eos(tok, fields):
    prompt, answer = render(tok, fields, PLAIN)
    assert prompt == f"{SYSTEM}\n\nContext: {fields['context']}\nQuestion: {fields['question']}\nAnswer:"
    assert answer == f" {fields['answer']}<|im_end|>"
    enc = encode_qa(tok, fields, PLAIN, max_length=512)
    first = check_mask_shape(enc)
    assert enc["input_ids"][:first] == ids_of(tok, prompt)
    assert labelled(enc) == ids_of(tok, " " + fields["answer"]) + [tok.eos_token_id]
    assert tok.decode(labelled(enc)) == f" {fields['answer']}<|im_end|>"
    assert "<|im_start|>" not in tok.decode(enc["input_ids"])


def test_plain_without_system_prompt(tok, fields):
    prompt, _ = render(tok, fields, OmegaConf.merge(PLAIN, {"system_prompt": None}))
    assert prompt.startswith("Context: ") and prompt.endswith("\nAnswer:")


class Tagged:
    """A user's own layout (format.layout._target_ = test_formats.Tagged): <q>...</q><a>...</a>."""

    def render(self, tokenizer, turns):
        return f"<q>{turns[-2]['content']}</q><a>", f"{turns[-1]['content']}</a>"

    def candidate(self, label):
        return label


def test_a_users_own_layout_is_a_target(tok, fields):
    fmt = OmegaConf.merge(PLAIN, {"layout": {"_target_": "test_formats.Tagged"}})
    prompt, answer = render(tok, fields, fmt)
    assert prompt == f"<q>Context: {fields['context']}\nQuestion: {fields['question']}</q><a>"
    assert answer == f"{fields['answer']}</a>" and candidate_answer(fmt, "yes") == "yes"
    enc = encode_qa(tok, fields, fmt, 512)
    assert tok.decode([i for i, label in zip(enc["input_ids"], enc["labels"]) if label != IGNORE]) == answer


def test_format_without_layout_names_the_key(tok, fields):
    fmt = OmegaConf.create({k: v for k, v in OmegaConf.to_container(PLAIN).items() if k != "layout"})
    with pytest.raises(ConfigError, match="format.layout: missing"):
        render(tok, fields, fmt)


# ----------------------------------------------------------------------------- raw text
def test_raw_text_loss_on_every_token(tok, world):
    text = world.entertainment_docs[0]["text"]
    enc = encode_text(tok, text, max_length=4096)
    assert enc["input_ids"] == ids_of(tok, text) + [tok.eos_token_id]
    assert enc["labels"] == enc["input_ids"] and IGNORE not in enc["labels"]
    short = encode_text(tok, text, max_length=10)
    assert short["input_ids"] == enc["input_ids"][:10] and short["labels"] == short["input_ids"]


def test_encode_dispatches_on_the_example_shape(tok, fields, world):
    doc = {"id": "d", "text": world.medical_docs[0]["text"]}
    assert encode(tok, doc, CHAT, 128) == encode_text(tok, doc["text"], 128)
    assert encode(tok, fields, CHAT, 128) == encode_qa(tok, fields, CHAT, 128)
    assert encode(tok, fields, PLAIN, 128) == encode_qa(tok, fields, PLAIN, 128)


# ----------------------------------------------------------------------------- document fields
def test_document_fields_first_middle_last():
    doc = {"id": "d1", "text": "First one here. Second sentence!  Third?\nFourth line\n\nLast sentence."}
    assert document_fields(doc) == {
        "id": "d1",
        "question": "First one here.",
        "context": "Second sentence! Third? Fourth line",
        "answer": "Last sentence.",
    }


def test_document_fields_two_sentences_have_empty_context():
    assert document_fields({"id": "x", "text": "Is it so? It is."}) == {
        "id": "x",
        "question": "Is it so?",
        "context": "",
        "answer": "It is.",
    }


@pytest.mark.parametrize(
    "text, question, answer",
    [
        ("one two three four five", "one two", "three four five"),
        ("one two three four", "one two", "three four"),
        ("Single.", "Single.", "."),
        ("  lonely  ", "lonely", "."),
    ],
)
def test_document_fields_one_sentence_is_split_by_words(text, question, answer):
    f = document_fields({"id": "s", "text": text})
    assert (f["question"], f["context"], f["answer"]) == (question, "", answer)


def test_document_fields_renders_with_the_qa_template(tok, world):
    f = document_fields(world.medical_docs[3])
    enc = encode_qa(tok, f, CHAT, max_length=1024)
    check_mask_shape(enc)
    assert tok.decode(labelled(enc), skip_special_tokens=True).strip() == f["answer"]


# ----------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("fmt", [CHAT, PLAIN], ids=["chat", "plain"])
@pytest.mark.parametrize("max_length", [64, 96, 200])
def test_truncation_keeps_answer_and_prompt_end(tok, world, fmt, max_length):
    item = dict(world.test[2], contexts=world.test[2]["contexts"] * 6)  # a long context
    f = qa_fields(item)
    prompt, answer = render(tok, f, fmt)
    full_prompt, answer_ids = ids_of(tok, prompt), ids_of(tok, answer)
    assert len(full_prompt) + len(answer_ids) > max_length
    enc = encode_qa(tok, f, fmt, max_length)
    assert len(enc["input_ids"]) == max_length
    first = check_mask_shape(enc)
    assert labelled(enc) == answer_ids  # the answer survives whole
    kept = enc["input_ids"][:first]
    tail = min(64, (max_length - len(answer_ids)) // 2)
    assert kept[-tail:] == full_prompt[-tail:]  # the end of the prompt survives
    assert kept[: len(kept) - tail] == full_prompt[: len(kept) - tail]  # the start too; the middle is cut
    if max_length >= 200:
        assert f["question"] in tok.decode(kept[-tail:])


@pytest.mark.parametrize("fmt", [CHAT, PLAIN], ids=["chat", "plain"])
def test_a_long_question_survives_whole_and_the_context_is_cut(tok, world, fmt):
    """The prompt kept a fixed last 64 tokens, so a question longer than that lost its start (632 of PubMedQA's
    1,000 with the tiny tokenizer at max_length=256) while context was kept; now the context alone is cut."""
    from lark.evaluation import ExactMatch

    question = " ".join([world.test[3]["question"]] * 4)
    f = qa_fields(dict(world.test[3], question=question, contexts=world.test[3]["contexts"] * 6))
    prompt, answer = render(tok, f, fmt)
    assert len(ids_of(tok, question)) > 64 and len(ids_of(tok, prompt)) + len(ids_of(tok, answer)) > 400
    enc = encode_qa(tok, f, fmt, 400)
    kept = enc["input_ids"][: check_mask_shape(enc)]
    assert len(enc["input_ids"]) == 400 and question in tok.decode(kept)
    encoder = type("E", (), {"tokenizer": tok, "fmt": fmt, "max_length": 400})()
    seen = []

    class Model(torch.nn.Module):  # records the generation prompt, answers end-of-sequence at once
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            seen.append(input_ids[0].tolist())
            logits = torch.zeros(1, input_ids.shape[1], len(tok))
            logits[0, -1, tok.eos_token_id] = 1.0
            return type("Out", (), {"logits": logits})()

    ExactMatch(max_new_tokens=8).evaluate(Model(), encoder, [f], [f])
    assert question in tok.decode(seen[0]) and len(seen[0]) <= 400 - 8


def test_no_truncation_when_it_fits(tok, fields):
    prompt, answer = render(tok, fields, CHAT)
    n = len(ids_of(tok, prompt)) + len(ids_of(tok, answer))
    assert encode_qa(tok, fields, CHAT, n)["input_ids"] == ids_of(tok, prompt) + ids_of(tok, answer)


def test_long_answer_is_cut_to_half_of_max_length(tok, world):
    fmt = OmegaConf.merge(PLAIN, {"answer_template": "{answer}. {long_answer}"})
    f = qa_fields(dict(world.test[0], long_answer=" ".join(world.test[0]["contexts"]) * 3), fmt.answer_template)
    enc = encode_qa(tok, f, fmt, 40)
    assert len(enc["input_ids"]) == 40 and len(labelled(enc)) == 20
    assert labelled(enc) == ids_of(tok, render(tok, f, fmt)[1])[:20]


def test_truncate_middle():
    ids = list(range(20))
    assert truncate_middle(ids, 20, 5) == ids
    assert truncate_middle(ids, 10, 3) == [0, 1, 2, 3, 4, 5, 6, 17, 18, 19]
    assert truncate_middle(ids, 10, 64) == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]  # tail capped at budget // 2
    assert truncate_middle(ids, 1, 4) == [0]


# ----------------------------------------------------------------------------- candidate answers
@pytest.mark.parametrize("fmt", [CHAT, PLAIN], ids=["chat", "plain"])
def test_candidate_answers_score_the_first_answer_tokens(tok, world, fmt):
    for item in world.test[:6]:
        f = qa_fields(item)
        gold = encode_qa(tok, f, fmt, 512)
        for label in ("yes", "no", "maybe"):
            cand = encode_qa(tok, f, fmt, 512, answer=candidate_answer(fmt, label))
            first = check_mask_shape(cand)
            assert cand["input_ids"][:first] == gold["input_ids"][:first]  # the same prompt
            assert tok.decode(labelled(cand)).strip() == label
            if label == item["answer"]:
                assert labelled(cand) == labelled(gold)[: len(labelled(cand))]  # a prefix of the trained answer
            else:
                assert labelled(cand) != labelled(gold)[: len(labelled(cand))]


def test_candidate_answer_text():
    assert candidate_answer(CHAT, "yes") == "yes"
    assert candidate_answer(PLAIN, "maybe") == " maybe"


# ----------------------------------------------------------------------------- a tokenizer's own template
OWN_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def test_a_tokenizers_own_chat_template_is_used_as_is(tok, fields, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", OWN_TEMPLATE)
    assert chat_template(tok) == OWN_TEMPLATE
    prompt, answer = render(tok, fields, CHAT)
    assert prompt == (
        f"[SYSTEM] {SYSTEM}</turn>\n[USER] Context: {fields['context']}\nQuestion: {fields['question']}"
        "</turn>\n[ASSISTANT] "
    )
    assert answer == f"{fields['answer']}</turn>"  # the newline after the turn carries no loss
    assert "<|im_start|>" not in prompt
    enc = encode_qa(tok, fields, CHAT, 512)
    first = check_mask_shape(enc)
    assert enc["input_ids"][:first] == ids_of(tok, prompt) and labelled(enc) == ids_of(tok, answer)


def test_a_tokenizer_without_template_gets_chatml(tok, fields, monkeypatch):
    expected = render(tok, fields, CHAT)
    monkeypatch.setattr(tok, "chat_template", None)
    assert chat_template(tok) == CHATML_TEMPLATE
    assert render(tok, fields, CHAT) == expected


def test_a_template_that_does_not_extend_the_prompt_is_refused(tok, fields, monkeypatch):
    bad = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<generate>{% endif %}"
    monkeypatch.setattr(tok, "chat_template", bad)
    with pytest.raises(ValueError, match="does not extend the generation prompt"):
        render(tok, fields, CHAT)


def test_qa_fields_joins_contexts(world):
    item = world.train[0]
    f = qa_fields(item)
    assert f == {
        "id": item["id"],
        "question": item["question"],
        "context": " ".join(item["contexts"]),
        "answer": item["answer"],
    }


def test_the_fine_tuning_loader_works_with_spawned_workers():
    """num_workers > 0 where workers are spawned (macOS, Windows): the loader's collate_fn must pickle (a lambda
    did not); a spawned worker gives the batch the main process gives."""
    import multiprocessing
    import pickle

    import torch

    from lark.data.datamodule import collate, make_loader

    encoded = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    loader = make_loader(encoded, 2, 0, shuffle=False, seed=0, num_workers=1)
    pickle.dumps(loader.collate_fn)
    loader.multiprocessing_context = multiprocessing.get_context("spawn")
    (batch,) = list(loader)
    assert torch.equal(batch["input_ids"], collate(encoded, 0)["input_ids"])
