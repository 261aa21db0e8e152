"""Test-set evaluation of a checkpoint, chosen with the `eval` config group (a `_target_` built by
hydra.utils.instantiate; add your own evaluator the same way). An evaluator is called with
(model, encoder, items, fields_list), where encoder is the run's lark.data.formats.Encoder (tokenizer, format,
max_length; memoised), items the test QA items and fields_list their QA fields (the gold answer rendered by the
format's answer template), and returns (value, predictions or None). Its attributes name what it measures in
metrics.json and
Table II: `metric` (accuracy | exact_match | answer_loss | ...) and `higher_is_better`.

- Choices: the configured label with the highest summed log-likelihood after the prompt is the model's answer
  (PubMedQA's yes / no / maybe); metric accuracy.
- ExactMatch: greedy generation of at most `max_new_tokens` tokens; a prediction matches when it equals the gold
  answer after lower-casing, collapsing whitespace and dropping surrounding punctuation; metric exact_match.
- AnswerLoss: the mean over test items of the mean cross-entropy of the gold answer tokens (lower is better);
  metric answer_loss. It predicts nothing, so attribution.query_target=predicted needs another evaluator.

Under DDP `evaluate_on_ranks` gives each rank every world-th item and combines the ranks' values weighted by their
counts: an evaluator's value is a mean over items. One whose value is not sets `shardable = False` and runs whole
on every rank.
"""

import re
import string

import torch

from lark.console import progress
from lark.data.datamodule import collate
from lark.data.formats import IGNORE, candidate_answer, cut_prompt, render
from lark.models import eval_mode


class Evaluator:
    metric, higher_is_better, predicts, shardable = "score", True, False, True

    def __call__(self, model, encoder, items, fields_list):
        with eval_mode(model), torch.no_grad():
            return self.evaluate(model, encoder, items, fields_list)

    def warning(self, value, n):
        """A warning when every one of the n test answers scores 0 (exact match on sentence answers: the best
        checkpoint cannot be told apart), else None."""
        if self.higher_is_better and value == 0 and n:
            return (
                f"every one of the {n} test answers scores 0 under eval {self.metric}: no checkpoint is better than "
                "another; for free-form answers use eval=loss (or a shorter answer_template)"
            )
        return None

    def describe(self, value):
        """The `eval` entry of metrics.json."""
        return {"metric": self.metric, "value": value, "higher_is_better": self.higher_is_better}

    def evaluate(self, model, encoder, items, fields_list):
        raise NotImplementedError


def evaluate_on_ranks(evaluator, model, encoder, items, fields_list, rank=0, world=1, gather_objects=None):
    """(value, predictions or None) of `evaluator` on the items; with world > 1 and gather_objects (an all-gather
    of Python objects across the ranks) each rank evaluates items[rank::world] and all get the combined result."""
    if world == 1 or gather_objects is None or not evaluator.shardable:
        return evaluator(model, encoder, items, fields_list)
    share = slice(rank, None, world)
    value, predicted = evaluator(model, encoder, items[share], fields_list[share])
    shares = gather_objects((value, len(items[share]), predicted))
    counted = [(v, n) for v, n, _ in shares if v is not None and n]
    value = sum(v * n for v, n in counted) / sum(n for _, n in counted) if counted else None
    if any(p is None for _, n, p in shares if n):
        return value, None
    predicted = [None] * len(items)
    for r, (_, _, part) in enumerate(shares):
        predicted[r::world] = part or []
    return value, predicted


