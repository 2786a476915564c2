"""Preprocessing as a job array and one writer per store, with real processes: two array tasks
write the same store byte for byte as a single run; a killed task re-run redoes only its missing
shards; a second run on a store in use fails at once naming the holder; a killed run's locks are
stale and taken over; of two ranks of one job preparing the same data, one writes the store and
the other waits for it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fault_injection
import pytest
from conftest import REPO, corpus_with_bad_files, data_cfg, tok_cfg
from fault_injection import marked

from mmm.data.store import done_shards, shard_paths
from mmm.data.store_writer import array_task, preprocess
from mmm.files.locks import LockHeld

TIMEOUT = 3  # file_timeout of every run here (it is part of the store's settings)


def overrides(source: Path, store: Path) -> list[str]:
    """The Hydra overrides giving the settings of `data_cfg(source, store, ...)` below."""
    return [
        "data=folder",
        f"data.path={source}",
        f"data.store={store}",
        "data.preprocess.num_workers=1",
        "data.preprocess.shard_size=1",
        "data.preprocess.min_notes=16",
        f"data.preprocess.file_timeout={TIMEOUT}",
    ]


# `python -m mmm.preprocess` with the faults of `fault_injection` installed.
PREPROCESS = ["-c", "import fault_injection; fault_injection.preprocess_main()"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an unrelated process, importing the tests' modules."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MMM_JOB"))}
    return {**env, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), **extra}


def start(
    source: Path, store: Path, tmp_path: Path, task: int | None = None, count: int = 2, env: dict | None = None
) -> subprocess.Popen:
    """`python -m mmm.preprocess ...` as a Slurm array task (or a whole run, or with the
    variables `env`), in its own session."""
    env = clean_env(MMM_RUNS_DIR=str(tmp_path / "runs"), **(env or {}))
    if task is not None:
        env.update(
            {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_MIN": "0"}
        )
    return subprocess.Popen(
        [sys.executable, *PREPROCESS, *overrides(source, store)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = corpus_with_bad_files(tmp_path_factory.mktemp("array"), n=6)  # 9 files, 9 shards of one file
    # Sorted last, so it is the last shard (shard 9) of task 1 of 2: it hangs until file_timeout.
    (root / "zz_hang.mid").write_bytes(marked("HANG"))
    return root


@pytest.fixture(scope="module")
def single(source, tmp_path_factory):
    """The reference: one whole run, in this process."""
    store = tmp_path_factory.mktemp("single") / "store"
    with pytest.MonkeyPatch.context() as patch:
        fault_injection.install(setattr=patch.setattr)
        report = preprocess(data_cfg(source, store, shard_size=1, file_timeout=TIMEOUT), tok_cfg())
    assert report["rejected_by_reason"]["timeout"] == 1
    return store


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_two_tasks_write_the_single_run_store(source, single, tmp_path):
    store = tmp_path / "store"
    procs = [start(source, store, tmp_path, task) for task in (0, 1)]  # at the same time, on one store
    for p in procs:
        finish(p)
    assert files(store) == files(single)  # byte for byte, report.json included
    assert not list(store.rglob("*.lock"))


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_the_tasks_of_one_srun_step_share_the_shards(source, single, tmp_path):
    """`srun -n 2 python -m mmm.preprocess`: the two tasks of one job step (same SLURM_JOB_ID
    and SLURM_STEP_ID, SLURM_PROCID 0 and 1) share the shards as array tasks do, instead of the
    second stopping at once on the first one's lock; together they write the single run's store."""
    store = tmp_path / "store"
    step = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    procs = [start(source, store, tmp_path, env={**step, "SLURM_PROCID": str(rank)}) for rank in (0, 1)]
    outputs = [finish(p) for p in procs]
    for rank, output in enumerate(outputs):
        assert f"(task {rank} of 2: 5 shards)" in output
    assert files(store) == files(single)
    assert not list(store.rglob("*.lock"))


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_killed_task_rerun_redoes_only_its_missing_shards(source, single, tmp_path, monkeypatch, caplog):
    store = tmp_path / "store"
    report = preprocess(data_cfg(source, store, shard_size=1, file_timeout=TIMEOUT), tok_cfg(), task=(0, 2))
    assert report["complete"] is False and not (store / "report.json").exists()
    task1 = start(source, store, tmp_path, task=1)
    deadline = time.monotonic() + 120
    hanging_lock = store / "shards" / "00009.lock"
    # Every shard but the hanging one done, and the hanging one started (its lock taken).
    while done_shards(store) != set(range(9)) or not hanging_lock.exists():
        assert task1.poll() is None and time.monotonic() < deadline, task1.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(task1.pid, signal.SIGKILL)  # the whole task, as a node failure would
    task1.wait()
    assert not shard_paths(store, 9)[1].exists()
    assert hanging_lock.exists()  # left behind by the killed task
    kept_mtime = shard_paths(store, 1)[0].stat().st_mtime_ns

    fault_injection.install(setattr=monkeypatch.setattr)
    cfg = data_cfg(source, store, shard_size=1, file_timeout=TIMEOUT)
    report = preprocess(cfg, tok_cfg(), task=(1, 2))  # re-run here; the stale locks are taken over
    assert "taking over a stale lock" in caplog.text
    assert report["files_processed_this_run"] == 1  # shard 9 only
    assert shard_paths(store, 1)[0].stat().st_mtime_ns == kept_mtime
    assert files(store) == files(single)
    assert preprocess(cfg, tok_cfg())["files_processed_this_run"] == 0  # complete: nothing to do


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_second_run_on_a_store_in_use_fails_at_once(source, single, tmp_path, monkeypatch):
    """The first run is another process; this test's process makes the second."""
    store = tmp_path / "store"
    first = start(source, store, tmp_path)  # a whole run
    deadline = time.monotonic() + 120
    while not (held := sorted((store / "shards").glob("0*.lock"))):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, holding its locks, alive
    fault_injection.install(setattr=monkeypatch.setattr)
    cfg = data_cfg(source, store, shard_size=1, file_timeout=TIMEOUT)
    holder = rf"is in use by another run \(pid {first.pid} on host {socket.gethostname()}, started "
    try:
        with pytest.raises(LockHeld, match=holder):
            preprocess(cfg, tok_cfg())
        # An array task on the same store stops at the shard the whole run holds.
        shard = int(held[0].stem)
        with pytest.raises(LockHeld, match=rf"shards is in use by another run \(pid {first.pid} .*{shard:05d}\.lock"):
            preprocess(cfg, tok_cfg(), task=(shard % 2, 2))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    preprocess(cfg, tok_cfg())  # the killed run's locks are stale: taken over
    assert files(store) == files(single)
    assert not list(store.rglob("*.lock"))


