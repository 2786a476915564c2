"""Faults injected into preprocessing's worker processes by the tests; production code has no
hook for them. `install` wraps two functions of `mmm.data.store_writer` that the workers call
and the worker loop's wait for its next shard (`mmm.data.workers._next_job`); worker processes
fork from the process that installed them, so they run the wrapped ones:

- a file whose bytes start with a marker (`marked`) hangs inside C code (every signal blocked,
  then `pause()`: nothing in the process can interrupt it), loops forever, dies by SIGSEGV,
  aborts in C (SIGABRT), is killed as the out-of-memory killer does (SIGKILL), or takes 6 s to
  load while using a tenth of a core (a worker waiting for CPU on a busy node);
- with a pause folder, a worker stops at an armed point ("writing": it starts writing its shard;
  "idle": it has reported a shard done and waits for the next) so that a test can kill it there
  from outside. A test arms a point by creating `<folder>/<point>`; the first worker to reach it
  renames the file to `<point>.<its pid>` and waits until that file is gone.

In another process: `python -c "import fault_injection; fault_injection.preprocess_main()" <overrides>`
is `python -m mmm.preprocess <overrides>` with the faults installed (the pause folder from
`PAUSE_ENV`).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import runpy
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmm.data import store_writer, workers

KINDS = ("HANG", "SPIN", "SLOW", "SEGV", "ABRT", "KILL")
PAUSE_ENV = "MMM_TESTS_PAUSE_DIR"  # read by `preprocess_main` only
_MARK = b"MMM-TEST-"


def marked(kind: str) -> bytes:
    """The bytes of a file that faults as `kind` (one of `KINDS`) once installed, and is an
    ordinary file that is not MIDI without."""
    assert kind in KINDS, kind
    return _MARK + kind.encode() + b"\0" * 64


def fault(data: bytes) -> None:
    if not data.startswith(_MARK):
        return
    kind = data[len(_MARK) :].split(b"\0", 1)[0].decode()
    faulthandler.disable()  # no traceback dump from a deliberate crash
    if kind == "HANG":
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        ctypes.CDLL(None).pause()
    elif kind == "SPIN":
        while True:
            pass
    elif kind == "SLOW":
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            busy = time.monotonic() + 0.005
            while time.monotonic() < busy:
                pass
            time.sleep(0.045)
    elif kind == "SEGV":
        ctypes.string_at(0)  # reads address 0: a real segmentation fault
    elif kind == "ABRT":
        ctypes.CDLL(None).abort()
    elif kind == "KILL":
        os.kill(os.getpid(), signal.SIGKILL)


def pause(folder: Path, point: str) -> None:
    claim = folder / f"{point}.{os.getpid()}"
    try:
        os.rename(folder / point, claim)  # atomic: one worker claims an armed point
    except FileNotFoundError:
        return
    while claim.exists():
        time.sleep(0.05)


def install(pause_dir: str | Path | None = None, setattr: Callable[[Any, str, Any], None] = setattr) -> None:
    """Wrap the workers' functions (see the module doc); `setattr=monkeypatch.setattr` undoes
    it after the test."""
    tokenize_file = store_writer.tokenize_file

    def faulty_tokenize_file(item, *args, **kwargs):
        fault(item.data)
        return tokenize_file(item, *args, **kwargs)

    setattr(store_writer, "tokenize_file", faulty_tokenize_file)
    if pause_dir is None:
        return
    folder = Path(pause_dir)
    write_shard, next_job = store_writer.write_shard, workers._next_job

    def pausing_write_shard(*args, **kwargs):
        pause(folder, "writing")
        return write_shard(*args, **kwargs)

    jobs_asked = [0]  # per worker process (each has its copy)

    def pausing_next_job(conn):
        if jobs_asked[0]:  # not before the first shard: idle means having reported one done
            pause(folder, "idle")
        jobs_asked[0] += 1
        return next_job(conn)

    setattr(store_writer, "write_shard", pausing_write_shard)
    setattr(workers, "_next_job", pausing_next_job)


def preprocess_main() -> None:
    """`python -m mmm.preprocess`, run as that command runs (Hydra finds its configs from the
    `__main__` module's file), with the faults installed first."""
    install(os.environ.get(PAUSE_ENV))
    runpy.run_module("mmm.preprocess", run_name="__main__", alter_sys=True)
