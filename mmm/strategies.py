"""Lightning's DeepSpeedStrategy, also runnable on CPU processes (a verification path).

`trainer=deepspeed` (CUDA GPUs) and `trainer=deepspeed_cpu` use this one class and differ only
in the accelerator. On GPUs it is exactly Lightning's `DeepSpeedStrategy`. On CPU it runs the
real DeepSpeed engine (ZeRO-2 by default, stage 3 as `trainer.strategy.stage=3`) over gloo, so
that multi-process DeepSpeed training, checkpointing, resume and export are executed and tested
on any machine. It is slow: it verifies the path, it is not a way to train.

Lightning 2.6 assumes CUDA in exactly three places; on CPU each is lifted below, nothing else.
"""

from __future__ import annotations

import os

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

# DeepSpeed picks its accelerator once, at its first use; without CUDA it must be told "cpu"
# (its auto-detection may pick another backend). Set before deepspeed is imported by Lightning.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class MMMDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` that also accepts `accelerator=cpu` (with the gloo backend)."""

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        # 1. Lightning refuses any accelerator but CUDA here, although DeepSpeed itself runs on
        # CPU (DS_ACCELERATOR=cpu, gloo). Skip only that check, keep DDPStrategy's set-up.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        # 2. The parent checks that device indices equal local ranks (a CUDA_VISIBLE_DEVICES
        # misuse check); CPU devices have no index, so that check cannot pass. The rest is the
        # parent's body.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if not self._on_cpu:
            return super().root_device
        # 3. DeepSpeed reads `root_device.index` as its device rank (`args.device_rank`); a bare
        # torch.device("cpu") has index None. A CPU device carrying the local rank works.
        return torch.device("cpu", self.local_rank)