# What `python -m mmm.train` does before training, in one rank: `prepare_data(data, tokenizer)`.
# The configs come pickled: JSON would turn the tokenizer's integer keys into strings.
PREPARE = """
import logging, os, pickle, sys
import fault_injection
fault_injection.install(os.environ[fault_injection.PAUSE_ENV])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from mmm.data.prepare import prepare_data
with open(sys.argv[1], "rb") as f:
    data, tokenizer = pickle.load(f)
print("prepared", prepare_data(data, tokenizer), flush=True)
"""


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_ranks_of_one_job_prepare_the_data_once(tmp_path):
    """Two ranks of one Slurm job step (same SLURM_JOB_ID and SLURM_STEP_ID) prepare the same
    fresh data folder: rank 0 preprocesses; rank 1 waits for it, then finds the store done.
    Rank 0's worker is held at its first shard (`fault_injection.pause`) until rank 1 is seen
    waiting."""
    source = corpus_with_bad_files(tmp_path / "corpus", n=4)  # 7 files, 7 shards of one file
    data = data_cfg(source, tmp_path / "data" / "store", shard_size=1, file_timeout=600)
    data["dir"] = str(tmp_path / "data")
    tokenizer = {**tok_cfg(), "path": str(tmp_path / "data" / "tokenizer.json")}
    configs = tmp_path / "configs.pickle"
    configs.write_bytes(pickle.dumps((data, tokenizer)))
    pause = tmp_path / "pause"
    pause.mkdir()
    (pause / "writing").touch()
    env = clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", **{fault_injection.PAUSE_ENV: str(pause)})

    def rank(r: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(configs)],
            cwd=REPO,
            env={**env, "SLURM_PROCID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    rank0 = rank(0)
    rank1 = None
    try:
        deadline = time.monotonic() + 300
        while not (claims := list(pause.glob("writing.*"))):  # rank 0 is writing its first shard
            assert rank0.poll() is None and time.monotonic() < deadline, rank0.communicate()[0][-3000:]
            time.sleep(0.05)
        rank1 = rank(1)
        seen = []
        for line in rank1.stdout:  # until rank 1 waits (or ends: then it did not wait)
            seen.append(line)
            if "waiting for another process of this job" in line:
                break
        assert "waiting for another process of this job" in seen[-1], "".join(seen)[-3000:]
        assert f"pid {rank0.pid} " in seen[-1] and "Slurm job 4242, rank 0" in seen[-1]
        claims[0].unlink()  # rank 0's worker goes on
        out0, out1 = finish(rank0), "".join(seen) + rank1.stdout.read()  # what was read is not read again
        assert rank1.wait(timeout=300) == 0, out1[-3000:]
    finally:
        for p in (rank0, rank1):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert "7 shards (0 already done)" in out0  # rank 0 preprocessed
    assert "already done)" not in out1 and "complete and made with these settings: nothing to do" in out1
    assert f"prepared {tokenizer['path']}" in out0 and f"prepared {tokenizer['path']}" in out1
    report = json.loads((tmp_path / "data" / "store" / "report.json").read_text())
    assert report["files"] == 7 and report["kept"] == 4
    assert not list((tmp_path / "data").rglob("*.lock"))


def test_array_task_from_config_or_slurm():
    assert array_task() is None or "SLURM_ARRAY_TASK_ID" in os.environ
    assert array_task(env={}) is None
    assert array_task(1, 4, env={}) == (1, 4)
    assert array_task(env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}) == (
        2,
        3,
    )
    assert array_task(0, 2, env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}) == (0, 2)  # config wins
    with pytest.raises(ValueError, match="0 <= task_index < task_count"):
        array_task(2, 2, env={})
    with pytest.raises(ValueError, match="both must be set"):
        array_task(1, None, env={})
    # The tasks of one srun step share the shards; inside an array task they share its share.
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    assert array_task(env={**step, "SLURM_PROCID": "1"}) == (1, 2)
    array = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}
    assert array_task(env={**step, **array, "SLURM_PROCID": "1"}) == (3, 6)
    assert array_task(1, 3, env={**step, "SLURM_PROCID": "0"}) == (2, 6)
    assert array_task(env={**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None  # srun -n 1
    # A batch script's own process is no step task, whatever its allocation's SLURM_NTASKS.
    assert array_task(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None
    with pytest.raises(ValueError, match="SLURM_PROCID=2 is not in"):
        array_task(env={**step, "SLURM_PROCID": "2"})
