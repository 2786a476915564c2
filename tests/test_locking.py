"""One writer per folder (mmm.files.locks), with real processes holding and fighting over locks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmm.files.locks import LockHeld, acquire_lock

# Holds the lock argv[4] of folder argv[1] (shared by the job when argv[5] is "1") and reports;
# stays until the file argv[2] exists (or is killed).
HOLDER = """
import sys, time
from pathlib import Path
from mmm.files.locks import LockHeld, acquire_lock
try:
    with acquire_lock(sys.argv[1], sys.argv[4], stale_after=float(sys.argv[3]), shared_by_job=sys.argv[5] == "1") as lock:
        print("owner" if lock.owner else "joined", lock.record["pid"], flush=True)
        while not Path(sys.argv[2]).exists():
            time.sleep(0.05)
except LockHeld as e:
    print("held", e, flush=True)
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an unrelated run: no job id inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k != "MMM_JOB_ID" and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    return {**env, **extra}


def start_holder(
    folder: Path, release: Path, env: dict[str, str], stale_after: float = 600, name: str = "run", shared: bool = False
) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(release), str(stale_after), name, str(int(shared))],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_second_process_fails_at_once_naming_the_holder_then_a_killed_holder_is_taken_over(tmp_path, procs):
    holder, line = start_holder(tmp_path, tmp_path / "release", clean_env())
    procs.append(holder)
    assert line == f"owner {holder.pid}"
    with pytest.raises(LockHeld) as e:
        with acquire_lock(tmp_path, "run"):
            pass
    message = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
    assert str(tmp_path / "run.lock") in message and "delete" in message
    assert e.value.holder["pid"] == holder.pid

    holder.send_signal(signal.SIGKILL)  # leaves its lock file behind
    holder.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == holder.pid
    with acquire_lock(tmp_path, "run") as lock:
        assert lock.owner and json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run.lock").exists()  # released


def test_a_pid_reused_by_another_process_is_not_mistaken_for_the_holder(tmp_path):
    with acquire_lock(tmp_path, "run") as lock:
        record = lock.record
    # A lock left by a dead run whose pid now belongs to a live process (here: this one).
    (tmp_path / "run.lock").write_text(json.dumps({**record, "pid_start": "1", "job": "local:other"}))
    with acquire_lock(tmp_path, "run") as lock:
        assert lock.owner and lock.record["token"] != record["token"]


def test_lock_from_another_host_is_stale_only_without_a_recent_heartbeat(tmp_path):
    path = tmp_path / "run.lock"
    record = {
        "pid": 1,
        "host": "some-other-node",
        "started": "2026-01-01 00:00:00 UTC",
        "job": "slurm:7:0:0",
        "token": "x",
    }
    path.write_text(json.dumps(record))
    with pytest.raises(LockHeld, match="pid 1 on host some-other-node, started 2026-01-01 00:00:00 UTC, Slurm job 7"):
        with acquire_lock(tmp_path, "run", stale_after=60):
            pass
    old = time.time() - 61
    os.utime(path, (old, old))  # its holder stopped touching it a minute ago
    with acquire_lock(tmp_path, "run", stale_after=60) as lock:
        assert lock.owner


