"""The fine-tuning data as a LightningDataModule: it owns the tokenisation (one memoised lark.formats.Encoder per
run, shared with evaluation and attribution, so that each example is tokenised once, not at every checkpoint)
and the shuffled fine-tuning loader (its generator is saved for resume by lark.resume.ShuffleState)."""
import lightning as L

from lark.formats import Encoder, qa_fields
from lark.training import make_loader


class LarkDataModule(L.LightningDataModule):
    def __init__(self, tokenizer, fmt, max_length, train_items, batch_size, seed, num_workers=0):
        super().__init__()
        self.encoder = Encoder(tokenizer, fmt, max_length)
        self.train_encoded = [self.encoder(qa_fields(item, fmt.answer_template)) for item in train_items]
        self.loader = make_loader(self.train_encoded, batch_size, tokenizer.pad_token_id, True, seed, num_workers)
        self.generator = self.loader.generator

    def train_dataloader(self):
        return self.loader
