"""A full disk loses nothing: each writer, run in a child process whose file-size limit
(RLIMIT_FSIZE) is below the size of what it writes, fails with a clear `DiskFull` error, leaves
the previous good file in place and no partial file; run again with space, it completes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tokenizer_params

# The child: ignore SIGXFSZ (by default it kills a process writing past its file-size limit;
# ignored, write() fails with EFBIG like a full disk's ENOSPC), import the writer's modules,
# lower the limit, then write.
CHILD = """
import importlib, resource, signal, sys
import test_full_disk as t
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
name, target, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
for module in t.MODULES[name]:
    importlib.import_module(module)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    getattr(t, "write_" + name)(target, "new")
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3)
"""


def write_limited(name: str, target: Path, limit: int) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(target), str(limit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, f"the write did not fail as expected:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_clear_error(output: str, target: Path) -> None:
    assert output.startswith("DiskFull "), output
    assert f"could not write {target}: File too large" in output
    assert "is unchanged and no partial file was left: free space and run again" in output


MODULES = {
    "shard": ["mmm.data.store"],
    "tokenizer": ["mmm.tokenizer", "conftest"],
    "folder": ["mmm.model.pretrained", "mmm.model", "conftest"],
    "lightning_ckpt": ["mmm.training.checkpoint_io"],
    "preprocess": ["mmm.data.store_writer", "conftest"],
    "lock": ["mmm.files.locks"],
}


# -- the writers: "old" is written first with space, "new" (bigger) with the limit ---------
def shard_rows(version: str) -> list:
    from mmm.data.chunks import Chunk

    n = 50 if version == "old" else 50_000
    chunk = Chunk(
        programs=[0],
        bars=[[list(range(n))]],
        track_acs=[[[]]],
        bar_acs=[[[[]]]],
        bar_ticks=[0],
        start_tick=0,
        tpq=480,
        num_notes=n,
    )
    return [(f"piece_{version}", 0, "0" * 32, "train", 0, chunk)]  # (name, file index, md5, split, chunk index, chunk)


def write_shard(store: str, version: str) -> None:
    from mmm.data.store import write_shard

    write_shard(Path(store), 0, shard_rows(version), {"version": version})


def write_tokenizer(path: str, version: str) -> None:
    from mmm.tokenizer import build_tokenizer, save_tokenizer

    save_tokenizer(build_tokenizer({**tokenizer_params(), "num_velocities": 24 if version == "old" else 32}), path)


def write_folder(folder: str, version: str) -> None:
    import torch

    from mmm.model import MMMTransformer, model_config_from_preset
    from mmm.model.pretrained import save_pretrained
    from mmm.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_params())
    torch.manual_seed(0 if version == "old" else 1)
    model = MMMTransformer(model_config_from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=64))
    save_pretrained(model, tokenizer, folder, extra={"version": version})


def write_lightning_ckpt(path: str, version: str) -> None:
    import torch

    from mmm.training.checkpoint_io import MMMCheckpointIO

    value = 1.0 if version == "old" else 2.0
    MMMCheckpointIO().save_checkpoint({"version": version, "w": torch.full((100_000,), value)}, path)


def write_preprocess(store: str, version: str) -> dict:
    """Preprocess `<store>/../corpus` with 2 worker processes (they write the shards)."""
    from conftest import data_cfg, tok_cfg

    from mmm.data.store_writer import preprocess

    return preprocess(data_cfg(Path(store).parent / "corpus", Path(store), num_workers=2), tok_cfg())


def write_lock(folder: str, version: str) -> None:
    """Take and release `<folder>/run.lock`, as every run does first."""
    from mmm.files.locks import acquire_lock

    with acquire_lock(folder, "run"):
        pass


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# -- the tests -----------------------------------------------------------------------------
@pytest.mark.subprocess
@pytest.mark.full_disk
def test_token_store_shard(tmp_path):
    import pyarrow as pa

    from mmm.data.store import shard_paths

    store = tmp_path / "store"
    write_shard(str(store), "old")
    arrow, report = shard_paths(store, 0)
    before, files = arrow.read_bytes(), listing(store)
    assert_clear_error(write_limited("shard", store, limit=len(before) * 4), arrow)
    assert arrow.read_bytes() == before and listing(store) == files  # nothing replaced, nothing left over
    assert pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()["name"].to_pylist() == ["piece_old"]

    write_shard(str(store), "new")  # space is back
    assert pa.ipc.open_file(pa.memory_map(str(arrow))).read_all()["name"].to_pylist() == ["piece_new"]
    assert '"version": "new"' in report.read_text()


@pytest.mark.subprocess
@pytest.mark.full_disk
def test_tokenizer_file(tmp_path):
    from mmm.tokenizer import load_tokenizer

    path = tmp_path / "tokenizer.json"
    write_tokenizer(str(path), "old")
    before = path.read_bytes()
    assert_clear_error(write_limited("tokenizer", path, limit=len(before) // 2), path)
    assert path.read_bytes() == before and listing(tmp_path) == {"tokenizer.json": len(before)}
    assert load_tokenizer(path).config.num_velocities == 24

    write_tokenizer(str(path), "new")
    assert load_tokenizer(path).config.num_velocities == 32


@pytest.mark.subprocess
@pytest.mark.full_disk
def test_checkpoint_folder(tmp_path):
    from mmm.model.pretrained import load_pretrained

    folder = tmp_path / "model"
    write_folder(str(folder), "old")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    files = listing(tmp_path)
    assert_clear_error(write_limited("folder", folder, limit=len(before["model.safetensors"]) // 2), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert listing(tmp_path) == files  # no temporary folder left beside it
    load_pretrained(folder)

    write_folder(str(folder), "new")
    assert '"version": "new"' in (folder / "config.json").read_text()
    assert listing(tmp_path).keys() == files.keys()


@pytest.mark.subprocess
@pytest.mark.full_disk
def test_lightning_checkpoint(tmp_path):
    from mmm.model.pretrained import load_checkpoint_file

    path = tmp_path / "last.ckpt"
    write_lightning_ckpt(str(path), "old")
    before = path.read_bytes()
    assert_clear_error(write_limited("lightning_ckpt", path, limit=len(before) // 2), path)
    assert path.read_bytes() == before and listing(tmp_path) == {"last.ckpt": len(before)}
    assert load_checkpoint_file(path)["version"] == "old"

    write_lightning_ckpt(str(path), "new")
    assert load_checkpoint_file(path)["version"] == "new"


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_or_quota_reads_the_same(tmp_path, monkeypatch, code):
    """ENOSPC / EDQUOT (a real full disk or quota) are reported like EFBIG, and wrapped errors
    (safetensors raises its own type carrying the OS message) are recognised."""
    import errno

    from mmm.files.atomic import DiskFull, atomic_write, atomic_write_bytes

    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError(f"Error while serializing: IoError({os.strerror(getattr(errno, code))})")

    with pytest.raises(DiskFull, match=f"could not write {target}: {os.strerror(getattr(errno, code))}"):
        atomic_write(target, full)
    assert target.read_bytes() == b"old" and listing(tmp_path) == {"x.bin": 3}


@pytest.mark.subprocess
@pytest.mark.full_disk
def test_preprocessing_stops_on_a_full_disk_and_the_rerun_completes(tmp_path):
    """In context: a worker's shard write failing for lack of space stops the run with the
    error (it is not taken for a bad file), and the next run finishes every file."""
    from conftest import write_synthetic_midi

    for seed in range(6):
        write_synthetic_midi(tmp_path / "corpus" / f"piece_{seed}.mid", seed, 12)
    store = tmp_path / "store"
    output = write_limited("preprocess", store, limit=16_000)
    # The worker's DiskFull, reported by the parent with the shard it was writing.
    assert (
        ".arrow: File too large (disk full, quota or file-size limit)" in output
        and "free space and run again" in output
    )
    assert not list(store.glob("shards/*.arrow")) and not list(store.glob("shards/.*"))
    report = write_preprocess(str(store), "new")
    assert report["kept"] == 6 and report["rejected"] == 0


@pytest.mark.subprocess
@pytest.mark.full_disk
def test_a_lock_on_a_full_disk(tmp_path):
    """Training, preprocessing and tokenizer training each take a lock before any work: on a
    full disk that fails with `DiskFull` naming the lock, leaving no partial lock file (which
    later runs would read as an unreadable lock); with space the same call takes it."""
    folder = tmp_path / "run"
    folder.mkdir()
    output = write_limited("lock", folder, limit=16)
    assert output.startswith("DiskFull "), output
    assert (
        f"could not create the lock {folder / 'run.lock'}: File too large (disk full, quota or file-size limit)"
        in output
    )
    assert "free space and run again" in output
    assert listing(folder) == {}
    write_lock(str(folder), "new")
    assert listing(folder) == {}
