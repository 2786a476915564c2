"""A model's licence travels in its checkpoint folder: `license` in the training config (the
music21 experiment sets its corpus's terms) is written into `config.json`, where the server's
/v1/info and the model card read it."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, compose_config, small_overrides
from omegaconf import OmegaConf

from mmm.train import check_config, train


def test_the_shipped_model_folder_carries_the_licence_its_card_states():
    config = json.loads((REPO / "models" / "mmm-music21-small" / "config.json").read_text())
    experiment = OmegaConf.load(REPO / "configs" / "experiment" / "music21.yaml")
    assert config["license"] == experiment.license  # what retraining with its command writes
    card = " ".join((REPO / "models" / "mmm-music21-small" / "README.md").read_text().split())
    assert "research and personal use" in card and "research and personal use" in config["license"]
    assert "some encodings may not be used for commercial uses" in config["license"]


def test_a_licence_that_is_not_text_is_refused_before_work(corpus, tmp_path):
    with pytest.raises(ValueError, match="license=12: expected"):
        check_config(compose_config("train", small_overrides(corpus, tmp_path) + ["license=12"]))


@pytest.mark.subprocess
@pytest.mark.slow
def test_training_writes_the_configured_licence_into_the_checkpoint_folder(corpus, tmp_path):
    overrides = ["trainer.max_steps=1", "validate_before_training=false", "logger=none", "license=CC-BY-4.0"]
    train(compose_config("train", small_overrides(corpus, tmp_path) + overrides))
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["license"] == "CC-BY-4.0"
