"""Lightning's DeepSpeedStrategy, also runnable on CPU processes (a verification path).

`trainer=deepspeed` (CUDA GPUs) and `trainer=deepspeed_cpu` use this one class and differ only
in the accelerator. On GPUs it is exactly Lightning's `DeepSpeedStrategy`. On CPU it runs the
real DeepSpeed engine (ZeRO-2 by default, stage 3 as `trainer.strategy.stage=3`) over gloo, so
that multi-process DeepSpeed training, checkpointing, resume and export are executed and tested
on any machine. It is slow: it verifies the path, it is not a way to train.

Lightning 2.6 assumes CUDA in exactly three places; on CPU each is lifted below. On any
accelerator, saving and resuming are made as safe as the other checkpoints' (docs/reliability.rst):
a save goes to a temporary folder swapped into place once every rank has written, a full disk
is a `DiskFull` that leaves the previous checkpoint loadable, and resuming scans DeepSpeed's
state files before DeepSpeed unpickles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from mmm.files.atomic import atomic_write_folder, space_errno, space_error
from mmm.model.pretrained import check_deepspeed_states

# DeepSpeed picks its accelerator once, at its first use; without CUDA it must be told "cpu"
# (its auto-detection may pick another backend). Set before deepspeed is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402


class _SpaceAwareCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default writer of state files, with two changes. It writes through a Python
    file: `torch.save` to a path writes with a C++ stream whose failure loses the OS error, so a
    full disk could not be told apart. And a write that fails for lack of space is noted, not
    raised: this rank goes on through the save's collectives in step with the others (raising
    here would leave them waiting in DeepSpeed's barrier), and `MMMDeepSpeedStrategy` raises it
    on every rank once the save is over."""

    def __init__(self, zipfile_serialization: bool) -> None:
        super().__init__()
        self.zipfile_serialization = zipfile_serialization
        self.space_error: int | None = None  # the errno of this save's first space error

    def save(self, state_dict: Any, path: str) -> None:
        if self.space_error is not None:  # this save is lost already: write nothing more
            return
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
        except Exception as e:
            if not (code := space_errno(e)):
                raise
            self.space_error = code


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

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        engine = self.deepspeed_engine
        if type(engine.checkpoint_engine) is TorchCheckpointEngine:  # not a configured fast/decoupled writer
            engine.checkpoint_engine = _SpaceAwareCheckpointEngine(engine.checkpoint_engine.zipfile_serialization)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed writes its checkpoint folder (`latest`, a tag folder with a state file per
        rank) in place: a save failing half-way would leave neither the previous checkpoint nor
        the new one. Every rank writes into one temporary folder beside the target instead, and
        once all have written, rank 0 swaps it in (`mmm.files.atomic.atomic_write_folder`); a full disk
        raises `DiskFull` on every rank and leaves the previous folder as it was."""
        target = Path(self.broadcast(str(filepath)))
        if self.is_global_zero:
            atomic_write_folder(target, lambda tmp: self._save_into(checkpoint, tmp, target, storage_options))
        else:
            self._save_into(checkpoint, None, target, storage_options)
        self.barrier()  # the other ranks go on (and may read it) once the new folder is in place

    def _save_into(self, checkpoint: dict, tmp: Path | None, target: Path, storage_options: Any | None) -> None:
        tmp = self.broadcast(tmp)  # rank 0's temporary folder (its name holds rank 0's pid)
        super().save_checkpoint(checkpoint, tmp, storage_options)  # ends with DeepSpeed's barrier
        writer = self.deepspeed_engine.checkpoint_engine
        own = getattr(writer, "space_error", None)
        if own is not None:
            writer.space_error = None  # the next save starts afresh
        codes = [None] * self.world_size
        torch.distributed.all_gather_object(codes, own)
        if code := next((c for c in codes if c is not None), None):
            raise space_error(target, code)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed resumes with `torch.load(weights_only=False)`, which runs whatever code a
        state file names: unless trusted (`trust_checkpoint=true` passes weights_only=False), the
        state files of the tag that DeepSpeed will load are scanned first, without unpickling
        them, and one holding more than data is refused (`mmm.model.pretrained.UnsafeCheckpoint`). A
        single file (ZeRO-3 `load_full_weights`) goes through `MMMCheckpointIO`, safe already."""
        latest = Path(checkpoint_path) / "latest"
        if weights_only is not False and latest.is_file():
            check_deepspeed_states(latest.parent / latest.read_text().strip())
        return super().load_checkpoint(checkpoint_path, weights_only)
