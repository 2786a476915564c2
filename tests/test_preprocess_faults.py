"""Preprocessing survives any single file: a hang inside C code and a death by signal in a
worker are reported (`timeout`, `crashed`) and every other file still makes it into the store.
A worker killed from outside while on no file (writing its shard, idle) is replaced and its
shard redone."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import fault_injection
import pytest
from conftest import corpus_with_bad_files, data_cfg, store_rows, tok_cfg
from fault_injection import marked

from mmm.data.store_writer import preprocess
from mmm.data.workers import MAX_SHARD_TRIES

# Every test runs preprocessing's worker processes; the faults are injected by the tests
# (`fault_injection`), never by a hook of the production code.
pytestmark = pytest.mark.subprocess


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
    # Marked files (faults injected into the workers by fault_injection): one blocks every
    # signal then calls pause() (no in-process timer can end that), one reads address 0, ...
    (songs / "song_03b_hang.mid").write_bytes(marked("HANG"))
    (songs / "song_05b_segv.mid").write_bytes(marked("SEGV"))
    (songs / "song_06b_abort.mid").write_bytes(marked("ABRT"))  # abort() in C
    (songs / "song_07b_oom.mid").write_bytes(marked("KILL"))  # SIGKILL, as the OOM killer
    fault_injection.install(setattr=monkeypatch.setattr)
    store = tmp_path / "store"
    report = preprocess(data_cfg(songs, store, shard_size=3, num_workers=2, file_timeout=3), tok_cfg())

    rejected = {r["name"]: r for r in report["rejected_files"]}
    assert rejected["song_03b_hang.mid"]["reason"] == "timeout"
    for name, sig in (
        ("song_05b_segv.mid", signal.SIGSEGV),
        ("song_06b_abort.mid", signal.SIGABRT),
        ("song_07b_oom.mid", signal.SIGKILL),
    ):
        assert rejected[name]["reason"] == "crashed"
        assert rejected[name]["detail"].startswith(f"signal {int(sig)} ({sig.name}): the worker process died")
    assert report["kept"] == 8 and report["files"] == 12
    assert store_rows(store) == store_rows(clean_store)  # every other file, exactly as without the faulty ones
    assert not list(store.rglob("*.lock"))  # every shard lock released


def test_the_timeout_counts_the_workers_cpu_not_the_wall_clock(tmp_path, monkeypatch):
    """A file whose loading spins for ever is rejected as a timeout; one that takes twice the
    timeout in wall time while using a tenth of a core (a worker waiting for CPU on a busy
    node) is not: which files a store keeps must not depend on the machine's load."""
    fault_injection.install(setattr=monkeypatch.setattr)
    songs = tmp_path / "songs"
    songs.mkdir()
    (songs / "spin.mid").write_bytes(marked("SPIN"))
    (songs / "slow.mid").write_bytes(marked("SLOW"))  # 6 s of wall time, ~0.6 s of CPU
    report = preprocess(data_cfg(songs, tmp_path / "store", num_workers=2, file_timeout=3), tok_cfg())
    rejected = {r["name"]: r["reason"] for r in report["rejected_files"]}
    assert rejected == {"spin.mid": "timeout", "slow.mid": "not_midi"}  # slow.mid got through to the checks


def test_production_code_has_no_fault_hook(tmp_path, monkeypatch):
    """Without `fault_injection`, a marked file is an ordinary file that is not MIDI, whatever
    the environment says (the variable of the hook production code used to carry included)."""
    monkeypatch.setenv("MMM_TEST_FAULTS", "1")
    songs = tmp_path / "songs"
    songs.mkdir()
    (songs / "hang.mid").write_bytes(marked("HANG"))
    report = preprocess(data_cfg(songs, tmp_path / "store"), tok_cfg())
    assert report["rejected_files"][0]["reason"] == "not_midi"


# -- workers killed from outside while on no file ----------------------------------------------


def files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def paused(folder: Path, point: str, stop: threading.Event) -> tuple[int, Path] | None:
    """The pid of the worker paused at `point` (`fault_injection.pause`) and its claim file
    (deleting it lets the worker go on); None once `stop` is set."""
    while not stop.is_set():
        claims = list(folder.glob(f"{point}.*"))
        if claims:
            return int(claims[0].suffix[1:]), claims[0]
        time.sleep(0.02)
    return None


