"""Fine-tuning (and the tiny model's pretraining) with one LightningModule; batching of encoded examples."""

import lightning as L
import torch

from lark import faults

# Lightning's historical precision names and what it runs for them (lightning.fabric.connector warns on each)
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
CONVERTS_TO = {"64-true": torch.float64, "16-true": torch.float16, "bf16-true": torch.bfloat16}  # the weights too


def unified_precision(precision):
    """trainer.precision under Lightning's name for it today ("bf16" -> "bf16-mixed", 32 -> "32-true")."""
    return PRECISION_ALIASES.get(str(precision), str(precision))


def weights_dtype(cfg):
    """The dtype the trainer holds the weights in, so the saved checkpoints' dtype: a `-true` half or double
    precision converts the model to it; otherwise (mixed, 32-true) the weights keep model.dtype."""
    default = getattr(torch, cfg.model.get("dtype", "float32"))
    return CONVERTS_TO.get(unified_precision(cfg.trainer.get("precision")), default)


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
