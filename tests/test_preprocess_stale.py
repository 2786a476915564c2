"""A stale store is refused everywhere (preprocess, train_tokenizer, train, the DataModule) with
the setting that changed and how to rebuild; a missing store is rebuilt; one writer per tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, corpus_with_bad_files, data_cfg, data_config, tok_cfg
from omegaconf import OmegaConf

from mmm.data.datamodule import MIDIDataModule
from mmm.data.prepare import ensure_tokenizer, train_tokenizer
from mmm.data.store import Store
from mmm.data.store_writer import preprocess
from mmm.files.locks import acquire_lock
from mmm.tokenizer import build_tokenizer, save_tokenizer

# Every test uses a store preprocessed in worker processes (the `built` fixture).
pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = corpus_with_bad_files(tmp_path_factory.mktemp("stale"), n=4)
    store = root / "store"
    preprocess(data_cfg(root / "songs", store), tok_cfg())
    return root, store


def tokenizer_cfg(path, **params) -> dict:
    cfg = tok_cfg()
    cfg.update(path=str(path), vocab_size=None)
    cfg["params"].update(params)
    return cfg


def test_train_tokenizer_refuses_a_store_of_other_tokenizer_settings(built, tmp_path):
    root, store = built
    cfg = tokenizer_cfg(tmp_path / "tok.json", pitch_range=[21, 109])
    with pytest.raises(
        RuntimeError, match=r"changed: tokenizer\.params\.pitch_range: \[21, 108\] -> \[21, 109\]\. Rebuild it: delete"
    ):
        train_tokenizer(data_cfg(root / "songs", store), cfg)
    assert not (tmp_path / "tok.json").exists()


def test_a_store_of_another_download_is_refused(built, tmp_path):
    root, store = built
    other = tmp_path / "other"
    shutil.copytree(root / "songs", other)
    (other / "song_00.mid").write_bytes((other / "song_01.mid").read_bytes() + b"\0")  # another file there
    with pytest.raises(
        RuntimeError, match=r"changed: the source's files \(data\.source; store made from folder .*songs"
    ):
        train_tokenizer(data_cfg(other, store), tokenizer_cfg(tmp_path / "tok.json"))


def test_datamodule_refuses_a_tokenizer_of_other_settings(built, tmp_path):
    root, store = built
    path = save_tokenizer(build_tokenizer({**tok_cfg()["params"], "num_velocities": 16}), tmp_path / "tok.json")
    data = data_config()
    cfg = {
        "store": str(store),
        "max_seq_len": data["max_seq_len"],
        "sequences": data["sequences"],
        "loader": data["loader"],
    }
    with pytest.raises(
        ValueError,
        match=r"tokenized with other tokenizer settings .*tokenizer\.params\.num_velocities: 24 -> 16.*delete",
    ):
        MIDIDataModule(**cfg, tokenizer_path=str(path))
    ok = save_tokenizer(build_tokenizer(tok_cfg()["params"]), tmp_path / "ok.json")
    MIDIDataModule(**cfg, tokenizer_path=str(ok))


def test_a_tokenizer_whose_store_is_missing_gets_its_store_rebuilt(built, tmp_path):
    root, _ = built
    tok = save_tokenizer(build_tokenizer(tok_cfg()["params"]), tmp_path / "tok.json")
    before = tok.read_bytes()
    store = tmp_path / "store"
    data = {**data_cfg(root / "songs", store), "dir": str(tmp_path)}
    cfg = OmegaConf.create({"data": data, "tokenizer": tokenizer_cfg(tok)})
    assert ensure_tokenizer(cfg.data, cfg.tokenizer) == tok
    assert len(Store(store, "train")) > 0 and tok.read_bytes() == before
    cfg.data.preprocess.min_bars = 9  # the tokenizer exists, yet `mmm.train` still checks the store
    with pytest.raises(RuntimeError, match=r"changed: data\.preprocess\.min_bars: 8 -> 9"):
        ensure_tokenizer(cfg.data, cfg.tokenizer)


def test_a_store_of_an_older_format_is_refused(built, tmp_path):
    root, store = built
    old = tmp_path / "store"
    shutil.copytree(store, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["format"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="written by an older version of mmm .* delete it and re-run"):
        Store(old, "train")
    with pytest.raises(RuntimeError, match=r"store format 1 -> 2 \(made by an older mmm\)"):
        preprocess(data_cfg(root / "songs", old), tok_cfg())


@pytest.mark.multiprocess
def test_second_tokenizer_training_fails_at_once_naming_the_holder(built, tmp_path):
    root, store = built
    path = tmp_path / "tok.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MMM_JOB"))}
    env["MMM_RUNS_DIR"] = str(tmp_path / "runs")
    cmd = [
        sys.executable,
        "-m",
        "mmm.train_tokenizer",
        "data=folder",
        f"data.path={root / 'songs'}",
        f"data.store={store}",
        "data.preprocess.min_notes=16",
        f"tokenizer.path={path}",
        "tokenizer.vocab_size=300",
    ]
    with acquire_lock(path.parent, path.name):  # this process plays the first run
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"is in use by another run (pid {os.getpid()} on host" in proc.stderr + proc.stdout
    assert not path.exists()
