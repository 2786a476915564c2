"""Jobs: a bounded queue in front of one dispatcher thread, which hands each job to the
generation worker process (`mmm.serve.workers`) and waits for it.

One model, one request at a time: sampling is already parallel inside torch, and two requests
on the same weights would only share the same cores. A full queue refuses new work at once
(the server answers 503 with `Retry-After`) instead of letting latency grow without bound.
A job is cancelled inside the worker's sampling loop (its `on_step` hook raises), so a
cancelled request stops within one token, not at the end of its generation.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmm.serve.errors import ApiError

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """The job was cancelled (raised inside the sampling loop, and by the wait for it)."""


@dataclass
class Job:
    task: str
    run: Callable[[Job], dict]  # does the work from the dispatcher thread, returns the result
    bars_total: int
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"  # queued | running | done | failed | cancelled
    bars_done: int = 0
    result: dict | None = None
    error: str | None = None
    error_code: str | None = None  # e.g. "invalid_request", "timeout", "worker_crashed", "internal_error"
    error_status: int | None = None  # the HTTP status the synchronous endpoints answer it with
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished_event: threading.Event = field(default_factory=threading.Event)

    def snapshot(self, with_result: bool = True) -> dict[str, Any]:
        out = {
            "id": self.id,
            "task": self.task,
            "state": self.state,
            "progress": {"bars_done": self.bars_done, "bars_total": self.bars_total},
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }
        if self.error is not None:
            out["error"] = {"code": self.error_code, "message": self.error}
        if with_result and self.result is not None:
            out["result"] = self.result
        return out

    def progress(self, bars_done: int) -> None:
        self.bars_done = min(self.bars_total, bars_done)


class Jobs:
    """Queue + dispatcher + the table of recent jobs (the `keep` most recent finished ones)."""

    def __init__(self, queue_size: int, keep: int = 64) -> None:
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.keep = keep
        self.table: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.durations: deque[float] = deque(maxlen=16)
        self.running: Job | None = None
        self.dispatcher = threading.Thread(target=self._work, name="mmm-serve-dispatcher", daemon=True)
        self.dispatcher.start()

    # -- client side ----------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(self.retry_after()) from None
            self.table[job.id] = job
            self._forget_old()
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.table.get(job_id)

    def cancel(self, job: Job) -> None:
        """A queued job is dropped when the dispatcher reaches it; a running one stops at its next token."""
        if job.state in TERMINAL:
            return
        with self.lock:  # the dispatcher moves a job to "running" under the same lock
            job.cancel_requested.set()
            queued = job.state == "queued"
        if queued:  # the dispatcher skips it; say so now
            self._finish(job, "cancelled")

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent job time (5 s before any)."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 5.0
        return max(1, math.ceil(mean))

    def stats(self) -> dict[str, Any]:
        return {
            "queued": self.queue.qsize(),
            "queue_size": self.queue.maxsize,
            "running": self.running.id if self.running else None,
        }

    def close(self) -> None:
        for job in list(self.table.values()):
            self.cancel(job)
        try:  # the dispatcher skips the cancelled jobs still queued, then reads this
            self.queue.put(None, timeout=30)
        except queue.Full:
            log.warning("the dispatcher did not drain the queue within 30 s")
            return
        self.dispatcher.join(timeout=30)

    # -- dispatcher side --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self.lock:
                if job.cancel_requested.is_set():
                    continue  # cancelled while queued: already marked
                self.running, job.state, job.started = job, "running", time.time()
            outcome: tuple = ("done",)
            try:
                job.result = job.run(job)
            except Cancelled:
                outcome = ("cancelled",)
            except ApiError as err:  # refused by the model, ended at its deadline, its worker died
                outcome = ("failed", err.message, err.code, err.status)
            except Exception as err:  # a bug: keep serving, say what happened
                log.exception("job %s failed", job.id)
                outcome = ("failed", f"internal error: {type(err).__name__}: {err}", "internal_error", 500)
            # free the dispatcher before anyone can see the job finished
            self.running = None
            self.durations.append(time.time() - job.started)
            if outcome[0] == "done":
                job.bars_done = job.bars_total
            self._finish(job, *outcome)

    def _finish(
        self, job: Job, state: str, error: str | None = None, code: str | None = None, status: int | None = None
    ) -> None:
        if job.state in TERMINAL:
            return
        job.error, job.error_code, job.error_status, job.finished = error, code, status, time.time()
        job.state = state
        job.finished_event.set()

    def _forget_old(self) -> None:
        finished = [k for k, j in self.table.items() if j.state in TERMINAL]
        for k in finished[: max(0, len(finished) - self.keep)]:
            del self.table[k]
