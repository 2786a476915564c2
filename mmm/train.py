"""`python -m mmm.train +experiment=demo`: train MMM, then write a `from_pretrained` folder.

Missing inputs are built first (token store by `mmm.preprocess`, BPE by
`mmm.train_tokenizer`), so one command runs the whole pipeline on a fresh clone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mmm.config import at_least, check_section, check_value, plain
from mmm.data.datamodule import DataConfig, MIDIDataModule
from mmm.data.prepare import prepare_data
from mmm.data.stats import generation_stats
from mmm.data.store import Store
from mmm.files.atomic import recover_folders
from mmm.files.locks import acquire_lock
from mmm.model import PRESETS, model_config_from_preset
from mmm.model.pretrained import load_pretrained, save_pretrained
from mmm.tokenizer import Vocab, check_tokenizer_cfg, check_tokenizer_file, load_tokenizer
from mmm.training.checkpoint_io import MMMCheckpointIO
from mmm.training.module import MMMLitModule, OptimConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSection:
    """The `model` section (configs/model/*.yaml): a preset, its context and overrides of it."""

    preset: str
    max_seq_len: int = field(metadata=at_least(16))
    overrides: dict  # ModelConfig fields, e.g. num_layers

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on settings that cannot run, naming the key and the fix."""
    data = check_section("data", cfg.data, DataConfig)
    model = check_section("model", cfg.model, ModelSection)
    check_section("optim", cfg.optim, OptimConfig)
    check_value("seed", cfg.seed, int, at_least(0))
    check_value("compile", cfg.compile, bool, {})
    check_value("license", cfg.get("license"), str | None, {})
    for key in ("trainer.max_steps", "trainer.val_check_interval"):
        check_value(key, OmegaConf.select(cfg, key), int, at_least(1))
    tokenizer = check_tokenizer_cfg(cfg.tokenizer)
    if Path(tokenizer.path).is_file():
        check_tokenizer_file(tokenizer.path, tokenizer.vocab_size)
    if data.max_seq_len > model.max_seq_len:
        raise ValueError(
            f"data.max_seq_len={data.max_seq_len} exceeds the model context model.max_seq_len="
            f"{model.max_seq_len}: lower data.max_seq_len or raise model.max_seq_len"
        )
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    uses_deepspeed = "DeepSpeed" in str(strategy.get("_target_", "") if isinstance(strategy, Mapping) else strategy)
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    if uses_deepspeed and accelerator != "cpu" and not torch.cuda.is_available():
        raise ValueError(
            "trainer=deepspeed needs CUDA GPUs and none is visible: use trainer=cpu, or run on a GPU node "
            "(trainer=deepspeed_cpu runs the same DeepSpeed path on CPU processes, to verify it)"
        )
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator=gpu but no CUDA GPU is visible: use trainer=cpu")


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path=last`: the newest of checkpoints/last.ckpt, its versions last-v<N>.ckpt and
    the hpc_ckpt_*.ckpt that Lightning writes when Slurm signals a requeue; None (a fresh start)
    when there is none. (ModelCheckpoint writes last-v1.ckpt beside a last.ckpt it did not write
    itself, e.g. one saved on an interrupt before its first save: last.ckpt then stays old.)
    A checkpoint folder (DeepSpeed) whose save was killed between the two renames of its swap
    is put in place first (`mmm.files.atomic.recover_folders`): it would look absent."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    run_dir = Path(cfg.run_dir)
    for folder in (run_dir / "checkpoints", run_dir):
        recover_folders(folder)
    candidates = [
        p
        for p in [
            run_dir / "checkpoints" / "last.ckpt",
            *(run_dir / "checkpoints").glob("last-v*.ckpt"),
            *run_dir.glob("hpc_ckpt_*.ckpt"),
        ]
        if p.is_file() or (p / "latest").is_file()
    ]
    return str(max(candidates, key=_saved_at)) if candidates else None


def _saved_at(checkpoint: Path) -> int:
    # DeepSpeed checkpoints are directories rewritten in place, whose own mtime stays that of
    # their creation; the `latest` file in them is rewritten by every save (and written last:
    # a directory without it is an incomplete save, never a candidate).
    return (checkpoint / "latest" if checkpoint.is_dir() else checkpoint).stat().st_mtime_ns


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the final metrics (and writes `export_dir`).

    Holds `run_dir/train.lock` throughout: a second run on the same folder fails at once
    naming this one; the ranks of this job share the lock (`mmm.files.locks`)."""
    check_config(cfg)
    with acquire_lock(cfg.run_dir, "train", shared_by_job=True):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    # The jobs of a sweep and the ranks of this job share the data folder: the first builds
    # the store and tokenizer, the others wait for it, then find them done.
    tokenizer_path = prepare_data(cfg.data, cfg.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab = Vocab(tokenizer)
    model_config = model_config_from_preset(
        cfg.model.preset, vocab_size=vocab.size, max_seq_len=cfg.model.max_seq_len, **plain(cfg.model.overrides)
    )
    datamodule = MIDIDataModule.from_config(
        check_section("data", cfg.data, DataConfig),
        str(tokenizer_path),
        cfg.seed,
        fill_program=model_config.fill_program,
        target_last=model_config.target_last,
        timing=model_config.timing,
    )
    module = MMMLitModule(
        model_config.to_dict(), optim=plain(cfg.optim), tokenizer_json=tokenizer_path.read_text(), compile=cfg.compile
    )
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.get("logger", {}).values() if c is not None]
    if not loggers:  # logger=none: the LR monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user-configured plugin
        trainer.strategy.checkpoint_io = MMMCheckpointIO()  # atomic writes, safe loads
    log.info(
        "model: %s parameters, vocab %d, context %d",
        f"{module.model.num_parameters():,}",
        vocab.size,
        model_config.max_seq_len,
    )

    metrics: dict[str, Any] = {}
    resume = resume_path(cfg)
    if cfg.validate_before_training and resume is None:
        initial = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({f"initial_{k.replace('/', '_')}": v for k, v in initial[0].items()})
    # weights_only=False is MMMCheckpointIO's opt-in for a trusted checkpoint holding more than data.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=False if cfg.trust_checkpoint else None)
    metrics.update({k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items()})
    metrics["global_step"] = trainer.global_step
    # The run ends with last.ckpt at its final step (every rank takes part: DeepSpeed writes a
    # shard per rank), so re-running the command finds the run done and `python -m
    # mmm.checkpoint` can export that step.
    final = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(final)
    export_model = module.model
    if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.is_global_zero:
        # The engine's module holds bf16 weights (at ZeRO-3 only a shard of them): the export is
        # the fp32 master weights, consolidated from that checkpoint.
        export_model, _ = load_pretrained(final)
    if trainer.is_global_zero:
        generation = generation_stats(Store(cfg.data.store, "train"), vocab, cfg.data.sequences.pitch_shift)
        # The weights' terms travel with them: the server's /v1/info and the card read them here.
        terms = {"license": cfg.license} if cfg.get("license") else {}
        save_pretrained(
            export_model,
            tokenizer,
            cfg.export_dir,
            extra={"training": {"experiment": cfg.experiment_name, **metrics}, "generation": generation, **terms},
        )
        metrics["export_dir"] = str(cfg.export_dir)
        log.info("checkpoint folder: %s", cfg.export_dir)
    return metrics


def main() -> None:
    import hydra

    @hydra.main(config_path="../configs", config_name="train", version_base="1.3")
    def _run(cfg: DictConfig) -> float | None:
        if rank_zero_only.rank != 0:  # only rank 0 writes the run's log file; the others log to the console
            root = logging.getLogger()
            for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(handler)
                handler.close()
        metrics = train(cfg)
        print({k: v for k, v in metrics.items()})
        return metrics.get("val_loss")  # the value a Hydra sweeper optimises

    _run()


if __name__ == "__main__":
    main()
