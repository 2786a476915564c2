"""What runs inside a worker process (`mmm.serve.workers` starts them): the model loaded once,
then uploads read and checked, pieces analysed and requests generated, one message at a time.

Everything that touches an upload or runs the model happens here, never in the server process:
a MIDI file that hangs or crashes the parser (C++), or anything native under a generation, takes
down this process only; the server answers the request with an error and starts another.

Messages, as tuples over one duplex pipe. Server -> worker: ``(kind, seq, args)`` with kind
``check``, ``analyze`` or ``generate``, and ``("cancel", seq, None)`` while a generation runs.
Worker -> server: ``("ready", None, info)`` or ``("failed", None, reason)`` once the model is loaded, then per
request ``("progress", seq, bars_done)``... and one of ``("done", seq, result)``,
``("error", seq, error body)``, ``("cancelled", seq, None)``; ``("log", None, record)`` at any
time (the worker's log records, which the server logs as its own).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import secrets
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from miditok.constants import MIDI_INSTRUMENTS
from symusic import Score

from mmm.generation.api import MMM
from mmm.generation.request import Request as MusicRequest
from mmm.generation.request import SamplingConfig
from mmm.serve.errors import ApiError
from mmm.serve.forms import REQUEST_FIELDS
from mmm.serve.jobs import Cancelled
from mmm.serve.music import BadUpload, Measure, analyze, json_keys_to_bars, measured_output, read_midi

log = logging.getLogger("mmm.serve.work")


@dataclass
class Prepared:
    """A checked request, ready to run."""

    task: str
    values: dict[str, Any]  # decoded fields (file excluded)
    request: MusicRequest  # checked; run once per variation with its seed
    score: Score | None  # None for generate
    num_bars: int
    tracks: list[int]  # the tracks that get new notes (output indices)
    bars: list[int] | None  # the generated bars (None: all)
    bars_per_variation: int


class Work:
    """The model's side of the API."""

    def __init__(self, mmm: MMM) -> None:
        self.mmm, self.measure = mmm, Measure(mmm)

    def read(self, upload: bytes, filename: str) -> Score:
        try:
            return read_midi(upload, filename)
        except BadUpload as err:
            raise ApiError(400, "bad_midi", str(err), "file") from None

    def prepare(self, task: str, values: dict[str, Any], upload: bytes | None, filename: str) -> Prepared:
        values = {k: json_keys_to_bars(v) if k in ("controls", "track_controls") else v for k, v in values.items()}
        sampling = {k: values[k] for k in ("temperature", "top_k", "top_p") if k in values}
        try:
            request = MusicRequest(
                task, **{k: values[k] for k in REQUEST_FIELDS if k in values}, sampling=SamplingConfig(**sampling)
            )
            score = None if task == "generate" else self.read(upload, filename)
            plan, score, _ = self.mmm.check(request, score)
        except (ValueError, TypeError) as err:
            raise ApiError(422, "invalid_field", str(err), getattr(err, "field", "file")) from None
        self._check_pitch_range(request.pitch_range)
        if task == "infill":
            tracks, bars = plan.tracks, sorted(b for a, e in plan.spans for b in range(a, e))
        else:
            tracks, bars = [len(score.tracks)] if task == "add_track" else list(range(len(plan.programs))), None
        return Prepared(task, values, request, score, plan.num_bars, tracks, bars, plan.generated_bars)

    def _check_pitch_range(self, pitch_range: Any) -> None:
        """A range with no pitch the tokenizer has would make every generated bar empty."""
        low, high = self.mmm.tokenizer.config.pitch_range
        if isinstance(pitch_range, list) and (pitch_range[1] < low or pitch_range[0] > high):
            raise ApiError(
                422,
                "invalid_field",
                f"pitch_range={pitch_range}: the model writes no pitch in it (its tokenizer's pitches are "
                f"{low}..{high}, see /v1/info)",
                "pitch_range",
            )

    def check(self, task: str, values: dict[str, Any], upload: bytes | None, filename: str) -> int:
        """Bars the request will write (per variation), or the ApiError saying why it cannot run."""
        return self.prepare(task, values, upload, filename).bars_per_variation

    def analyze(self, upload: bytes, filename: str) -> dict[str, Any]:
        score = self.read(upload, filename)
        try:
            return analyze(self.mmm, score, self.measure)
        except ValueError as err:  # e.g. no note the tokenizer can represent
            raise ApiError(422, "unusable_midi", f"{filename}: {err}", "file") from None

    def generate(self, prep: Prepared, on_step: Callable[[Sequence[Any]], None]) -> dict[str, Any]:
        v = prep.values
        base_seed = v.get("seed")
        if base_seed is None:
            base_seed = secrets.randbelow(2**31)
        variations, grid_warning = [], None
        for k in range(v.get("num_variations", 1)):
            seed = base_seed + k
            try:
                generation = self.mmm.run(dataclasses.replace(prep.request, seed=seed), prep.score, on_step)
            except ValueError as err:  # a request the model refused (a bad value found late)
                raise ApiError(422, "invalid_request", str(err)) from None
            out, report = generation.scores[0], generation.report
            grid_warning = report.bar_grid_warning  # MMM.run also logged it
            variations.append(
                {
                    "seed": seed,
                    "midi": base64.b64encode(out.dumps_midi()).decode("ascii"),
                    "regions": [list(r) for r in report.regions[0]],  # (track, start tick, end tick) rewritten
                    "controls": {
                        "requested": {"controls": v.get("controls"), "track_controls": v.get("track_controls")},
                        "measured": measured_output(self.measure, out, prep.num_bars, prep.tracks, prep.bars),
                    },
                    "timings": report.summary(),
                }
            )
        return {
            "task": prep.task,
            "num_bars": prep.num_bars,
            "bar_grid_warning": grid_warning,
            "request": v,
            "variations": variations,
        }

    def info(self) -> dict[str, Any]:
        """The model's part of /v1/info: sizes, tokenizer, controls with their values, programs."""
        mmm, tok = self.mmm, self.mmm.tokenizer
        config = mmm.model.config
        return {
            "model": {
                "parameters": sum(p.numel() for p in mmm.model.parameters()),
                "context": config.max_seq_len,
                "hidden_size": config.hidden_size,
                "layers": config.num_layers,
                "vocab_size": config.vocab_size,
            },
            "tokenizer": {
                "vocab_size": len(tok),
                "bpe": tok.is_trained,
                "max_bar_tokens": mmm.max_bar_tokens,
                "time_signatures": sorted(
                    (t.split("_", 1)[1] for t in tok.vocab if t.startswith("TimeSig_")),
                    key=lambda s: tuple(int(x) for x in s.split("/"))[::-1],
                ),
                "pitch_range": list(tok.config.pitch_range),
            },
            "controls": {
                "bar": {k: _control(c) for k, c in mmm.controls.bar.items()},
                "track": {k: _control(c) for k, c in mmm.controls.track.items()},
            },
            "programs": [
                {"program": p, "name": "Drums" if p < 0 else MIDI_INSTRUMENTS[p]["name"]} for p in tok.config.programs
            ],
        }


