"""Lightning callbacks of mmm."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(L.Callback):
    """Save `last.ckpt` when training is stopped by SIGTERM (what Slurm sends before
    preemption or at the time limit) or Ctrl-C. Lightning stops after the current batch, so the
    checkpoint holds a whole step: resuming with `ckpt_path=last` continues from it."""

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            log.warning("interrupted at step %d: checkpoint saved to %s", trainer.global_step, self.path)
