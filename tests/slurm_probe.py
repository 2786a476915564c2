"""Callbacks that tests/test_slurm.py adds by name (`+callbacks.<name>={_target_: slurm_probe.<Class>, ...}`,
with PYTHONPATH=tests) to training runs it submits to the local Slurm cluster. They live outside
the test module so that a run imports no test module."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

SLURM_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_RESTART_COUNT",
)


class RecordCluster(L.Callback):
    """When training starts, each rank appends to `<path>.rank<r>` one JSON line: what Lightning
    made of the job (cluster environment, world size, ranks, strategy) and the Slurm variables
    the process was started with."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer._accelerator_connector.cluster_environment  # what the signal handlers consult too
        record = {
            "cluster_environment": type(env).__name__,
            "auto_requeue": getattr(env, "auto_requeue", None),
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "global_step": trainer.global_step,
            "pid": os.getpid(),
            "env": {k: os.environ.get(k) for k in SLURM_VARIABLES},
        }
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(record) + "\n")


class HoldUntilSignalled(L.Callback):
    """In the first run of a Slurm job only (SLURM_RESTART_COUNT unset or 0), stop after training
    step `step` and wait (at most `timeout` s) until the job is told to stop: the requeue's
    SIGTERM, after Lightning handled the time-limit signal. `<marker>` is written when the wait
    starts, so a test knows when to shorten the job's time limit. Waiting changes no result; a
    requeued run trains straight through."""

    def __init__(self, step: int, marker: str, timeout: float = 300.0) -> None:
        self.step, self.marker, self.timeout = step, marker, timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
            return
        Path(self.marker).write_text(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "step": self.step}))
        deadline = time.monotonic() + self.timeout
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.2)
