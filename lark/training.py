"""Fine-tuning (and the tiny model's pretraining) with one LightningModule, and answer accuracy."""
import lightning as L
import torch
from torch.utils.data import DataLoader

from lark import faults
from lark.console import progress
from lark.data import LABELS
from lark.formats import IGNORE, candidate_answer, encode_qa


class CausalLMModule(L.LightningModule):
    """Full-parameter training of a causal LM on batches of {input_ids, attention_mask, labels}.

    `optimizer` and `scheduler` are factories (Hydra `_partial_`): optimizer(params), scheduler(optimizer).
    `stage` names the kill point of each step (lark.faults): train_step, pretrain_step.
    """

    def __init__(self, model, optimizer, scheduler=None, scheduler_interval="epoch", stage="train"):
        super().__init__()
        self.model, self.stage = model, stage
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval

    def training_step(self, batch, batch_idx):
        faults.point(f"{self.stage}_step")
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}


def collate(examples, pad_id):
    """Right-pad encoded examples into a batch; padding carries no loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_loader(encoded, batch_size, pad_id, shuffle, seed, num_workers=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(encoded, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      collate_fn=lambda b: collate(b, pad_id))


@torch.no_grad()
def answer_log_likelihoods(model, tokenizer, fields_list, fmt, max_length, batch_size=16):
    """[n, 3] summed log-probabilities of the answers yes / no / maybe after each QA prompt."""
    device = next(model.parameters()).device
    encoded = [encode_qa(tokenizer, f, fmt, max_length, answer=candidate_answer(tokenizer, fmt, label))
               for f in fields_list for label in LABELS]
    scores = []
    for start in progress(range(0, len(encoded), batch_size), "accuracy", unit="batch"):
        batch = collate(encoded[start:start + batch_size], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["labels"][:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * (target != IGNORE)).sum(-1).cpu())
    return torch.cat(scores).view(len(fields_list), len(LABELS))


def answer_accuracy(model, tokenizer, items, fields_list, fmt, max_length, with_scores=False):
    """(accuracy, predicted labels): the answer with the highest likelihood is the model's answer.
    with_scores: also the [n, 3] log-likelihoods of yes / no / maybe (answer_log_likelihoods)."""
    was_training = model.training
    model.eval()
    scores = answer_log_likelihoods(model, tokenizer, fields_list, fmt, max_length)
    model.train(was_training)
    predicted = [LABELS[i] for i in scores.argmax(-1).tolist()]
    correct = sum(p == item["final_decision"] for p, item in zip(predicted, items))
    return (correct / max(1, len(items)), predicted) + ((scores,) if with_scores else ())