@pytest.mark.subprocess
def test_the_holder_keeps_its_lock_fresh(tmp_path, procs):
    """The heartbeat (every stale_after/10 s) keeps a long run's lock from looking stale to
    other hosts."""
    holder, line = start_holder(tmp_path, tmp_path / "release", clean_env(), stale_after=1.0)
    procs.append(holder)
    assert line.startswith("owner")
    path = tmp_path / "run.lock"
    old = time.time() - 3600
    os.utime(path, (old, old))
    deadline = time.time() + 60
    while path.stat().st_mtime < old + 1 and time.time() < deadline:
        time.sleep(0.1)
    assert path.stat().st_mtime > old + 1


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_processes_of_one_job_share_a_shared_lock_and_a_slurm_requeue_takes_it_over(tmp_path, procs):
    release = tmp_path / "release"
    rank0, line0 = start_holder(tmp_path, release, clean_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0"), shared=True)
    procs.append(rank0)
    assert line0 == f"owner {rank0.pid}"
    # Another rank of the same job: joins (names rank 0 as the holder) instead of failing.
    rank1, line1 = start_holder(tmp_path, release, clean_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0"), shared=True)
    procs.append(rank1)
    assert line1 == f"joined {rank0.pid}"
    # Another Slurm job on the same folder, or another `srun` step of this job: refused.
    for env in (
        clean_env(SLURM_JOB_ID="4343"),
        clean_env(SLURM_JOB_ID="4242", SLURM_STEP_ID="1", SLURM_RESTART_COUNT="0"),
    ):
        other, line = start_holder(tmp_path, release, env, shared=True)
        procs.append(other)
        assert (
            line.startswith(f"held {tmp_path} is in use by another run (pid {rank0.pid}") and "Slurm job 4242" in line
        )
    # The same job requeued (its old processes still being torn down): takes the lock over.
    requeued, line = start_holder(
        tmp_path, release, clean_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1"), shared=True
    )
    procs.append(requeued)
    assert line == f"owner {requeued.pid}"
    release.touch()
    for p in (rank0, rank1, requeued):
        assert p.wait(timeout=60) == 0
    assert not (tmp_path / "run.lock").exists()  # removed by its owner, not by the joined rank


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_a_lock_not_shared_by_the_job_refuses_another_rank_naming_it(tmp_path, procs):
    """Locks are per process unless shared by the job: two ranks of one job step (same Slurm
    job, step and restart count) are two writers. The record names the holder's rank."""
    release = tmp_path / "release"
    step = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "0"}
    rank0, line0 = start_holder(tmp_path, release, clean_env(**step, SLURM_PROCID="0"))
    procs.append(rank0)
    assert line0 == f"owner {rank0.pid}"
    assert json.loads((tmp_path / "run.lock").read_text())["ranks"] == {"SLURM_PROCID": "0"}
    rank1, line1 = start_holder(tmp_path, release, clean_env(**step, SLURM_PROCID="1"))
    procs.append(rank1)
    assert line1.startswith(f"held {tmp_path} is in use by another run (pid {rank0.pid}")
    assert "Slurm job 4242, rank 0" in line1
    release.touch()
    assert rank0.wait(timeout=60) == 0


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_subprocesses_launched_by_the_holder_join_its_lock(tmp_path, procs):
    """Lightning launches the other ranks of a local multi-process job as subprocesses of
    rank 0: they inherit its job id and share the lock."""
    with acquire_lock(tmp_path, "run", shared_by_job=True) as lock:
        child, line = start_holder(tmp_path, tmp_path / "release", dict(os.environ), shared=True)
        procs.append(child)
        assert line == f"joined {os.getpid()}"
        (tmp_path / "release").touch()
        assert child.wait(timeout=60) == 0
        assert json.loads(lock.path.read_text())["token"] == lock.record["token"]
    assert "MMM_JOB_ID" not in os.environ


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_runs_racing_for_a_stale_lock_get_exactly_one_winner(tmp_path, procs):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x", "job": "local:dead", "token": "t"})
    )
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(tmp_path), str(tmp_path / "release"), "600", "run", "0"],
            env=clean_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    procs.extend(racers)
    results = [p.stdout.readline().split()[0] for p in racers]
    assert sorted(results) == ["held", "held", "held", "owner"]


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_training_refuses_a_run_folder_in_use(corpus, tmp_path, procs):
    """A second `python -m mmm.train` on a run folder in use fails before any work, naming
    the holder."""
    from conftest import REPO, small_overrides

    holder, line = start_holder(tmp_path / "run", tmp_path / "release", clean_env(), name="train")
    procs.append(holder)
    assert line.startswith("owner")
    proc = subprocess.run(
        [sys.executable, "-m", "mmm.train", *small_overrides(corpus, tmp_path)],
        cwd=REPO,
        env=clean_env(WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}" in proc.stderr
    assert not (tmp_path / "data").exists()  # failed before preprocessing anything


def test_lock_held_survives_pickling(tmp_path):
    """Process pools and launchers (submitit) pickle a job's exception to report it."""
    import pickle

    error = LockHeld(tmp_path / "run.lock", {"pid": 7, "host": "h", "started": "s"})
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.holder == error.holder and copy.path == error.path


@pytest.mark.subprocess
@pytest.mark.multiprocess
def test_waiting_for_the_holder_instead_of_failing(tmp_path, procs):
    """`wait=`: a step another run may be doing already (sweep jobs building the data they
    share) waits for it, then takes the lock; a bounded wait still fails naming the holder."""
    release = tmp_path / "release"
    holder, line = start_holder(tmp_path, release, clean_env())
    procs.append(holder)
    assert line.startswith("owner")
    with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
        with acquire_lock(tmp_path, "run", wait=0.5):
            pass
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER.replace("stale_after=float(sys.argv[3])", "wait=None"),
            str(tmp_path),
            str(tmp_path / "release2"),
            "600",
            "run",
            "0",
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(waiter)
    time.sleep(1)
    assert waiter.poll() is None  # still waiting
    release.touch()
    assert holder.wait(timeout=60) == 0
    assert waiter.stdout.readline().strip() == f"owner {waiter.pid}"
    (tmp_path / "release2").touch()
    assert waiter.wait(timeout=60) == 0


@pytest.mark.subprocess
@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_two_process_ddp_training_holds_its_run_folder_once(corpus, tmp_path):
    """Lightning launches rank 1 as a subprocess of rank 0, which holds the run lock: rank 1
    shares it instead of failing, and the lock is gone when the job ends."""
    from conftest import REPO, small_overrides

    overrides = small_overrides(corpus, tmp_path) + [
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "trainer.max_steps=2",
        "validate_before_training=false",
        "logger=none",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mmm.train", *overrides],
        cwd=REPO,
        env=clean_env(WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # rank 1 really ran
    assert "in use by another run" not in proc.stderr and "waiting for another run" not in proc.stderr
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.lock"))
