"""`mmm.train`: the real configs composed and shrunk, end-to-end CPU training, resume,
experiment configs, DeepSpeed config, and a real multirun sweep with submitit's local launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO, compose_config, small_overrides
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import OmegaConf

from mmm.data.sequences import IGNORE_INDEX
from mmm.model.masks import packed_positions
from mmm.model.pretrained import FORMAT_VERSION, load_pretrained
from mmm.train import check_config, train

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = compose_config("train", small_overrides(corpus, root))
    return root, cfg, train(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config(
        "train", [f"+experiment={experiment}", f"run_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"]
    )
    assert cfg.experiment_name == experiment
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    assert callbacks
    strategy = cfg.trainer.get("strategy")
    if strategy is not None and "DeepSpeed" in strategy._target_:
        ds = instantiate(strategy)
        assert isinstance(ds, DeepSpeedStrategy)
        assert ds.config["zero_optimization"]["stage"] == 2
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match="deepspeed needs CUDA"):
                check_config(cfg)
    else:
        check_config(cfg)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)
        assert trainer.max_steps == cfg.trainer.max_steps


def test_gigamidi_is_the_published_setup(tmp_path):
    cfg = compose_config("train", ["+experiment=gigamidi", f"run_dir={tmp_path}"])
    assert cfg.model.preset == "base" and cfg.tokenizer.vocab_size == 16000
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.source.name == "gigamidi"


@pytest.mark.slow
def test_bad_configs_fail_before_work(corpus, tmp_path):
    base = small_overrides(corpus, tmp_path)
    with pytest.raises(ValueError, match="exceeds the model context"):
        check_config(compose_config("train", base + ["model.max_seq_len=128"]))
    with pytest.raises(ValueError, match="model.preset"):
        check_config(compose_config("train", base + ["model.preset=huge"]))
    with pytest.raises(ValueError, match="tokenizer.vocab_siz"):
        check_config(compose_config("train", base + ["+tokenizer.vocab_siz=3"]))
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_train_writes_a_loadable_checkpoint_folder(trained):
    root, cfg, metrics = trained
    assert metrics["global_step"] == 6
    assert metrics["val_loss"] > 0 and metrics["val_loss_per_note"] > metrics["val_loss"]
    model, tokenizer = load_pretrained(cfg.export_dir)
    ids = torch.tensor([[0, 1, 2]])
    assert model(ids).shape == (1, 3, len(tokenizer))
    assert (Path(cfg.run_dir) / "checkpoints" / "last.ckpt").is_file()
    assert list((Path(cfg.run_dir) / "tensorboard").glob("events.out.tfevents.*"))
    # the Lightning checkpoint alone is enough to sample from (model config + tokenizer inside)
    model2, tokenizer2 = load_pretrained(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(model2(ids), model(ids))
    assert tokenizer2.vocab_model == tokenizer.vocab_model


def test_a_folder_of_another_format_is_refused(trained, tmp_path):
    """A format-1 folder (bar headers merged with their notes by BPE) would read foreign prompts:
    refused, saying how to get a model of this format; so is a newer format."""
    _, cfg, _ = trained
    for version, message in [(1, "earlier bar encoding.*Retrain"), (FORMAT_VERSION + 1, "newer mmm")]:
        folder = tmp_path / f"format{version}"
        shutil.copytree(cfg.export_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["mmm_format"] == FORMAT_VERSION
        (folder / "config.json").write_text(json.dumps({**config, "mmm_format": version}))
        with pytest.raises(ValueError, match=message):
            load_pretrained(folder)


def test_export_carries_generation_settings_measured_on_the_data(trained):
    """The per-bar budget is a high quantile of the training bars' lengths in model ids, and
    the control values are those training samples hold; `MMM.from_pretrained` uses both."""
    import json

    import numpy as np

    from mmm.data.store import Store
    from mmm.generation.api import MMM
    from mmm.tokenizer import Vocab

    root, cfg, _ = trained
    generation = json.loads((Path(cfg.export_dir) / "config.json").read_text())["generation"]
    vocab = Vocab(load_pretrained(cfg.export_dir)[1])
    store = Store(cfg.data.store, "train")
    lengths = [len(vocab.encode_words([bar])) for i in range(len(store)) for track in store[i]["bars"] for bar in track]
    assert generation["max_bar_tokens"] == max(8, int(np.ceil(np.quantile(lengths, 0.999))))
    density = {vocab.tokenizer.vocab[f"ACBarNoteDensity_{n}"]: n for n in range(18)}
    seen_densities = sorted(density[i] for i in generation["controls_seen"] if i in density)
    assert seen_densities[0] == 0, "empty bars given ACs are marked note_density 0: trained"
    model = MMM.from_pretrained(cfg.export_dir)
    assert model.max_bar_tokens == generation["max_bar_tokens"]
    valid = sorted(model.controls.bar["note_density"].values)
    assert valid == seen_densities
    unseen = next((n for n in range(18) if n not in valid), None)
    if unseen is not None:  # a value training never showed is refused, naming the valid ones
        with pytest.raises(ValueError, match=r"note_density: int (0\.\.|among \[0, )"):
            model.controls.bar_ids({"note_density": unseen}, [0])


@pytest.mark.slow
def test_resume_continues_step_and_schedule(trained, corpus):
    root, cfg, _ = trained
    resumed = compose_config("train", small_overrides(corpus, root) + ["trainer.max_steps=9", "ckpt_path=last"])
    metrics = train(resumed)
    assert metrics["global_step"] == 9
    ckpt = torch.load(Path(resumed.run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 9
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 9  # the schedule went on, not restarted
    assert "initial_val_loss" not in metrics  # no step-0 validation on resume


def test_batches_mask_prompt_only_tokens(trained):
    root, cfg, _ = trained
    from mmm.tokenizer import Vocab, load_tokenizer

    vocab = Vocab(load_tokenizer(cfg.tokenizer.path))
    from mmm.config import check_section
    from mmm.data.datamodule import DataConfig, MIDIDataModule

    packed = OmegaConf.merge(cfg.data, {"loader": {"pack": True}})
    dm = MIDIDataModule.from_config(check_section("data", packed, DataConfig), cfg.tokenizer.path, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    ids, labels = batch["input_ids"], batch["labels"]
    assert "doc_ids" in batch  # packed rows (data.loader.pack=true)
    prompt_only = torch.from_numpy(vocab.prompt_only_model)[ids]
    # A packed sample's first label is never a target: the previous sample's last id precedes it.
    sample_start = packed_positions(batch["doc_ids"]) == 0
    assert torch.equal(labels == IGNORE_INDEX, prompt_only | (ids == vocab.pad) | sample_start)
    assert (batch["num_notes"] > 0).all()


def _worker_parent(_):
    import os

    return os.getppid()


@pytest.mark.slow
def test_loader_workers_start_apart_from_the_trainer_and_give_the_same_batches(trained):
    """Workers started by a forkserver (the default) are not forks of the training process, so
    they do not come to own a copy of its memory; they read the same samples as the main process."""
    import os

    from mmm.config import check_section
    from mmm.data.datamodule import DataConfig, MIDIDataModule

    root, cfg, _ = trained

    def batches(**loader):
        data = check_section("data", OmegaConf.merge(cfg.data, {"loader": loader}), DataConfig)
        dm = MIDIDataModule.from_config(data, cfg.tokenizer.path, seed=0)
        dm.setup("fit")
        loader = dm.val_dataloader()
        return loader, [b["input_ids"] for b in loader]

    _, inline = batches(num_workers=0)
    loader, forkserver = batches(num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert len(inline) == len(forkserver) and all(torch.equal(a, b) for a, b in zip(inline, forkserver))
    # The worker's parent is the fork server, not this process.
    probe = torch.utils.data.DataLoader(
        range(1), num_workers=1, collate_fn=_worker_parent, multiprocessing_context=loader.multiprocessing_context
    )
    assert next(iter(probe)) != os.getpid()
    with pytest.raises(ValueError, match="start_method"):
        batches(num_workers=1, start_method="thread")


@pytest.mark.slow
def test_wandb_logger_works_offline(corpus, tmp_path):
    pytest.importorskip("wandb")
    cfg = compose_config(
        "train",
        small_overrides(corpus, tmp_path)
        + ["logger=wandb", "logger.wandb.offline=true", "trainer.max_steps=2", "validate_before_training=false"],
    )
    os.environ["WANDB_SILENT"] = "true"
    metrics = train(cfg)
    assert metrics["global_step"] == 2
    assert list((Path(cfg.run_dir) / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_multirun_sweep_with_submitit_local_launcher(corpus, tmp_path):
    overrides = [o for o in small_overrides(corpus, tmp_path) if not o.startswith("run_dir=")]
    env = {**os.environ, "MMM_RUNS_DIR": str(tmp_path / "runs"), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmm.train",
            "-m",
            "hydra/launcher=local",
            "experiment_name=sweep",
            *overrides,
            "trainer.max_steps=2",
            "validate_before_training=false",
            "optim.optimizer.lr=0.001,0.002",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    exports = sorted((tmp_path / "runs" / "sweep_sweep").glob("*/model/config.json"))
    assert len(exports) == 2, list((tmp_path / "runs").rglob("*"))[:50]
    lrs = set()
    for export in exports:
        overrides = (export.parent.parent / ".hydra" / "overrides.yaml").read_text()
        lrs |= {lr for lr in ("optim.optimizer.lr=0.001", "optim.optimizer.lr=0.002") if lr in overrides}
    assert lrs == {"optim.optimizer.lr=0.001", "optim.optimizer.lr=0.002"}


def test_export_cli_turns_a_ckpt_into_a_folder(trained, tmp_path):
    root, cfg, _ = trained
    from mmm.checkpoint import main as export

    export([str(Path(cfg.run_dir) / "checkpoints" / "last.ckpt"), str(tmp_path / "exported")])
    model, _ = load_pretrained(tmp_path / "exported")
    reference, _ = load_pretrained(Path(cfg.run_dir) / "checkpoints" / "last.ckpt")
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


def test_bpe_is_learned_on_bars_augmented_like_training_samples(trained):
    from mmm.data.prepare import augmented_bars
    from mmm.data.store import Store
    from mmm.tokenizer import Vocab, load_tokenizer

    root, cfg, _ = trained
    store = Store(cfg.data.store, "train")
    vocab = Vocab(load_tokenizer(cfg.tokenizer.path))
    original = [bar for i in range(len(store)) for track in store[i]["bars"] for bar in track]
    augmented = list(augmented_bars(store, vocab, {**cfg.data.sequences}))
    assert len(augmented) == len(original)
    changed = sum(a != o for a, o in zip(augmented, original))
    assert changed > len(original) // 2  # most bars are shifted, as in training samples
    assert [len(a) for a in augmented] == [len(o) for o in original]  # only ids change, never the layout
    assert augmented == list(augmented_bars(store, vocab, {**cfg.data.sequences}))  # deterministic
