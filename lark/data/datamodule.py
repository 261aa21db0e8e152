"""The fine-tuning data as a LightningDataModule: it owns the tokenisation (one memoised lark.data.formats.Encoder per
run, shared with evaluation and attribution, so that each example is tokenised once, not at every checkpoint)
and the shuffled fine-tuning loader (its generator is saved for resume by lark.resume.ShuffleState)."""

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lark.data.formats import IGNORE, Encoder, qa_fields


class LarkDataModule(L.LightningDataModule):
    def __init__(self, tokenizer, fmt, max_length, train_items, batch_size, seed, num_workers=0):
        super().__init__()
        self.encoder = Encoder(tokenizer, fmt, max_length)
        self.train_encoded = [self.encoder(qa_fields(item, fmt.answer_template)) for item in train_items]
        self.loader = make_loader(self.train_encoded, batch_size, tokenizer.pad_token_id, True, seed, num_workers)
        self.generator = self.loader.generator

    def train_dataloader(self):
        return self.loader


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
    return DataLoader(
        encoded,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=partial(collate, pad_id=pad_id),  # picklable: workers started by spawn (macOS, Windows) get it
    )
