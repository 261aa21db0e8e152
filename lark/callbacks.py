"""The epoch-end attribution callback: at epoch 0 (before any step) and after every epoch it evaluates the
checkpoint (lark.checkpoint: save, accuracy, attribution) and logs metrics, a top-k table and accuracy."""

from pathlib import Path

import lightning as L
import torch

from lark.checkpoint import Checkpoint, evaluate_checkpoint
from lark.data.sources import example_text
from lark.kernel.optimizer import checkpoint_moments
from lark.kernel.tokens import top_pieces
from lark.loggers import log_metrics, log_table


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] on every rank: torch.distributed's object all-gather in Lightning's group."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


class AttributionCallback(L.Callback):
    def __init__(self, cfg, tokenizer, test_items, sets, run_dir, log=print, encoder=None):
        self.cfg, self.tokenizer, self.test_items, self.sets, self.encoder = cfg, tokenizer, test_items, sets, encoder
        self.run_dir, self.report = run_dir, log  # not self.log: Lightning assigns callback.log
        self.epoch_lr = None

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:  # not when resuming from a later epoch's state
            self.checkpoint(trainer, pl_module, epoch=0, lr=None)

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer, pl_module):
        self.checkpoint(trainer, pl_module, epoch=trainer.current_epoch + 1, lr=self.epoch_lr)

    def checkpoint(self, trainer, pl_module, epoch, lr):
        gather = (lambda t: pl_module.all_gather(t)) if trainer.world_size > 1 else None
        gather_objects = all_gather_objects if trainer.world_size > 1 else None
        moments = checkpoint_moments(
            self.cfg.attribution,
            pl_module.model,
            epoch,
            trainer.optimizers[0],
            trainer.train_dataloader,
            self.cfg.get("gradient_clip_val"),
        )
        ck = Checkpoint(
            self.cfg,
            pl_module.model,
            self.tokenizer,
            self.run_dir,
            epoch,
            lr=lr,
            moments=moments,
            encoder=self.encoder,
            rank=trainer.global_rank,
            world=trainer.world_size,
            gather=gather,
            gather_objects=gather_objects,
            reuse=bool(self.cfg.get("resume")),
            log=self.report,
        )
        logged, rows = evaluate_checkpoint(ck, self.test_items, self.sets)
        if trainer.global_rank == 0:
            log_metrics(trainer, logged, step=trainer.global_step)
            if rows:
                self.log_tables(trainer, ck.name, logged, rows)

    def log_tables(self, trainer, name, logged, rows):
        """The loggers' tables of an attributed epoch: each source's metrics, each query's top documents."""
        sources = [(s, logged.get(f"influence/mean_max/{s}"), logged.get(f"influence/ft_wins/{s}")) for s in self.sets]
        log_table(trainer, f"influence/{name}/sources", ["source", "mean_max", "ft_wins"], sources)
        n = self.cfg.analysis.report_snippet_chars  # documents' text, not only ids (as in the report)
        texts = {(s, e["id"]): example_text(e)[:n] for s, examples in self.sets.items() for e in examples}
        questions = {item["id"]: item["question"][:n] for item in self.test_items}  # a 20,000-word prompt: no flood
        pieces = top_pieces(Path(self.run_dir) / "attribution" / name / "tokens")  # attribution.tokens=topk, else {}
        log_table(
            trainer,
            f"influence/{name}/top_k",
            ["query_id", "question", "source", "rank", "doc_id", "score", "text", "top_tokens"],
            [(q, questions.get(q), s, r, d, v, texts.get((s, d)), pieces.get((q, s, d))) for q, s, r, d, v in rows],
        )
