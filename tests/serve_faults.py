"""Faults injected into the server's worker processes by the tests (the production code has no
hook for them): `Faulty(mmm)` is what a worker loads in place of the plain model. Called in the
worker, it replaces that worker's MIDI parser (`mmm.serve.work.read_midi`) and/or the model's
`run` by versions that, on a marked upload or seed, hang inside C code with every signal
blocked (only SIGKILL ends that), read address 0 (SIGSEGV), or raise a `KeyError` (a bug).
It is pickled to the worker by reference, so this module must be importable there: the
workers inherit the test process's `sys.path`."""

from __future__ import annotations

import ctypes
import signal
from dataclasses import dataclass

from mmm.generation.api import MMM

HANG, SEGV, BUG = b"MMM-TEST-HANG", b"MMM-TEST-SEGV", b"MMM-TEST-BUG"  # upload prefixes
HANG_SEED, SEGV_SEED = 666_001, 666_002


def hang_in_c() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    ctypes.CDLL(None).pause()


def segfault() -> None:
    ctypes.string_at(0)


class FaultyParser:
    def __init__(self, read_midi) -> None:
        self.read_midi = read_midi

    def __call__(self, data: bytes, name: str = "upload"):
        if data.startswith(HANG):
            hang_in_c()
        if data.startswith(SEGV):
            segfault()
        if data.startswith(BUG):
            raise KeyError("a bug")
        return self.read_midi(data, name)


class FaultyRun:
    def __init__(self, run) -> None:
        self.run = run

    def __call__(self, request, score=None, on_step=None):
        if request.seed == HANG_SEED:
            hang_in_c()
        if request.seed == SEGV_SEED:
            segfault()
        return self.run(request, score, on_step)


@dataclass
class Faulty:
    mmm: MMM
    parse: bool = True  # the parser hangs, crashes or raises on marked uploads
    generate: bool = False  # the generation hangs or crashes on marked seeds

    def __call__(self) -> MMM:
        import mmm.serve.work as work

        if self.parse:
            work.read_midi = FaultyParser(work.read_midi)
        if self.generate:
            self.mmm.run = FaultyRun(self.mmm.run)
        return self.mmm
