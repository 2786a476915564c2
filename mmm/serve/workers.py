"""The server's side of its worker processes (`mmm.serve.work` is theirs).

Each worker loads the model once and answers one message at a time. A call has a deadline: a
worker still busy at it (a hang, even inside C code, where nothing in the process itself could
stop it) is killed; a worker that dies (a segfault in the MIDI parser, the out-of-memory
killer) is noticed at once through its process sentinel. Either way the call answers with an
`ApiError` (504 `timeout`, 500 `worker_crashed`) and a new worker is started in its place: the
next call waits until it has loaded the model.

Workers are forked from a fork server started once per server process (the `forkserver`
start method), which has imported torch and the model code already: a new worker imports
nothing, it only loads the model, and it never inherits the threads or locks of the server
process (plain `fork` of a threaded process can deadlock the child).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from threading import Event
from typing import Any

from mmm.serve.errors import ApiError
from mmm.serve.jobs import Cancelled
from mmm.serve.work import main

log = logging.getLogger("mmm.serve")

POLL_S = 0.05  # how often a waiting call looks at its deadline and at cancel requests
CANCEL_GRACE_S = 5.0  # a worker that has not stopped sampling this long after a cancel is killed
LOAD_TIMEOUT_S = 300.0  # a call waits this long for a new worker to load the model (its own deadline starts after)


def worker_context():
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mmm.serve.work"])  # only effective before the fork server starts
    return context


class Died(Exception):
    pass


class Late(Exception):
    pass


class Worker:
    """One worker process and the server's end of its pipe; used by one thread at a time.

    `model` is what the worker loads: an `MMM` (pickled to it) or a picklable function that
    returns one (e.g. `functools.partial(MMM.from_pretrained, folder)`)."""

    def __init__(self, name: str, model: Any, context, log_level: int) -> None:
        self.name, self.model, self.context, self.log_level = name, model, context, log_level
        self.process = self.conn = None
        self.ready, self.info, self.seq, self.restarts = False, None, 0, 0

    # -- life --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process; it loads the model on its own (`wait_ready`)."""
        conn, child = self.context.Pipe()
        self.process = self.context.Process(
            target=main, args=(child, self.model, self.log_level), name=self.name, daemon=True
        )
        self.process.start()
        child.close()
        self.conn, self.ready = conn, False

    def wait_ready(self, deadline: float | None = None) -> dict:
        """The worker's model info once it has loaded the model; `RuntimeError` if it could not."""
        while not self.ready:
            message = self._receive(deadline)
            if message is not None and message[0] == "ready":
                self.ready, self.info = True, message[2]
            elif message is not None and message[0] == "failed":
                raise RuntimeError(message[2])
        return self.info

    def stop(self, wait_s: float = 5.0) -> None:
        if self.process is None:
            return
        self.conn.close()  # a worker waiting for a message reads the end of the pipe and exits
        self.process.join(timeout=wait_s)
        if self.process.is_alive():  # busy, or hung
            self.process.kill()
            self.process.join()
        self.process = None

    def restart(self) -> None:
        self.process.kill()  # no goodbye: it may be hung
        self.stop()
        self.restarts += 1
        self.start()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    # -- calls -------------------------------------------------------------------------------------
    def call(
        self,
        kind: str,
        args: tuple,
        timeout: float,
        what: str,
        hint: str,
        field: str | None = None,
        progress: Callable[[int], None] | None = None,
        cancel: Event | None = None,
    ) -> Any:
        """Send `(kind, args)` and wait for the answer: its result, or an `ApiError` (the worker's
        own refusal, or the timeout or death of the worker, described by `what` and `hint`).
        `progress` gets the bars written so far; once `cancel` is set the worker is asked to stop
        (`Cancelled`)."""
        if self.process is None:  # never started: the app ran without its lifespan
            self.start()
        elif not self.process.is_alive():  # died while idle (e.g. the out-of-memory killer): this call need not fail
            log.warning("%s died while idle (%s); starting another", self.name, self._how_it_died())
            self.restart()
        try:
            self.wait_ready(time.monotonic() + LOAD_TIMEOUT_S)
        except Late:
            raise ApiError(
                503,
                "worker_starting",
                "the model is still loading in a new worker process; retry in a few seconds",
                headers={"Retry-After": "5"},
            ) from None
        except (Died, RuntimeError) as err:
            self.restart()
            raise ApiError(503, "worker_unavailable", f"the worker process could not start: {err}") from None
        self.seq += 1
        deadline = time.monotonic() + timeout
        try:
            self.conn.send((kind, self.seq, args))
            return self._answer(deadline, progress, cancel)
        except (Died, OSError) as err:
            how = str(err) if isinstance(err, Died) else self._how_it_died()
            log.error("%s died while %s (%s); starting another", self.name, what, how)
            self.restart()
            raise ApiError(
                500,
                "worker_crashed",
                f"the worker process died ({how}) while {what}; {hint}. A new worker replaces it: the server goes on",
                field,
            ) from None
        except Late:
            log.error("%s ran over %.3g s while %s; killed, starting another", self.name, timeout, what)
            self.restart()
            raise ApiError(
                504, "timeout", f"{what} ran over the server's limit of {timeout:g} s and was stopped; {hint}", field
            ) from None

    def _answer(self, deadline: float, progress, cancel: Event | None) -> Any:
        cancelled_at = None
        while True:
            if cancel is not None and cancel.is_set() and cancelled_at is None:
                self.conn.send(("cancel", self.seq, None))
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                log.error(
                    "%s did not stop within %g s of a cancel; killed, starting another", self.name, CANCEL_GRACE_S
                )
                self.restart()
                raise Cancelled()
            message = self._receive(deadline)
            if message is None or message[1] != self.seq:
                continue
            tag, _, payload = message
            if tag == "progress" and progress is not None:
                progress(payload)
            elif tag == "done":
                return payload
            elif tag == "error":
                raise ApiError.from_body(payload)
            elif tag == "cancelled":
                raise Cancelled()

    def _receive(self, deadline: float | None) -> tuple | None:
        """The worker's next message, or None after `POLL_S` without one (its log records are
        logged here); `Died` once it is gone, `Late` past `deadline`."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise Late()
        ready = wait([self.conn, self.process.sentinel], POLL_S if deadline is None else min(POLL_S, deadline - now))
        if not ready:
            return None
        if self.conn.poll():  # what it sent before dying is read first
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                raise Died(self._how_it_died()) from None
            if message[0] != "log":
                return message
            record = message[2]
            logger = logging.getLogger(record["name"])
            if logger.isEnabledFor(record["levelno"]):
                logger.handle(logging.makeLogRecord({**record, "processName": self.name}))
            return None
        raise Died(self._how_it_died())

    def _how_it_died(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            try:
                return f"signal {-code}, {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"


class Pool:
    """Interchangeable workers: a call takes an idle one, waiting until one is free."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.idle: queue.Queue[Worker] = queue.Queue()
        for w in workers:
            self.idle.put(w)

    def call(self, *args, **kwargs) -> Any:
        worker = self.idle.get()
        try:
            return worker.call(*args, **kwargs)
        finally:
            self.idle.put(worker)