def kill_and_wait(pid: int) -> None:
    """SIGKILL, as the out-of-memory killer; returns once the process is dead (a zombie until
    the run's main process joins it)."""
    os.kill(pid, signal.SIGKILL)
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
        time.sleep(0.02)


@pytest.fixture
def killer(tmp_path, monkeypatch):
    """Runs a function in a thread beside the run (in this process, whose forked children the
    workers are) with workers that pause where the function arms `fault_injection`'s pause
    points; joined at the end."""
    folder = tmp_path / "pause"
    folder.mkdir()
    fault_injection.install(folder, setattr=monkeypatch.setattr)
    stop, threads = threading.Event(), []

    def run(target) -> None:
        threads.append(threading.Thread(target=target, args=(folder, stop), daemon=True))
        threads[-1].start()

    yield run
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


def undisturbed(root: Path, tmp_path: Path, **settings) -> Path:
    store = tmp_path / "undisturbed"
    preprocess(data_cfg(root / "songs", store, **settings), tok_cfg())
    return store


def test_a_worker_killed_while_writing_its_shard_is_replaced_and_the_shard_redone(clean, tmp_path, killer, monkeypatch):
    root, _ = clean
    killed = []

    def kill_the_writer(folder: Path, stop: threading.Event) -> None:
        (folder / "writing").touch()  # the first worker to write a shard pauses there
        if found := paused(folder, "writing", stop):
            kill_and_wait(found[0])
            killed.append(found[0])

    killer(kill_the_writer)
    store = tmp_path / "store"
    report = preprocess(data_cfg(root / "songs", store, shard_size=3), tok_cfg())
    assert killed and report["kept"] == 8 and report["rejected"] == 0  # no file blamed
    monkeypatch.undo()  # the reference run has no injected pauses
    assert files(store) == files(undisturbed(root, tmp_path, shard_size=3))
    assert not list(store.rglob("*.lock")) and not list(store.rglob(".*tmp*"))


@pytest.mark.parametrize("shard_size", [4, 3], ids=["after-the-last-shard", "between-shards"])
def test_a_worker_killed_while_idle_is_replaced(clean, tmp_path, killer, shard_size, monkeypatch):
    """Two workers; one pauses writing its shard, so the other finishes first and idles: it is
    killed there. With 2 shards the run is then done and only tells the workers to stop; with 3
    the third shard goes to the dead worker."""
    root, _ = clean
    killed = []

    def kill_the_idle_one(folder: Path, stop: threading.Event) -> None:
        (folder / "writing").touch()
        (folder / "idle").touch()
        writer, idle = paused(folder, "writing", stop), paused(folder, "idle", stop)
        if writer and idle:
            kill_and_wait(idle[0])
            killed.append(idle[0])
            writer[1].unlink()  # the writer goes on: the run finishes after the death

    killer(kill_the_idle_one)
    store = tmp_path / "store"
    report = preprocess(data_cfg(root / "songs", store, shard_size=shard_size, num_workers=2), tok_cfg())
    assert killed and report["kept"] == 8 and report["rejected"] == 0
    monkeypatch.undo()  # the reference run has no injected pauses
    assert files(store) == files(undisturbed(root, tmp_path, shard_size=shard_size))
    assert not list(store.rglob("*.lock"))


def test_a_shard_whose_workers_keep_dying_on_no_file_fails_the_run_naming_it(clean, tmp_path, killer):
    root, _ = clean
    killed = []

    def kill_every_writer(folder: Path, stop: threading.Event) -> None:
        (folder / "writing").touch()
        while found := paused(folder, "writing", stop):
            (folder / "writing").touch()  # re-armed before the kill: the next worker pauses too
            killed.append(found[0])  # before the kill: the run may fail before this thread runs again
            kill_and_wait(found[0])
            found[1].unlink()

    killer(kill_every_writer)
    store = tmp_path / "store"
    with pytest.raises(
        RuntimeError,
        match=rf"died {MAX_SHARD_TRIES} times on shard 0 of {store} while on none of its files \(last: signal 9 \(SIGKILL\)\)",
    ):
        preprocess(data_cfg(root / "songs", store, shard_size=3), tok_cfg())
    assert len(killed) == MAX_SHARD_TRIES
    assert not list(store.rglob("*.lock")) and not list((store / "shards").glob("*00000*"))
