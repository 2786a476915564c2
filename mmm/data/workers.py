"""Shards of files worked on in worker processes watched from outside, so that no single file
can stop a preprocessing run (docs/reliability.rst, "Files that hang or crash").

Nothing inside a process can interrupt a parser that hangs in C code, and nothing inside it
survives a segmentation fault or the out-of-memory killer; so the work runs in worker processes
and the main process (`Supervisor`) watches them. A worker tells it which file it starts
(`starting`); the supervisor kills a worker that spent `timeout` seconds of its own CPU time on
one file, or that long without using any, and rejects that file as `timeout`; a worker that dies
on a file gets the file rejected as `crashed`. Either way a fresh worker redoes the shard without
that file. A worker that dies on none of its files (writing its shard, idle) is replaced and its
shard redone as it was, at most `MAX_SHARD_TRIES` times.

What a shard is and how it is written is the caller's (`mmm.data.store_writer`): the work
function, run in the workers, and the claim on a shard, held in the main process while a worker
is on it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# A shard whose worker died this many times while on no file of it (e.g. the out-of-memory
# killer while it built the shard's table) fails the run: its next try would likely die too.
MAX_SHARD_TRIES = 3

Job = tuple[int, range]  # a shard and the indices of its files


class ShardWork(Protocol):
    """What a worker runs for each shard: process `files` (those in `skip` hung or crashed a
    worker before: report them as given), calling `starting(i)` before file i and
    `starting(-1)` once on no file (writing the shard); returns the shard's report."""

    def __call__(self, shard: int, files: range, skip: Mapping[int, dict], starting: Callable[[int], None]) -> dict: ...


# ----------------------------------------------------------------------------- worker side


def _die_with_parent() -> None:
    """Linux: die with the parent (a killed run must not leave workers writing its shards)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _next_job(conn) -> tuple[int, range, Mapping[int, dict]] | None:
    """The next shard to do, or None: told to stop, or the main process is gone."""
    try:
        return conn.recv()
    except EOFError:
        return None


def _worker_main(conn, work: ShardWork | None, setup: tuple | None) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if work is None:  # spawned: nothing inherited, the work is built here
        build, *args = setup
        work = build(*args)
    while (job := _next_job(conn)) is not None:
        shard, files, skip = job
        try:
            report = work(shard, files, skip, lambda i: conn.send(("file", i)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return
        conn.send(("done", report))


# ----------------------------------------------------------------------------- main side


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc; None elsewhere or once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


@dataclass
class _Worker:
    """A worker process as the main process sees it: the shard it is on (with the claim held
    for it) and the file it is on, with what tells a hang from a slow file."""

    proc: Any
    conn: Any
    job: Job | None = None
    claim: contextlib.ExitStack | None = None
    file: int = -1  # index of the file in progress, -1 for none
    since: float = 0.0
    cpu_since: float | None = None  # the worker's CPU seconds when it started the file
    cpu_seen: float | None = None  # its CPU seconds when last seen advancing...
    seen_at: float = 0.0  # ...and when that was

    def start_file(self, file: int) -> None:
        self.file, self.since = file, time.monotonic()
        self.cpu_since = self.cpu_seen = cpu_seconds(self.proc.pid)
        self.seen_at = self.since

    def hung(self, timeout: float) -> bool:
        """On its file for over `timeout` seconds of its own CPU time (a loop), or without using
        any CPU for `timeout` seconds (blocked). Wall time alone would also condemn a worker that
        only waits for a core on an oversubscribed node, and the files kept would depend on the
        machine's load. Without /proc: wall time."""
        now = time.monotonic()
        cpu = cpu_seconds(self.proc.pid)
        if cpu is None or self.cpu_since is None:
            return now - self.since > timeout
        if cpu > self.cpu_seen:
            self.cpu_seen, self.seen_at = cpu, now
        return cpu - self.cpu_since > timeout or now - self.seen_at > timeout

    def release(self) -> None:
        """The shard is no longer this worker's: its claim is let go."""
        if self.claim is not None:
            self.claim.close()
        self.job, self.claim, self.file = None, None, -1


@dataclass
class _Jobs:
    """The shards still to do, the files that hung or crashed a worker (per shard), and how
    often a shard's worker died while on none of its files."""

    pending: deque
    skips: dict[int, dict[int, dict]] = field(default_factory=dict)
    deaths: Counter = field(default_factory=Counter)


