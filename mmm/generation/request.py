"""One generation request, checked in one place: `MMM.infill/add_track/generate` build a
`Request` and run it, `python -m mmm.sample` checks its config as a `Request` before loading the
model, and the server checks each HTTP request as one (its 422 answers name `RequestError.field`).

`check_request` resolves a request against a tokenizer (and the input score) into a `Plan`: the
track indices, spans, programs and attribute-control ids a generation needs. It needs no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from miditok.constants import MIDI_INSTRUMENTS
from symusic import Score

from mmm.controls.table import Controls

TASKS = ("infill", "add_track", "generate")


@dataclass
class SamplingConfig:
    """How each next id is drawn: the one place of the sampling defaults (the API's keyword
    arguments, `python -m mmm.sample`, `mmm.evaluate` and the server take theirs from here)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = 0.95

    def check(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")


class RequestError(ValueError):
    """A request that cannot run; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def describe_tracks(score: Score) -> str:
    return ", ".join(
        f"{i}: {t.name or '?'!r} ({'drums' if t.is_drum else f'program {t.program}'}, {len(t.notes)} notes)"
        for i, t in enumerate(score.tracks)
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_tracks(track: int | Sequence[int], score: Score) -> list[int]:
    tracks = [track] if _is_int(track) else list(track) if isinstance(track, Sequence) else [track]
    if not tracks:
        raise RequestError("track", "track: give a track index or a non-empty list of them")
    n = len(score.tracks)
    for t in tracks:
        if not _is_int(t) or not 0 <= t < n:
            raise RequestError(
                "track",
                f"unknown track {t!r}: the score has {n} track(s), valid indices 0..{n - 1} ({describe_tracks(score)})",
            )
    if len(set(tracks)) != len(tracks):
        raise RequestError("track", f"track: duplicated index in {tracks}")
    return [int(t) for t in tracks]


def check_spans(bars: Sequence, num_bars: int) -> list[tuple[int, int]]:
    """`(start, end)` or a list of them -> validated, non-overlapping spans."""
    if isinstance(bars, Sequence) and len(bars) == 2 and all(_is_int(x) for x in bars):
        spans = [tuple(bars)]
    elif isinstance(bars, Sequence) and len(bars) > 0 and all(isinstance(s, Sequence) and len(s) == 2 for s in bars):
        spans = [tuple(s) for s in bars]
    else:
        raise RequestError("bars", f"bars must be (start, end) or a list of (start, end) spans, got {bars!r}")
    out = []
    for a, b in spans:
        if not (_is_int(a) and _is_int(b)) or not 0 <= a < b <= num_bars:
            raise RequestError(
                "bars",
                f"bars ({a}, {b}) out of range: the piece has {num_bars} bars; a span is "
                f"(start, end) with 0 <= start < end <= {num_bars} (end excluded)",
            )
        out.append((int(a), int(b)))
    ordered = sorted(out)
    for (_a1, b1), (a2, _) in zip(ordered, ordered[1:]):
        if a2 < b1:
            raise RequestError("bars", f"bars: spans {ordered} overlap")
    return out


def check_program(program: Any, tokenizer=None, field: str = "program") -> int:
    allowed = tokenizer.config.programs if tokenizer is not None else range(-1, 128)
    if not _is_int(program) or program not in allowed:
        raise RequestError(field, f"program {program!r} is not valid: use -1 (drums) or a General MIDI program 0..127")
    return int(program)


def time_signature_id(tokenizer, ts: str | Sequence[int]) -> int:
    """Base id of the `TimeSig_<n>/<d>` token of `ts` ("3/4" or (3, 4))."""
    text = ts if isinstance(ts, str) else "/".join(str(x) for x in ts)
    base = tokenizer.vocab.get(f"TimeSig_{text}")
    if base is None:
        valid = sorted(t.split("_", 1)[1] for t in tokenizer.vocab if t.startswith("TimeSig_"))
        raise RequestError(
            "time_signature", f"time_signature {text!r} is not in the tokenizer's vocabulary; valid: {valid}"
        )
    return base


@dataclass
class Request:
    """What to generate and how. `track`/`bars`/`bars_before`/`bars_after`: infill;
    `program`: add_track; `programs`/`num_bars`/`time_signature`/`tempo`/`tpq`: generate.
    `controls`/`track_controls`: one mapping, or a list with one per generated track."""

    task: str
    track: Any = 0
    bars: Any = (0, 4)
    program: Any = 0
    programs: Any = (0,)
    num_bars: Any = 16
    time_signature: Any = "4/4"
    tempo: Any = 120.0
    tpq: Any = 480
    controls: Any = None
    track_controls: Any = None
    bars_before: Any = None
    bars_after: Any = None
    num_variations: Any = 1
    seed: Any = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_bar_tokens: Any = None  # None: the model's own
    clip_notes: bool = True
    # The generated track's character, kept by the grammar: its pitch range (True: the track's own
    # notes in the piece, RANGE_MARGIN semitones wider; a new track: its instrument's range; a
    # (low, high) pair; False: none), and monophony (None: as the track is in the piece, a new
    # track free; True / False: force).
    pitch_range: Any = True
    monophonic: Any = None


RANGE_MARGIN = 3  # semitones a track may go beyond its own lowest and highest notes


@dataclass(frozen=True)
class Character:
    """What a generated track keeps of itself: a pitch range (lowest, highest) and monophony."""

    pitch_range: tuple[int, int] | None = None
    monophonic: bool = False


def character(request: Request, program: int, notes: dict[str, np.ndarray] | None = None) -> Character:
    """The character a generation keeps for a track of `program` whose notes in the piece are
    `notes` (note arrays: time, pitch...; None for a new track), as `request` asks."""
    if program < 0:  # drums: neither a pitch range nor monophony means anything
        return Character()
    pitches = notes["pitch"] if notes is not None and len(notes["pitch"]) else None
    if request.pitch_range is False:
        pitch_range = None
    elif request.pitch_range is not True:
        pitch_range = tuple(int(p) for p in request.pitch_range)
    elif pitches is not None:
        pitch_range = (max(0, int(pitches.min()) - RANGE_MARGIN), min(127, int(pitches.max()) + RANGE_MARGIN))
    else:  # a new track: its instrument's range
        span = MIDI_INSTRUMENTS[program]["pitch_range"]
        pitch_range = (span.start, span.stop - 1)
    monophonic = request.monophonic
    if monophonic is None:  # as the track is: no two notes starting together
        onsets = notes["time"] if pitches is not None else None
        monophonic = onsets is not None and len(onsets) > 1 and len(np.unique(onsets)) == len(onsets)
    return Character(pitch_range, bool(monophonic))


@dataclass
class Plan:
    """A checked request: what each generation step needs, in ids."""

    request: Request
    tracks: list[int] = field(default_factory=list)  # infill: the score's tracks to rewrite
    spans: list[tuple[int, int]] = field(default_factory=list)  # infill: bar spans
    programs: list[int] = field(default_factory=list)  # add_track / generate: one per new track
    num_bars: int = 0  # bars of the piece (generate: of the new piece)
    time_signature: int | None = None  # generate: base id of its TimeSig token
    bar_acs: list[dict[int, list[int]]] = field(default_factory=list)  # per generated track: bar -> AC ids
    track_acs: list[list[int]] = field(default_factory=list)  # per generated track
    characters: list[Character] = field(default_factory=list)  # per generated track

    @property
    def generated_bars(self) -> int:
        """Bars to write in all (tracks x bars), e.g. for a server's size limits."""
        per_track = sum(b - a for a, b in self.spans) if self.request.task == "infill" else self.num_bars
        return per_track * max(len(self.tracks), len(self.programs))


def _per_track(value: Any, n: int, name: str, what: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise RequestError(name, f"{name}: a list needs one mapping per {what} ({n}), got {len(value)}")
        return list(value)
    return [value] * n


def _controls(controls: Controls | None, request: Request, n: int, bars: Sequence[int], what: str):
    bar_ctl = _per_track(request.controls, n, "controls", what)
    track_ctl = _per_track(request.track_controls, n, "track_controls", what)
    bar_acs, track_acs = [], []
    if controls is None:  # no tokenizer at hand: only the shape is checked
        return [{} for _ in range(n)], [[] for _ in range(n)]
    for b, t in zip(bar_ctl, track_ctl):
        try:
            bar_acs.append(controls.bar_ids(b, bars))
        except ValueError as err:
            raise RequestError("controls", str(err)) from None
        try:
            track_acs.append(controls.track_ids(t))
        except ValueError as err:
            raise RequestError("track_controls", str(err)) from None
    return bar_acs, track_acs


def _check_run_settings(request: Request) -> None:
    for name in ("bars_before", "bars_after"):
        v = getattr(request, name)
        if v is not None and (not _is_int(v) or v < 0):
            raise RequestError(name, f"{name} must be None or an integer >= 0, got {v!r}")
    if not _is_int(request.num_variations) or request.num_variations < 1:
        raise RequestError(
            "num_variations", f"num_variations must be a positive integer, got {request.num_variations!r}"
        )
    pitch_range = request.pitch_range
    if not isinstance(pitch_range, bool) and not (
        isinstance(pitch_range, Sequence)
        and len(pitch_range) == 2
        and all(_is_int(p) and 0 <= p <= 127 for p in pitch_range)
        and pitch_range[0] <= pitch_range[1]
    ):
        raise RequestError(
            "pitch_range",
            f"pitch_range must be true (the track's own range), false (none) or [low, high] MIDI pitches "
            f"with 0 <= low <= high <= 127, got {pitch_range!r}",
        )
    if request.monophonic is not None and not isinstance(request.monophonic, bool):
        raise RequestError(
            "monophonic", f"monophonic must be true, false or null (as the track is), got {request.monophonic!r}"
        )
    if request.seed is not None and not _is_int(request.seed):
        raise RequestError("seed", f"seed must be an integer or None, got {request.seed!r}")
    if request.max_bar_tokens is not None and (not _is_int(request.max_bar_tokens) or request.max_bar_tokens < 4):
        raise RequestError("max_bar_tokens", f"max_bar_tokens must be an integer >= 4, got {request.max_bar_tokens!r}")
    try:
        request.sampling.check()
    except ValueError as err:
        raise RequestError(str(err).split(" ", 1)[0], str(err)) from None


def check_request(
    request: Request,
    tokenizer,
    controls: Controls | None,
    score: Score | None = None,
    num_bars: int | None = None,
    bar_ticks: Sequence[int] | None = None,
) -> Plan:
    """Resolve `request` into a `Plan`, or raise `RequestError`. infill and add_track need the
    input `score` and its number of bars as the model counts them (`num_bars`); with their start
    ticks in the score (`bar_ticks`, the end of the last one after them) an infilled track keeps
    the range of its notes outside the spans it rewrites, else of all its notes. Without a
    tokenizer (and controls), programs are checked against General MIDI, and the controls and
    time signature are left to the check with the model."""
    if request.task not in TASKS:
        raise RequestError("task", f"task={request.task!r}: expected one of {', '.join(TASKS)}")
    _check_run_settings(request)
    plan = Plan(request)
    if request.task == "infill":
        plan.tracks = check_tracks(request.track, score)
        plan.num_bars = num_bars
        plan.spans = check_spans(request.bars, num_bars)
        generated = [b for a, e in plan.spans for b in range(a, e)]
        plan.bar_acs, plan.track_acs = _controls(controls, request, len(plan.tracks), generated, "track")
        plan.characters = [
            character(request, _program_of(score.tracks[t]), _notes_outside(score.tracks[t], plan.spans, bar_ticks))
            for t in plan.tracks
        ]
    elif request.task == "add_track":
        plan.programs = [check_program(request.program, tokenizer)]
        plan.num_bars = num_bars
        plan.bar_acs, plan.track_acs = _controls(controls, request, 1, range(num_bars), "track")
        plan.characters = [character(request, plan.programs[0])]
    else:
        programs = request.programs
        if _is_int(programs) or not isinstance(programs, Sequence) or isinstance(programs, str) or not programs:
            raise RequestError("programs", f"programs={programs!r}: expected a non-empty list such as [0, 33, -1]")
        plan.programs = [check_program(p, tokenizer, "programs") for p in programs]
        if not _is_int(request.num_bars) or request.num_bars < 1:
            raise RequestError("num_bars", f"num_bars must be a positive integer, got {request.num_bars!r}")
        plan.num_bars = int(request.num_bars)
        plan.time_signature = time_signature_id(tokenizer, request.time_signature) if tokenizer is not None else None
        tempo = request.tempo
        if isinstance(tempo, bool) or not isinstance(tempo, (int, float)) or tempo <= 0:
            raise RequestError("tempo", f"tempo must be a positive number of quarter notes per minute, got {tempo!r}")
        if not _is_int(request.tpq) or request.tpq < 1:
            raise RequestError("tpq", f"tpq must be a positive integer (ticks per quarter note), got {request.tpq!r}")
        plan.bar_acs, plan.track_acs = _controls(controls, request, len(plan.programs), range(plan.num_bars), "program")
        plan.characters = [character(request, p) for p in plan.programs]
    return plan


def _program_of(track: Any) -> int:
    return -1 if track.is_drum else int(track.program)


def _notes_outside(track: Any, spans: Sequence[tuple[int, int]], bar_ticks: Sequence[int] | None) -> dict:
    """The track's note arrays, without those starting in the spans of bars when their ticks are known."""
    notes = track.notes.numpy()
    if bar_ticks is None:
        return notes
    keep = np.ones(len(notes["time"]), dtype=bool)
    for a, b in spans:
        keep &= (notes["time"] < bar_ticks[a]) | (notes["time"] >= bar_ticks[b])
    return {k: v[keep] for k, v in notes.items()}
