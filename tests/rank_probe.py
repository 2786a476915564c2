"""Callbacks that tests add by name to training runs: tests/test_distributed.py to
multi-process `python -m mmm.train` runs, tests/test_reliability.py to runs in process and as a
command (with PYTHONPATH=tests and `+callbacks.<name>._target_=rank_probe.<Class>`). They live
here, not in a test module, so that a run imports no test module."""

from __future__ import annotations

import builtins
import json
import os
import signal

import lightning as L


class RecordSteps(L.Callback):
    """Append one JSON line per training step to `<path>.rank<r>`: the global step after it,
    the sample indices of the batch and the loss this rank computed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # A checksum of this rank's copy of the weights: every rank must hold the same ones.
        weights = sum(float(p.detach().double().sum()) for p in pl_module.model.parameters())
        record = {
            "step": trainer.global_step,
            "index": batch["index"].tolist(),
            "loss": float(outputs["loss"]),
            "weights": weights,
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(record) + "\n")


class KillJobAt(L.Callback):
    """SIGKILL every process of the job (its process group) before the step after `step`,
    from rank 0: what a node failure does. Nothing gets a chance to save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class SendSignal(L.Callback):
    """The process sends itself `signum` when training step `at_step` starts (SIGTERM: a
    Slurm preemption; SIGKILL: no chance to save)."""

    def __init__(self, at_step: int, signum: int) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class WriteSpy(L.Callback):
    """On ranks > 0, from its creation (before the Trainer, loggers and checkpoints exist),
    note every file or folder created, opened for writing or renamed under the run folder,
    in `$MMM_SPY_DIR/rank<r>.writes`; `rank<r>.armed` says the spy was installed."""

    def __init__(self) -> None:
        from hydra.core.hydra_config import HydraConfig
        from lightning.pytorch.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            return
        run_dir = os.path.realpath(HydraConfig.get().runtime.output_dir)
        spy_dir = os.environ["MMM_SPY_DIR"]
        real_open, real_mkdir, real_replace, real_rename = builtins.open, os.mkdir, os.replace, os.rename
        real_makedirs = os.makedirs
        real_makedirs(spy_dir, exist_ok=True)
        report = os.path.join(spy_dir, f"rank{rank_zero_only.rank}.writes")

        def note(kind, path):
            if isinstance(path, (str, os.PathLike)) and os.path.realpath(os.fspath(path)).startswith(run_dir + os.sep):
                with real_open(report, "a") as f:
                    f.write(f"{kind} {os.fspath(path)}\n")

        def spy_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                note("open", file)
            return real_open(file, mode, *args, **kwargs)

        def spy_mkdir(path, *args, **kwargs):
            note("mkdir", path)
            return real_mkdir(path, *args, **kwargs)

        def spy_replace(src, dst, *args, **kwargs):
            note("replace", dst)
            return real_replace(src, dst, *args, **kwargs)

        def spy_rename(src, dst, *args, **kwargs):
            note("rename", dst)
            return real_rename(src, dst, *args, **kwargs)

        builtins.open, os.mkdir, os.replace, os.rename = spy_open, spy_mkdir, spy_replace, spy_rename
        with real_open(os.path.join(spy_dir, f"rank{rank_zero_only.rank}.armed"), "w") as f:
            f.write(run_dir)
