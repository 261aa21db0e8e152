"""How examples become token ids and loss masks.

Every example is one of two shapes:
- QA-shaped {id, question, context, answer}: rendered with the `format` config (its layout: a chat template,
plain text or your own);
  the loss is on the answer tokens (for chat, the assistant turn including its end-of-turn token).
- raw text {id, text}: the loss is on every token (next-token prediction over the document).

A raw document becomes a Formatted QA example by `document_fields`: its first sentence is the question, its
last sentence the answer, and the sentences between them the context.
"""

import json
import re

from lark.errors import ConfigError

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGNORE = -100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def qa_fields(item, answer_template="{answer}"):
    """A QA item (lark.data.readers) as QA fields; its answer follows the format's answer template, which may name any
    field of the item ({answer}, or data.extras such as {long_answer}). lark.validation.canary's planted items
    stay marked."""
    try:
        answer = answer_template.format(**item)
    except KeyError as e:
        raise ConfigError(
            f"format.answer_template: {{{e.args[0]}}} is not a field of the QA items "
            f"({', '.join(item)}; data.extras adds fields)"
        ) from None
    fields = {"id": item["id"], "question": item["question"], "context": " ".join(item["contexts"]), "answer": answer}
    return {**fields, "canary": True} if item.get("canary") else fields


def document_fields(doc):
    """A raw document as QA fields: first sentence = question, last = answer, the rest = context."""
    sentences = [s.strip() for s in _SENTENCE_END.split(doc["text"]) if s.strip()]
    if len(sentences) < 2:
        words = doc["text"].split()
        half = max(1, len(words) // 2)
        sentences = [" ".join(words[:half]), " ".join(words[half:]) or "."]
    return {"id": doc["id"], "question": sentences[0], "context": " ".join(sentences[1:-1]), "answer": sentences[-1]}


def messages(fields, fmt):
    """System (optional), user and assistant turns of a QA-shaped example."""
    turns = [{"role": "system", "content": fmt.system_prompt}] if fmt.get("system_prompt") else []
    user = fmt.user_template.format(context=fields["context"], question=fields["question"])
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": fields["answer"]}]


def chat_template(tokenizer):
    """The tokenizer's own chat template, or ChatML when it has none."""
    return tokenizer.chat_template or CHATML_TEMPLATE


class Chat:
    """The turns through the tokenizer's chat template (ChatML when it has none); the answer is the assistant
    turn including its end-of-turn token."""

    def render(self, tokenizer, turns):
        template = chat_template(tokenizer)
        prompt = tokenizer.apply_chat_template(
            turns[:-1], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "format: the chat template renders the assistant turn in a way that does not extend "
                "the generation prompt; set format=noformat or give the tokenizer a ChatML template"
            )
        return prompt, full[len(prompt) :].rstrip("\n")  # the template's newline after the turn carries no loss

    def candidate(self, label):
        return label


class Plain:
    """No chat template: "<system>\n\n<user>\nAnswer:" then " <answer><eos>"."""

    def render(self, tokenizer, turns):
        system = f"{turns[0]['content']}\n\n" if turns[0]["role"] == "system" else ""
        return f"{system}{turns[-2]['content']}\nAnswer:", f" {turns[-1]['content']}{tokenizer.eos_token or ''}"

    def candidate(self, label):
        return f" {label}"


def layout(fmt):
    """The format's layout (format.layout, a _target_: Chat, Plain or your own class with the same two methods:
    render(tokenizer, turns) -> (prompt, answer) strings, candidate(label) -> the text continuing the prompt)."""
    # Hydra is imported here, not at module level: lark.kernel reaches IGNORE in this module, and the engine
    # (benchmarks/gpu_check.py) must import on a bare CUDA machine with only torch and transformers.
    from hydra.utils import instantiate

    spec = fmt.get("layout")
    if not spec or "_target_" not in spec:
        raise ConfigError("format.layout: missing; give a _target_ (lark.data.formats.Chat or lark.data.formats.Plain)")
    return instantiate(spec)


def render(tokenizer, fields, fmt):
    """(prompt, answer) strings of a QA-shaped example; the loss falls on the answer."""
    return layout(fmt).render(tokenizer, messages(fields, fmt))


def truncate_middle(ids, budget, keep_tail):
    """Shorten a prompt to `budget` tokens by cutting its middle; the last `keep_tail` tokens (the question and
    the generation prompt) survive."""
    if len(ids) <= budget:
        return ids
    tail = min(keep_tail, budget // 2)
    return ids[: budget - tail] + ids[len(ids) - tail :]


def cut_prompt(tokenizer, fields, fmt, prompt_ids, budget):
    """A QA prompt's ids shortened to `budget` tokens in the middle of its context. What follows the context (the
    question and the generation prompt: the tokens the prompt shares at its end with the same prompt rendered
    without context) survives whole, up to half the budget; at least the last 64 tokens do (a fixed 64 cut into
    questions longer than about 50 tokens)."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    bare = prompt_ids  # no context: the whole prompt is what follows it
    if fields.get("context"):
        bare = tokenizer(render(tokenizer, {**fields, "context": ""}, fmt)[0], add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(bare), len(prompt_ids)) and bare[-1 - shared] == prompt_ids[-1 - shared]:
        shared += 1
    return truncate_middle(prompt_ids, budget, keep_tail=max(64, shared))


def encode_qa(tokenizer, fields, fmt, max_length, answer=None):
    """input_ids and labels (-100 outside the answer) of a QA-shaped example. `answer` replaces the rendered
    answer text (used to score candidate answers)."""
    prompt, rendered = render(tokenizer, fields, fmt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(rendered if answer is None else answer, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[: max_length // 2]
    prompt_ids = cut_prompt(tokenizer, fields, fmt, prompt_ids, max_length - len(answer_ids))
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def encode_text(tokenizer, text, max_length):
    """input_ids and labels of a raw document: loss on every token, truncated to max_length."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:max_length]
    return {"input_ids": ids, "labels": list(ids)}


def encode(tokenizer, example, fmt, max_length):
    """Dispatch on the example's shape (raw text or QA fields)."""
    if "text" in example:
        return encode_text(tokenizer, example["text"], max_length)
    return encode_qa(tokenizer, example, fmt, max_length)


def n_cut(tokenizer, examples, fmt, max_length):
    """How many of `examples` encode() cuts at max_length tokens (a QA prompt in its middle, an answer beyond
    half of max_length, a document's tail)."""
    return sum(len(encode(tokenizer, e, fmt, 2**62)["input_ids"]) > max_length for e in examples)


class Encoder:
    """encode / encode_qa for one tokenizer, format and max_length, memoised by content: each distinct example
    (and candidate answer) is tokenised once per run, however many checkpoints use it. The returned encodings
    are shared; callers must not change them."""

    def __init__(self, tokenizer, fmt, max_length):
        self.tokenizer, self.fmt, self.max_length, self.cache = tokenizer, fmt, max_length, {}

    def __call__(self, example, answer=None):
        key = (json.dumps(example, sort_keys=True, ensure_ascii=False), answer)
        if key not in self.cache:
            self.cache[key] = (
                encode(self.tokenizer, example, self.fmt, self.max_length)
                if answer is None
                else encode_qa(self.tokenizer, example, self.fmt, self.max_length, answer=answer)
            )
        return self.cache[key]


def candidate_answer(fmt, label):
    """The text continuing the prompt when the model answers `label` (its first answer tokens)."""
    return layout(fmt).candidate(label)
