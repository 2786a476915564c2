"""One writer per folder: `with acquire_lock(folder, "run"):` holds `folder/run.lock`.

The lock is a small JSON file naming its holder (pid, host, start time, job, command). It is
created atomically (a complete file is hard-linked into place, which fails if one exists; this
also works on NFS), so a second run on the same folder fails at once with `LockHeld` naming the
holder. A lock left behind by a run that died is *stale* and is taken over:

- same host: the holder's process is gone (or its pid now belongs to another process);
- another host: its pid cannot be checked, so the holder touches the file every
  `stale_after / 10` seconds from a thread; a lock not touched for `stale_after` seconds (10 min
  by default) is stale. An age since the *start* would be wrong: training runs for days.

A lock is per process: another process holding it is another writer, even a rank of the same
job (the ranks of a job preparing data must not all write one store: the first prepares it,
the others wait, `wait=None`, and find it done). A lock taken with `shared_by_job=True` is
shared instead by the processes of one job (`job_id`): the ranks of a multi-process training
job (the tasks of one Slurm job step, torchrun workers, the ranks Lightning launches as
subprocesses) all open the run folder; they see their own job in the file and proceed without
owning it, and only the process that created the lock touches and removes it. Two `srun` steps
of one Slurm job are two runs. A Slurm requeue keeps SLURM_JOB_ID but raises
SLURM_RESTART_COUNT, which makes it a new incarnation of the job: it takes the lock over.

The record names the holder's rank in its job (`ranks`), so that a message tells another rank
of this job from another run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmm.files.atomic import DiskFull, pid_alive, space_errno

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 600.0  # seconds without a heartbeat before a lock from another host is stale
_GUARD_STALE = 60.0  # a takeover guard file older than this was left by a process killed mid-takeover
_JOB_ENV = "MMM_JOB_ID"  # inherited by the rank processes Lightning launches, so they share the lock
_RANK_ENV = ("RANK", "SLURM_PROCID", "LOCAL_RANK")  # torchrun/Lightning, srun, a process on its node
_PROCESS_JOB = uuid.uuid4().hex


class LockHeld(RuntimeError):
    """The folder is locked by another live run (or another rank of this job, for a lock that
    is not shared by the job); `holder` is its lock record."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        super().__init__(
            f"{path.parent} is in use by another run ({describe(holder)}). Wait for it to finish or use "
            f"another folder; if that run is really gone (e.g. its host is down), delete {path}"
        )

    def __reduce__(self) -> tuple:  # picklable, so it crosses process pools and launchers intact
        return type(self), (self.path, self.holder)


def describe(holder: dict[str, Any]) -> str:
    job, ranks = holder.get("job", ""), holder.get("ranks") or {}
    rank = next(
        (f"rank {ranks[k]}" for k in ("RANK", "SLURM_PROCID") if k in ranks),
        f"local rank {ranks['LOCAL_RANK']}" if "LOCAL_RANK" in ranks else "",
    )
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        + (f", Slurm job {job.split(':')[1]}" if job.startswith("slurm:") else "")
        + (f", {rank}" if rank else "")
        + (f", command: {holder['command']}" if holder.get("command") else "")
    )


def job_id() -> str:
    """What identifies this job across its processes (see the module doc)."""
    env = os.environ
    if "SLURM_JOB_ID" in env:  # the tasks of one `srun` (job step); outside srun, the batch script
        step = env.get("SLURM_STEP_ID", "batch")
        return f"slurm:{env['SLURM_JOB_ID']}:{step}:{env.get('SLURM_RESTART_COUNT', '0')}"
    if "TORCHELASTIC_RUN_ID" in env and "MASTER_ADDR" in env:  # torchrun: one rendezvous endpoint per job
        return f"torchrun:{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}:{env['TORCHELASTIC_RUN_ID']}"
    # A plain process: its own id, or the one of the lock holder that launched it (exported
    # while the lock is held, so the ranks Lightning launches as subprocesses share the lock).
    return f"local:{env.get(_JOB_ENV, _PROCESS_JOB)}"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart;
    None where /proc is unavailable or the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, start: str | None) -> bool:
    if Path("/proc/self/stat").exists():
        now = _proc_start(pid)
        return now is not None and (start is None or now == start)
    return pid_alive(pid)


def _record(path: Path) -> dict[str, Any] | None:
    """The lock's record, None if there is no lock; a file being written reads as {}."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _stale(path: Path, holder: dict[str, Any], stale_after: float) -> bool:
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", -1)), holder.get("pid_start"))
    try:
        return time.time() - path.stat().st_mtime > stale_after
    except FileNotFoundError:
        return True


def _wait_readable(path: Path) -> dict[str, Any] | None:
    """The holder's record; waits a little for a lock being written (exclusive-create fallback)."""
    for _ in range(20):
        holder = _record(path)
        if holder != {}:
            return holder
        time.sleep(0.1)
    raise RuntimeError(f"{path}: unreadable lock file; if no run is using {path.parent}, delete it")


