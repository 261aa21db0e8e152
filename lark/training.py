"""Fine-tuning (and the tiny model's pretraining) with one LightningModule; batching of encoded examples."""

import lightning as L

from lark import faults


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
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(batch["input_ids"]),
        )
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
