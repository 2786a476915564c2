"""LightningModule: next-token training of `MMMTransformer` with AdamW and warmup + cosine."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR

from mmm.config import at_least, check_section, within
from mmm.data.sequences import IGNORE_INDEX
from mmm.model import MMMTransformer, ModelConfig, next_token_nll


@dataclass(frozen=True)
class OptimConfig:
    """The `optim` section (configs/optim/adamw.yaml)."""

    optimizer: dict  # a Hydra partial of a torch optimizer, given the parameter groups
    weight_decay: float = field(metadata=at_least(0))  # on matrices only
    warmup_steps: int = field(metadata=at_least(0))
    min_lr_ratio: float = field(metadata=within(0, 1))

    def check(self) -> None:
        lr = self.optimizer.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"optimizer.lr={lr!r}: expected a number >= 0")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MMMLitModule(L.LightningModule):
    """Holds the model config (saved in every .ckpt) and the optimisation settings."""

    def __init__(
        self,
        model_config: Mapping[str, Any],
        optim: Mapping[str, Any],
        tokenizer_json: str | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_section("optim", optim, OptimConfig)  # kept as a plain mapping in the checkpoint's hparams
        # The tokenizer travels inside every .ckpt so a checkpoint alone can be sampled from.
        # `compile` is how this run computes, not what it learns: kept out of the checkpoint.
        self.save_hyperparameters(ignore=["compile"])
        self.config = ModelConfig.from_dict(dict(model_config))
        self.model = MMMTransformer(self.config)
        # torch.compile of the loss (forward included; backward through AOTAutograd). Compiling
        # the function rather than the module keeps parameter names, hence checkpoints, as they are.
        # Every batch has its own length (its samples in one packed row, or padded to the longest):
        # dynamic shapes compile once for all lengths instead of once per length.
        self._loss_fn = torch.compile(next_token_nll, dynamic=True) if compile else next_token_nll
        self._val_sums: list[torch.Tensor] = []  # per batch: (nll, tokens, notes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def _nll(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL of the batch and its number of targets (evaluation scores the same way)."""
        nll = self._loss_fn(
            self.model,
            batch["input_ids"],
            batch["labels"],
            IGNORE_INDEX,
            reduction="sum",
            doc_ids=batch.get("doc_ids"),
            times=batch.get("times"),
            flags=batch.get("flags"),
        )
        return nll, (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, count = self._nll(batch)
        loss = nll / count.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["index"]))
        self.log("train/tokens", count.float(), reduce_fx="sum", batch_size=1)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        nll, count = self._nll(batch)
        self._val_sums.append(torch.stack([nll.float(), count.float(), batch["num_notes"].sum().float()]))

    def on_validation_epoch_end(self) -> None:
        # Sums over all batches and ranks, then ratios: exact, unlike a mean of batch means.
        local = torch.stack(self._val_sums).sum(0) if self._val_sums else torch.zeros(3, device=self.device)
        nll, tokens, notes = self.trainer.strategy.reduce(local, reduce_op="sum")
        self._val_sums.clear()
        self.log("val/loss", nll / tokens.clamp(min=1), prog_bar=True)
        # Per note (nats/note) is comparable across tokenizations, unlike per token.
        self.log("val/loss_per_note", nll / notes.clamp(min=1))

    def configure_optimizers(self) -> dict[str, Any]:
        optim = check_section("optim", self.hparams.optim, OptimConfig)
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # Norm gains and embeddings are not shrunk towards zero (standard GPT practice).
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = instantiate(optim.optimizer)(groups)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, optim.warmup_steps, total, optim.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
