"""Does the model listen to the other tracks? Infills judged against the real piece.

In every test piece (a window of its first bars) the same number of bars in the middle of each
track is infilled, without controls, by the model and by naive baselines computed on the same
spans; each span is judged against the real piece:

- onset F1 against the original bars: notes matched on onset and pitch, on onset alone, and on
  onset and pitch class (pooled over spans: true positives, false positives and negatives summed);
- vertical consonance: of every (generated onset, note sounding in another track at that onset)
  pair, the share whose interval class is a consonance (unison/octave, thirds, fourth, fifth,
  sixths: 0, 3, 4, 5, 7, 8, 9 semitones mod 12), the other tracks being the *real* ones;
- the share of generated pitches within the track's range outside the span, 3 semitones wider;
- generated notes per original note.

The model infills under several prompts, always judged against the real piece: the real one
(with and without the decoding constraints that keep the track's range and monophony), the other
tracks shifted one bar later, and the target track alone. A model that listens does better with
the real prompt than with the others. The baselines: the track's previous bars copied in; another
track's same bars moved by octaves into the target's register; the track's most common pitch on
the other tracks' onsets. Scores are compared as the tokenizer sees them (quantized to its grid).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from symusic import Score

from mmm.config import at_least
from mmm.data.layout import bar_ticks_of, input_tracks
from mmm.evaluate.analysis import note_arrays, window_score
from mmm.generation.request import RANGE_MARGIN, Request, SamplingConfig
from mmm.generation.scores import count_bars

CONSONANT = (0, 3, 4, 5, 7, 8, 9)  # interval classes, in semitones mod 12

Notes = dict[str, np.ndarray]  # note arrays: time, duration, pitch (and velocity)

# What is judged, in the report's order: model rows (prompt condition, constraints), baselines.
MODEL_ROWS = {
    "model": ("real", False),
    "model, track's range and monophony kept": ("real", True),
    "model, other tracks shifted one bar later": ("shifted", False),
    "model, the target track alone": ("alone", False),
}
BASELINE_ROWS = ("copy the previous bars", "another track moved to the register", "most common pitch on other onsets")
REAL_ROW = "the original bars"


@dataclass(frozen=True)
class ListeningConfig:
    """`listening` in configs/evaluate.yaml (each key explained there)."""

    max_pieces: int | None = field(metadata=at_least(0))  # 0: no listening benchmark
    window_bars: int = field(metadata=at_least(4))
    bars: int = field(metadata=at_least(1))
    seeds: list[int]


@dataclass
class Tally:
    """Pooled counts of one row."""

    matches: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))  # tp, fp, fn
    consonant: int = 0
    pairs: int = 0
    in_range: int = 0
    pitched: int = 0
    notes: int = 0
    original: int = 0
    spans: int = 0

    def add(self, generated: Notes, original: Notes, others: Sequence[Notes], track_range: tuple[int, int] | None):
        self.spans += 1
        for kind, keys in _MATCH_KEYS.items():
            got, want = Counter(keys(generated)), Counter(keys(original))
            tp = sum((got & want).values())
            counts = self.matches[kind]
            counts[0] += tp
            counts[1] += sum(got.values()) - tp
            counts[2] += sum(want.values()) - tp
        consonant, pairs = consonance(generated, others)
        self.consonant += consonant
        self.pairs += pairs
        if track_range is not None:
            low, high = track_range
            pitches = generated["pitch"]
            self.in_range += int(((pitches >= low - RANGE_MARGIN) & (pitches <= high + RANGE_MARGIN)).sum())
            self.pitched += len(pitches)
        self.notes += len(generated["time"])
        self.original += len(original["time"])

    def summary(self) -> dict[str, float]:
        out = {f"{kind}_f1": _f1(*counts) for kind, counts in self.matches.items()}
        out["consonance"] = self.consonant / self.pairs if self.pairs else float("nan")
        out["in_range"] = self.in_range / self.pitched if self.pitched else float("nan")
        out["notes_per_original"] = self.notes / self.original if self.original else float("nan")
        out["spans"] = self.spans
        return out


_MATCH_KEYS = {
    "onset_pitch": lambda n: zip(n["time"].tolist(), n["pitch"].tolist()),
    "onset": lambda n: n["time"].tolist(),
    "onset_pitch_class": lambda n: zip(n["time"].tolist(), (n["pitch"] % 12).tolist()),
}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def consonance(generated: Notes, others: Sequence[Notes]) -> tuple[int, int]:
    """(consonant pairs, pairs) of each generated onset with every note of `others` sounding then."""
    consonant = pairs = 0
    for other in others:
        if not len(other["time"]) or not len(generated["time"]):
            continue
        t = generated["time"][:, None]
        sounding = (other["time"][None] <= t) & (t < other["time"][None] + other["duration"][None])
        classes = np.abs(generated["pitch"][:, None] - other["pitch"][None]) % 12
        pairs += int(sounding.sum())
        consonant += int((sounding & np.isin(classes, CONSONANT)).sum())
    return consonant, pairs


def in_span(notes: Notes, start: int, end: int) -> Notes:
    inside = (notes["time"] >= start) & (notes["time"] < end)
    return {k: v[inside] for k, v in notes.items()}


def _shifted(notes: Notes, by: int) -> Notes:
    return {**notes, "time": notes["time"] + by}


# --- naive baselines ---------------------------------------------------------------------------
def copy_previous(track: Notes, ticks: Sequence[int], a: int, b: int) -> Notes:
    """The `b - a` bars before the span copied into it (the bars after it when too few precede)."""
    n = b - a
    source = a - n if a >= n else b
    if source + n >= len(ticks):
        return in_span(track, 0, 0)
    return _shifted(in_span(track, ticks[source], ticks[source + n]), ticks[a] - ticks[source])


def other_track_moved(target: Notes, others: Sequence[Notes], start: int, end: int) -> Notes:
    """The span of the other track closest in register, moved by octaves next to the target's own
    register (its median pitch outside the span)."""
    outside = target["pitch"][(target["time"] < start) | (target["time"] >= end)]
    candidates = [in_span(o, start, end) for o in others]
    candidates = [(o, float(np.median(o["pitch"]))) for o in candidates if len(o["pitch"])]
    if not len(outside) or not candidates:
        return in_span(target, 0, 0)
    median = float(np.median(outside))
    notes, theirs = min(candidates, key=lambda c: abs(c[1] - median))
    octaves = round((median - theirs) / 12)
    return {**notes, "pitch": np.clip(notes["pitch"] + 12 * octaves, 0, 127)}


def most_common_pitch(target: Notes, others: Sequence[Notes], start: int, end: int) -> Notes:
    """The track's most common pitch (outside the span) on every onset of the other tracks."""
    outside = target["pitch"][(target["time"] < start) | (target["time"] >= end)]
    onsets = np.unique(np.concatenate([in_span(o, start, end)["time"] for o in others] or [np.zeros(0, np.int64)]))
    if not len(outside) or not len(onsets):
        return in_span(target, 0, 0)
    pitch = Counter(outside.tolist()).most_common(1)[0][0]
    durations = np.diff(np.append(onsets, end))
    return {
        "time": onsets,
        "duration": durations,
        "pitch": np.full(len(onsets), pitch),
        "velocity": np.full(len(onsets), 64),
    }


