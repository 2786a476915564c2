"""Interruption and resume, bad input, bad configuration: nothing lost, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file

from conftest import REPO, write_synthetic_midi
from test_train import compose_train, small_overrides
from mmm.train import train


class SendSignal(L.Callback):
    """Test helper: the process signals itself when a given training step starts."""

    def __init__(self, at_step: int, signum: int) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def resume_overrides(corpus: Path, root: Path) -> list[str]:
    # 10 steps over 2+ epochs (samples_per_epoch=12, batch 2 -> 6 steps/epoch), so resuming
    # crosses an epoch boundary and starts mid-epoch.
    return small_overrides(corpus, root) + [
        "trainer.max_steps=10", "data.samples_per_epoch=12", "validate_before_training=false",
        "trainer.val_check_interval=6", "logger=none",
    ]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "run" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for seed in range(10):
        write_synthetic_midi(root / f"piece_{seed}.mid", seed, 12)
    return root


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    metrics = train(compose_train(resume_overrides(corpus, root)))
    assert metrics["global_step"] == 10
    return final_weights(root)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(corpus, tmp_path, uninterrupted):
    """SIGTERM (Slurm preemption) mid-epoch: last.ckpt is written after the current step, and
    the resumed run ends with exactly the weights of an uninterrupted run: same step count,
    optimizer state, LR schedule and data order."""
    overrides = resume_overrides(corpus, tmp_path)
    killer = "+callbacks.kill={_target_: test_reliability.SendSignal, at_step: 8, signum: %d}" % signal.SIGTERM
    with pytest.raises(SIGTERMException):
        train(compose_train(overrides + [killer]))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9  # the step in flight when the signal came was finished
    metrics = train(compose_train(overrides + ["ckpt_path=last"]))
    assert metrics["global_step"] == 10
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigkill_resumes_from_the_last_periodic_checkpoint(corpus, tmp_path, uninterrupted):
    """SIGKILL gives no chance to save: the run resumes from the last periodic checkpoint
    (every 3 steps) and still ends with the uninterrupted weights."""
    overrides = resume_overrides(corpus, tmp_path)
    killer = "+callbacks.kill={_target_: test_reliability.SendSignal, at_step: 7, signum: %d}" % signal.SIGKILL
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "mmm.train", *overrides, killer], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    metrics = train(compose_train(overrides + ["ckpt_path=last"]))
    assert metrics["global_step"] == 10
    assert_same_weights(final_weights(tmp_path), uninterrupted)
