"""Preprocessing survives any single file: a hang inside C code and a death by signal in a
worker are reported (`timeout`, `crashed`) and every other file still makes it into the store."""

from __future__ import annotations

import shutil
import signal

import pytest

from conftest import corpus_with_bad_files, data_cfg, store_rows, tok_cfg
from mmm.data.preprocess import TEST_FAULTS_ENV, preprocess


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A corpus and its store, without the faulty files."""
    root = corpus_with_bad_files(tmp_path_factory.mktemp("clean"), n=8)
    store = root / "store"
    preprocess(data_cfg(root / "songs", store, shard_size=3), tok_cfg())
    return root, store


def test_hang_in_c_code_and_deaths_by_signal_are_isolated(clean, tmp_path, monkeypatch):
    root, clean_store = clean
    songs = tmp_path / "songs"
    shutil.copytree(root / "songs", songs)
    # Marked files (the test hook of mmm.preprocess): one blocks every signal then calls
    # pause() (no in-process timer can end that), one reads address 0, ...
    (songs / "song_03b_hang.mid").write_bytes(b"MMM-TEST-HANG" + b"\0" * 64)
    (songs / "song_05b_segv.mid").write_bytes(b"MMM-TEST-SEGV" + b"\0" * 64)
    (songs / "song_06b_abort.mid").write_bytes(b"MMM-TEST-ABRT" + b"\0" * 64)  # abort() in C
    (songs / "song_07b_oom.mid").write_bytes(b"MMM-TEST-KILL" + b"\0" * 64)  # SIGKILL, as the OOM killer
    monkeypatch.setenv(TEST_FAULTS_ENV, "1")
    store = tmp_path / "store"
    report = preprocess(data_cfg(songs, store, shard_size=3, num_workers=2, file_timeout=3), tok_cfg())

    rejected = {r["name"]: r for r in report["rejected_files"]}
    assert rejected["song_03b_hang.mid"]["reason"] == "timeout"
    for name, sig in (("song_05b_segv.mid", signal.SIGSEGV), ("song_06b_abort.mid", signal.SIGABRT),
                      ("song_07b_oom.mid", signal.SIGKILL)):
        assert rejected[name]["reason"] == "crashed"
        assert rejected[name]["detail"].startswith(f"signal {int(sig)} ({sig.name}): the worker process died")
    assert report["kept"] == 8 and report["files"] == 12
    assert store_rows(store) == store_rows(clean_store)  # every other file, exactly as without the faulty ones
    assert not list(store.rglob("*.lock"))  # every shard lock released


def test_fault_hook_is_off_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(TEST_FAULTS_ENV, raising=False)
    songs = tmp_path / "songs"
    songs.mkdir()
    (songs / "hang.mid").write_bytes(b"MMM-TEST-HANG" + b"\0" * 64)
    report = preprocess(data_cfg(songs, tmp_path / "store"), tok_cfg())
    assert report["rejected_files"][0]["reason"] == "not_midi"