# --- the runner --------------------------------------------------------------------------------
def _condition_score(score: Score, target: int, condition: str, bar_ticks: int) -> tuple[Score, int]:
    """The input the model infills from, and the target's index in it."""
    if condition == "real":
        return score, target
    changed = score.copy()
    if condition == "alone":
        changed.tracks = [changed.tracks[target]]
        return changed, 0
    for k, track in enumerate(changed.tracks):  # "shifted": the other tracks one bar later
        if k != target:
            track.shift_time(bar_ticks, inplace=True)
    return changed, target


class Listening:
    """Runs the listening benchmark of an `MMM` on test chunks of a store."""

    def __init__(self, mmm, store, chunks: Sequence[int], cfg: ListeningConfig, sampling: SamplingConfig) -> None:
        self.mmm, self.store, self.cfg, self.sampling = mmm, store, cfg, sampling
        rng = random.Random(0)
        chunks = list(chunks)
        if cfg.max_pieces is not None and cfg.max_pieces < len(chunks):
            chunks = sorted(rng.sample(chunks, cfg.max_pieces))
        self.chunks = chunks
        self.tallies = {name: Tally() for name in [*MODEL_ROWS, *BASELINE_ROWS, REAL_ROW]}
        self.failures: list[str] = []

    def run(self) -> dict | None:
        if self.cfg.max_pieces == 0:
            return None
        for i in self.chunks:
            self._piece(self.store[i])
        return self.results(len(self.chunks))

    def results(self, pieces: int, what: str | None = None) -> dict:
        """Every row's pooled measures so far; `what` names the pieces judged (default: the
        store's test pieces, their first `window_bars` bars)."""
        return {
            "settings": {
                "pieces": pieces,
                "what": what or f"test pieces (their first {self.cfg.window_bars} bars)",
                "window_bars": self.cfg.window_bars,
                "bars": self.cfg.bars,
                "seeds": list(self.cfg.seeds),
            },
            "rows": {name: tally.summary() for name, tally in self.tallies.items()},
            "failures": self.failures[:20],
        }

    def _piece(self, chunk) -> None:
        n = min(self.cfg.window_bars, len(chunk["bars"][0]))
        score, kept = window_score(chunk, 0, n, self.mmm.tokenizer, self.mmm.vocab)
        if len(kept) >= 2:
            self.judge(score, n)

    def judge(self, score: Score, num_bars: int | None = None) -> bool:
        """Infills bars in the middle of every pitched track of `score` (its first `num_bars` bars,
        all when None) under every row and adds them to the tallies. False when the piece is too
        short for the span or has fewer than two tracks with notes."""
        tokenizer = self.mmm.tokenizer
        n = count_bars(score, tokenizer)
        n = n if num_bars is None else min(n, num_bars)
        k = self.cfg.bars
        real = input_tracks(score, tokenizer)
        if len(real.tracks) < 2 or n < k + 2:
            return False
        a = (n - k) // 2
        b = a + k
        ticks = bar_ticks_of(real.score, n)
        notes = {j: note_arrays(t) for j, t in real.tracks.items()}
        span = (ticks[a], ticks[b])
        bar_ticks = int(round((ticks[1] - ticks[0]) * score.tpq / real.score.tpq))  # in the input's ticks
        for target in range(len(score.tracks)):
            if not score.tracks[target].is_drum and target in notes:
                self._track(score, notes, target, ticks, a, b, span, bar_ticks)
        return True

    def _track(self, score: Score, notes: dict[int, Notes], target: int, ticks, a: int, b: int, span, bar_ticks: int):
        """Every row's infill of bars [a, b) of one track, judged."""
        own = notes[target]
        original = in_span(own, *span)
        if not len(original["time"]):
            return
        others = [v for j, v in notes.items() if j != target]
        outside = own["pitch"][(own["time"] < span[0]) | (own["time"] >= span[1])]
        track_range = (int(outside.min()), int(outside.max())) if len(outside) else None
        candidates = {
            REAL_ROW: own,
            BASELINE_ROWS[0]: copy_previous(own, ticks, a, b),
            BASELINE_ROWS[1]: other_track_moved(own, others, *span),
            BASELINE_ROWS[2]: most_common_pitch(own, others, *span),
        }
        for row, (condition, constrained) in MODEL_ROWS.items():
            prompt, index = _condition_score(score, target, condition, bar_ticks)
            for seed in self.cfg.seeds:
                generated = self._infill(prompt, index, a, b, seed, constrained)
                if generated is not None:
                    self.tallies[row].add(in_span(generated, *span), original, others, track_range)
        for row, generated in candidates.items():
            self.tallies[row].add(in_span(generated, *span), original, others, track_range)

    def _infill(self, score: Score, target: int, a: int, b: int, seed: int, constrained: bool) -> Notes | None:
        keep = {} if constrained else {"pitch_range": False, "monophonic": False}
        request = Request("infill", track=target, bars=(a, b), seed=seed, sampling=self.sampling, **keep)
        try:
            out = self.mmm.run(request, score).scores[0]
        except Exception as err:  # noqa: BLE001 - reported with the results, the benchmark goes on
            self.failures.append(f"infill of track {target}, bars {a}-{b}: {type(err).__name__}: {err}")
            return None
        track = input_tracks(out, self.mmm.tokenizer).tracks.get(target)
        if track is None:
            return in_span(note_arrays(out.tracks[target]), 0, 0)
        return note_arrays(track)