class Supervisor:
    """Runs shards in `num_workers` worker processes and survives any single file (module doc).

    `work` runs in the workers (inherited where processes fork; where they are spawned,
    `setup = (build, *args)` builds it in each worker instead). `claim(shard)` is entered in
    the main process before a worker gets the shard and left once the shard is done or given
    up; it yields False when the shard needs no work after all (done by another task
    meanwhile). `file_name(i)` names file i in the report of a file that hung or crashed.
    `where` ends error messages ("shard 3 of <where>")."""

    def __init__(
        self,
        work: ShardWork,
        *,
        num_workers: int,
        timeout: float,
        claim: Callable[[int], contextlib.AbstractContextManager[bool]],
        file_name: Callable[[int], str],
        where: str,
        setup: tuple | None = None,
    ) -> None:
        # fork where available: workers start at once with the parent's state (spawn re-imports).
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        if method == "spawn" and setup is None:
            raise ValueError("worker processes are spawned on this platform: give `setup` to build the work in them")
        self._ctx = mp.get_context(method)
        self._worker_args = (work, None) if method == "fork" else (None, setup)
        self.num_workers, self.timeout = num_workers, timeout
        self.claim, self.file_name, self.where = claim, file_name, where
        self._workers: list[_Worker] = []
        self._jobs = _Jobs(deque())

    def run(self, jobs: list[Job], on_done: Callable[[dict], None]) -> None:
        """Do `jobs`, calling `on_done(report)` as each shard is done."""
        self._jobs = _Jobs(deque(jobs))
        finished = False
        try:
            self._workers = [self._start() for _ in range(min(self.num_workers, len(jobs)))]
            while self._jobs.pending or any(w.job for w in self._workers):
                for w in self._workers:
                    if w.job is None:
                        self._assign(w)
                ready = self._wait()
                if ready is None:
                    continue
                for i, w in enumerate(self._workers):
                    if w.job is not None:
                        self._attend(i, w, ready, on_done)
            for w in self._workers:
                self._send(w, None)  # one killed while idle has nothing left to do: its exit code is not looked at
            finished = True
        finally:
            self._shut_down(finished)

    # -- the pieces of `run` ------------------------------------------------------------

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, *self._worker_args), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    @staticmethod
    def _send(w: _Worker, message) -> None:
        with contextlib.suppress(ConnectionError):  # BrokenPipeError, ConnectionResetError: a dead worker
            w.conn.send(message)

    def _assign(self, w: _Worker) -> None:
        """Give the idle worker the next shard that still needs work, under its claim."""
        while self._jobs.pending and w.job is None:
            shard, files = self._jobs.pending.popleft()
            claim = contextlib.ExitStack()
            if not claim.enter_context(self.claim(shard)):  # raises if another run holds the shard
                claim.close()
                continue
            w.job, w.claim, w.file, w.since = (shard, files), claim, -1, time.monotonic()
            # A worker killed while idle cannot take the job: the send fails, or the job waits
            # unread in the pipe. Either way its death is seen later, as if it died on the shard.
            self._send(w, (shard, files, self._jobs.skips.get(shard, {})))

    def _wait(self) -> list | None:
        """The pipes and process sentinels that are ready; None when no worker is busy. A
        worker on a file is looked at every second at least (its CPU time is sampled)."""
        busy = [w for w in self._workers if w.job is not None]
        if not busy:
            return None
        timeout = min(1.0, self.timeout) if any(w.file >= 0 for w in busy) else None
        return wait([x for w in busy for x in (w.conn, w.proc.sentinel)], timeout=timeout)

    def _attend(self, i: int, w: _Worker, ready: list, on_done: Callable[[dict], None]) -> None:
        """Read the busy worker's messages, then replace it if it died or hangs."""
        dead = w.proc.sentinel in ready
        # A dead worker's last messages (the file it started) are read before its death is judged.
        while (dead or w.conn in ready) and w.conn.poll():
            try:
                kind, payload = w.conn.recv()
            except (EOFError, ConnectionError):
                dead = True
                break
            if kind == "file":
                w.start_file(payload)
            elif kind == "done":
                on_done(payload)
                w.release()
                return
            else:
                raise RuntimeError(f"preprocessing failed on shard {w.job[0]} of {self.where}:\n{payload}")
        if dead:
            w.proc.join()
            code = w.proc.exitcode
            self._lost(w, "crashed", signal_name(-code) if code and code < 0 else f"exit code {code}")
        elif w.file >= 0 and w.hung(self.timeout):
            # Killed from here: a hang inside C code ignores anything the worker could do itself.
            w.proc.kill()
            w.proc.join()
            self._lost(
                w,
                "timeout",
                f"over file_timeout={self.timeout:g}s of CPU time, or that long without using any: the worker was killed",
            )
        else:
            return
        w.conn.close()
        self._workers[i] = self._start()

    def _lost(self, w: _Worker, reason: str, how: str) -> None:
        """The worker is gone. On a file: that file is rejected and the shard redone without
        it. On none (before its first, writing the shard, or killed while idle and then given
        the shard): the shard is redone as it was, unless that was its MAX_SHARD_TRIES-th such
        death: then the run fails."""
        shard, files = w.job
        if w.file >= 0:
            try:
                name = self.file_name(w.file)
            except Exception:  # noqa: BLE001 - the name is only for the report
                name = f"#{w.file}"
            detail = f"{how}: the worker process died on this file" if reason == "crashed" else how
            log.warning("%s: %s (%s); the other files go on", name, reason, detail)
            self._jobs.skips.setdefault(shard, {})[w.file] = {"name": name, "reason": reason, "detail": detail}
        else:
            self._jobs.deaths[shard] += 1
            if self._jobs.deaths[shard] >= MAX_SHARD_TRIES:  # `_shut_down` lets its claim go
                raise RuntimeError(
                    f"preprocessing workers died {self._jobs.deaths[shard]} times on shard {shard} of {self.where} "
                    f"while on none of its files (last: {how}), e.g. killed by the out-of-memory killer while "
                    "building or writing the shard: give the run more memory or lower data.preprocess.shard_size "
                    "or num_workers, then re-run (finished shards are kept)"
                )
            log.warning(
                "a preprocessing worker died on shard %d while on none of its files (%s); the shard is redone",
                shard,
                how,
            )
        self._jobs.pending.appendleft((shard, files))
        w.release()

    def _shut_down(self, finished: bool) -> None:
        """Normally the workers are idle and told to stop; after an error they are killed, and
        the claims on their shards let go only once they are dead."""
        for w in self._workers:
            w.proc.join(timeout=10 if finished else 0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.release()