def answer_log_likelihoods(model, pad_id, encoded, batch_size=16):
    """([n] summed log-probabilities of the labelled tokens, [n] their count) of encoded examples, `batch_size`
    at a time (eval.batch_size: a batch's logits are batch x length x vocabulary floats)."""
    device = next(model.parameters()).device
    sums, counts = [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]  # a DDP rank may get no questions
    for start in progress(range(0, len(encoded), batch_size), "evaluation", unit="batch"):
        batch = collate(encoded[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.append((picked * (target != IGNORE)).sum(-1).cpu())
        counts.append((target != IGNORE).sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


class Choices(Evaluator):
    """Likelihood argmax over a fixed label set."""

    metric, predicts = "accuracy", True

    def __init__(self, labels, batch_size=16):
        self.labels, self.batch_size = list(labels), batch_size

    def evaluate(self, model, encoder, items, fields_list):
        tokenizer = encoder.tokenizer
        encoded = [
            encoder(f, answer=candidate_answer(encoder.fmt, label)) for f in fields_list for label in self.labels
        ]
        scores = answer_log_likelihoods(model, tokenizer.pad_token_id, encoded, self.batch_size)[0]
        scores = scores.view(len(fields_list), len(self.labels))
        predicted = [self.labels[i] for i in scores.argmax(-1).tolist()]
        correct = sum(p == item["answer"] for p, item in zip(predicted, items))
        return correct / max(1, len(items)), predicted


def answer_losses(model, pad_id, encoded, batch_size=16):
    """[n] mean cross-entropy (nats per token) of each encoded example's loss tokens, in eval mode (no dropout: the
    same losses on every call, and no draw from the RNG that a resumed run would not replay); the LDS retrains'
    query losses too (lark.validation.lds)."""
    with eval_mode(model), torch.no_grad():
        sums, counts = answer_log_likelihoods(model, pad_id, encoded, batch_size)
    return -sums / counts.clamp(min=1)


def gold_answer_losses(model, encoder, fields_list, batch_size=16):
    """[n] answer_losses of each item's gold answer tokens after its prompt."""
    return answer_losses(model, encoder.tokenizer.pad_token_id, [encoder(f) for f in fields_list], batch_size)


class AnswerLoss(Evaluator):
    """Mean answer cross-entropy (nats per token, averaged over items)."""

    metric, higher_is_better = "answer_loss", False

    def __init__(self, batch_size=16):
        self.batch_size = batch_size

    def evaluate(self, model, encoder, items, fields_list):
        per_item = gold_answer_losses(model, encoder, fields_list, self.batch_size)
        return (per_item.mean().item() if len(per_item) else None), None


class Skip(Evaluator):
    """No evaluation (eval=none): the checkpoints get no test metric. The mini-LDS retrains use it (they need
    only their final model's losses, lark.validation.lds); it takes, and ignores, the keys of an evaluator it
    replaces."""

    metric = "none"

    def __init__(self, **_):
        pass

    def evaluate(self, model, encoder, items, fields_list):
        return None, None


def normalize(text):
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


class ExactMatch(Evaluator):
    """Greedy generation compared with the gold answer (normalised)."""

    metric, predicts = "exact_match", True

    def __init__(self, max_new_tokens=32, batch_size=16):
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size  # batch_size: predictions' losses

    def evaluate(self, model, encoder, items, fields_list):
        device, tokenizer = next(model.parameters()).device, encoder.tokenizer
        stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        predicted = []
        for fields in fields_list:
            prompt = tokenizer(render(tokenizer, fields, encoder.fmt)[0], add_special_tokens=False)["input_ids"]
            ids = cut_prompt(tokenizer, fields, encoder.fmt, prompt, max(1, encoder.max_length - self.max_new_tokens))
            out = []
            for _ in range(self.max_new_tokens):  # greedy decoding without a KV cache (use_cache is off)
                logits = model(input_ids=torch.tensor([ids + out], device=device)).logits[0, -1]
                token = int(logits.argmax())
                if token in stop:
                    break
                out.append(token)
            predicted.append(re.sub(r"\s+", " ", tokenizer.decode(out, skip_special_tokens=True)).strip())
        correct = sum(normalize(p) == normalize(f["answer"]) for p, f in zip(predicted, fields_list))
        return correct / max(1, len(fields_list)), predicted