def _requeued(holder: dict[str, Any], record: dict[str, Any]) -> bool:
    """A Slurm requeue of the holder's job (same SLURM_JOB_ID, next restart count): Slurm
    stopped the previous incarnation before requeuing it."""
    old, new = str(holder.get("job", "")).split(":"), record["job"].split(":")
    return new[0] == old[0] == "slurm" and len(old) == len(new) and old[1] == new[1] and old[-1] != new[-1]


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock holding `record`, atomically and only if there is none. A full disk
    raises `DiskFull` naming the lock, with nothing left behind."""
    tmp = path.with_name(f".{path.name}.{record['token']}")
    try:
        return _link_into_place(tmp, path, record)
    except OSError as e:
        if code := space_errno(e):
            raise _no_space(path, code) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _no_space(path: Path, code: int) -> DiskFull:
    return DiskFull(
        code,
        f"could not create the lock {path}: {os.strerror(code)} (disk full, quota or file-size limit). "
        "No partial lock file was left: free space and run again",
    )


def _link_into_place(tmp: Path, path: Path, record: dict[str, Any]) -> bool:
    tmp.write_text(json.dumps(record, indent=1))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a filesystem without hard links: exclusive create (readers retry an empty file)
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        except BaseException:  # a partial lock would read as unreadable to every later run
            path.unlink(missing_ok=True)
            raise
        return True


def _take_over(path: Path, stale: dict[str, Any], record: dict[str, Any]) -> bool:
    """Replace the stale lock by ours. A guard file makes this exclusive: two runs that both
    found the same stale lock must not both win."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        if code := space_errno(e):
            raise _no_space(path, code) from e
        if not isinstance(e, FileExistsError):
            raise
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > _GUARD_STALE:
                guard.unlink()
        time.sleep(0.05)  # another run is taking it over right now: look again in a moment
        return False
    try:
        if _record(path) != stale:  # someone else took it over in the meantime
            return False
        log.warning("%s: taking over a stale lock (%s)", path, describe(stale))
        path.unlink(missing_ok=True)
        return _create(path, record)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


@dataclass
class Lock:
    """What `acquire_lock` yields."""

    path: Path
    record: dict[str, Any]  # the holder's record (ours when `owner`)
    owner: bool  # False for a process that joined its own job's shared lock (another rank)


def _heartbeat(lock: Lock, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        if (_record(lock.path) or {}).get("token") != lock.record["token"]:
            log.error(
                "%s: this run's lock was taken over by another run (%s)", lock.path, describe(_record(lock.path) or {})
            )
            return
        with contextlib.suppress(FileNotFoundError):
            os.utime(lock.path)


@contextlib.contextmanager
def acquire_lock(
    folder: str | Path,
    name: str = "run",
    *,
    stale_after: float = DEFAULT_STALE_AFTER,
    wait: float | None = 0.0,
    shared_by_job: bool = False,
) -> Iterator[Lock]:
    """Hold `folder/<name>.lock` for the duration of the `with` block (see the module doc).

    Raises `LockHeld` naming the holder when another live process holds it, at once by default;
    `wait` seconds (None: without limit) wait for the holder to finish first, for a step that
    another run or rank may be doing already (e.g. two jobs of a sweep building the data they
    share). `shared_by_job`: the processes of one job share the lock (a training's run folder).
    `folder` is created if missing.
    """
    folder = Path(folder)
    path = folder / f"{name}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if code := space_errno(e):
            raise _no_space(path, code) from e
        raise
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "job": job_id(),
        "command": " ".join(sys.argv),
        "pid_start": _proc_start(os.getpid()),
        "ranks": {k: os.environ[k] for k in _RANK_ENV if k in os.environ},
        "token": uuid.uuid4().hex,
    }
    lock = None
    deadline = None if wait is None else time.monotonic() + wait
    waited = False
    for _ in range(100):  # attempts at a free or stale lock; waiting for a live holder is apart
        if _create(path, record):
            lock = Lock(path, record, owner=True)
            break
        holder = _wait_readable(path)
        if holder is None:  # released in the meantime
            continue
        if _stale(path, holder, stale_after) or _requeued(holder, record):
            if _take_over(path, holder, record):
                lock = Lock(path, record, owner=True)
                break
        elif shared_by_job and holder.get("job") == record["job"]:
            lock = Lock(path, holder, owner=False)
            break
        elif deadline is None or time.monotonic() < deadline:
            if not waited:
                who = "another process of this job" if holder.get("job") == record["job"] else "another run"
                log.warning("%s: waiting for %s to finish (%s)", path, who, describe(holder))
                waited = True
            while (
                _record(path) == holder
                and not _stale(path, holder, stale_after)
                and (deadline is None or time.monotonic() < deadline)
            ):
                time.sleep(0.5)
        else:
            raise LockHeld(path, holder)
    if lock is None:
        raise RuntimeError(f"{path}: could not take the lock after 100 attempts (other runs keep taking it over)")
    # Only a shared lock hands its job to the processes launched meanwhile (Lightning's ranks).
    exported = shared_by_job and lock.owner and _JOB_ENV not in os.environ and record["job"].startswith("local:")
    if exported:
        os.environ[_JOB_ENV] = record["job"].removeprefix("local:")
    stop = threading.Event()
    if lock.owner:
        beat = threading.Thread(
            target=_heartbeat, args=(lock, stale_after / 10, stop), daemon=True, name="mmm-lock-heartbeat"
        )
        beat.start()
    try:
        yield lock
    finally:
        stop.set()
        if exported:
            os.environ.pop(_JOB_ENV, None)
        if lock.owner and (_record(path) or {}).get("token") == record["token"]:
            path.unlink(missing_ok=True)