def _control(ctl) -> dict[str, Any]:
    values = list(ctl.values) if ctl.kind == "durations" else sorted(ctl.values)
    return {"kind": ctl.kind, "values": values, "at_least": ctl.at_least, "describe": ctl.describe()}


# --- the worker process -------------------------------------------------------------------------------
class Channel:
    """The worker's end of the pipe; sends are serialised (log records may come from any thread)."""

    def __init__(self, conn) -> None:
        self.conn, self.lock = conn, threading.Lock()

    def send(self, *message: Any) -> None:
        with self.lock:
            self.conn.send(message)


class ForwardLogs(logging.Handler):
    """Hands the worker's log records to the server, which logs them as its own."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = ("name", "levelno", "levelname", "pathname", "lineno", "funcName", "created", "process")
            data = {k: getattr(record, k) for k in fields}
            data["msg"] = record.getMessage()
            data["exc_text"] = logging.Formatter().formatException(record.exc_info) if record.exc_info else None
            self.channel.send("log", None, data)
        except OSError:  # the server closed the pipe (it is stopping this worker): nobody to tell
            pass
        except Exception:
            self.handleError(record)


class Progress:
    """`MMM.on_step` in a worker: sends the bars written so far when they change, and stops the
    sampling loop (raising `Cancelled`) once the server asks: a cancel is the only message the
    server sends while a generation runs. Bars of earlier generations (segments, variations)
    stay counted: their grammars are kept."""

    def __init__(self, channel: Channel, seq: int, total: int) -> None:
        self.channel, self.seq, self.total = channel, seq, total
        self.seen: dict[int, Any] = {}
        self.done = 0

    def __call__(self, grammars: Sequence[Any] | None) -> None:
        if self.channel.conn.poll() and self.channel.conn.recv() == ("cancel", self.seq, None):
            raise Cancelled()
        for g in grammars or ():
            self.seen.setdefault(id(g), g)
        done = min(self.total, sum(g.bars_done for g in self.seen.values()))
        if done != self.done:
            self.done = done
            self.channel.send("progress", self.seq, done)


def answer(work: Work, channel: Channel, kind: str, seq: int, args: tuple) -> tuple:
    try:
        if kind == "generate":
            prep = work.prepare(*args)
            progress = Progress(channel, seq, prep.bars_per_variation * prep.values.get("num_variations", 1))
            return ("done", seq, work.generate(prep, progress))
        if kind in ("check", "analyze"):
            return ("done", seq, getattr(work, kind)(*args))
        raise ValueError(f"unknown message {kind!r}")
    except ApiError as err:
        return ("error", seq, err.body())
    except Cancelled:
        return ("cancelled", seq, None)
    except Exception as err:  # a bug: say what happened, keep serving
        log.exception("%s failed", kind)
        message = f"internal error: {type(err).__name__}: {err} (a bug: the server log has the details)"
        return ("error", seq, ApiError(500, "internal_error", message).body())


def main(conn, model: MMM | Callable[[], MMM], log_level: int) -> None:
    """A worker process: load the model, then answer messages until the server closes the pipe."""
    # The server ends its workers itself; Ctrl+C in a terminal reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(conn)
    root = logging.getLogger()
    root.handlers[:] = [ForwardLogs(channel)]
    root.setLevel(log_level)
    try:
        work = Work(model if isinstance(model, MMM) else model())
        info = work.info()
    except Exception as err:
        log.exception("loading the model failed")
        with contextlib.suppress(OSError):  # the server may have stopped waiting
            channel.send("failed", None, f"{type(err).__name__}: {err}")
        return
    channel.send("ready", None, info)
    while True:
        try:
            kind, seq, args = conn.recv()
        except (EOFError, OSError):  # the server closed its end, or is gone
            return
        if kind != "cancel":  # a cancel that arrived after its generation ended
            channel.send(*answer(work, channel, kind, seq, args))
