"""What the server says about music: uploads read from memory, a piece analysed for the studio
(tracks, notes in ticks and seconds, the model's bar grid, measured controls), the controls
measured on an output, and the bundled example pieces.

Nothing here touches the disk: uploads are parsed from bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from symusic import Note, Score, Tempo, TimeSignature, Track

from mmm.controls.measure import bar_controls, track_controls
from mmm.data.checks import Rejected, check_midi_header, check_score
from mmm.data.layout import bar_ticks_of, input_tracks
from mmm.generation.api import MMM
from mmm.generation.scores import BarGrid, bar_grid


class BadUpload(ValueError):
    """The uploaded bytes are not a MIDI file the model can work on (the message says why)."""


def read_midi(data: bytes, name: str = "upload") -> Score:
    """A Score from MIDI bytes, with the checks `mmm.generation.scores.read_score` applies to files."""
    if not data:
        raise BadUpload(f"{name}: the file is empty; upload a .mid file")
    try:
        check_midi_header(data)
        score = Score.from_midi(data)
    except Rejected as err:
        raise BadUpload(f"{name}: not a MIDI file the model can read: {err.detail or err.reason}") from None
    except Exception as err:  # symusic's RuntimeError/ValueError on a corrupt file
        raise BadUpload(f"{name}: corrupt MIDI file ({err})") from None
    try:
        check_score(score, {"allow_drums_only": True})
    except Rejected as err:
        raise BadUpload(
            f"{name}: {err.reason.replace('_', ' ')}" + (f" ({err.detail})" if err.detail else "")
        ) from None
    return score


def seconds(ticks: Sequence[int] | np.ndarray, score: Score) -> np.ndarray:
    """Ticks of `score` to seconds through its tempo map (120 qpm before the first tempo)."""
    ticks = np.asarray(ticks, dtype=np.float64)
    changes = sorted((int(t.time), float(t.qpm)) for t in score.tempos)
    if not changes or changes[0][0] > 0:
        changes.insert(0, (0, 120.0))
    starts = np.array([c[0] for c in changes], dtype=np.float64)
    sec_per_tick = np.array([60.0 / (c[1] * score.tpq) for c in changes])
    offsets = np.concatenate([[0.0], np.cumsum(np.diff(starts) * sec_per_tick[:-1])])
    k = np.searchsorted(starts, ticks, side="right") - 1
    k = np.clip(k, 0, len(starts) - 1)
    return offsets[k] + (ticks - starts[k]) * sec_per_tick[k]


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


class Measure:
    """Attribute-control values measured on a score, as `mmm.controls.table.Controls` names them."""

    def __init__(self, mmm: MMM) -> None:
        self.mmm = mmm

    def _values(self, ids: Sequence[int]) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.mmm.controls.values(ids).items()}

    def piece(self, score: Score, num_bars: int) -> dict[int, dict[str, Any]]:
        """{input track index: {"track": {...}, "bars": [{...} per bar]}} for tracks with notes."""
        tok, vocab = self.mmm.tokenizer, self.mmm.vocab
        analysed = input_tracks(score, tok)
        ticks = bar_ticks_of(analysed.score, num_bars)[:-1]
        tpq = analysed.score.tpq
        out = {}
        for index, track in analysed.tracks.items():
            per_bar = bar_controls(tok, vocab, track, tpq, ticks)
            track_ids = [i for family in track_controls(tok, vocab, track, tpq, ticks) for i in family]
            out[index] = {
                "track": self._values(track_ids),
                "bars": [self._values([i for family in bar for i in family]) for bar in per_bar],
            }
        return out


def analyze(mmm: MMM, score: Score, measure: Measure, grid: BarGrid | None = None) -> dict[str, Any]:
    """Everything the studio draws and plays: tracks with their notes (ticks and seconds), the
    model's bar grid (and the file's, and where they part), measured controls per track and bar."""
    grid = grid or bar_grid(score, mmm.tokenizer, mmm.vocab)
    controls = measure.piece(score, grid.num_bars)
    tracks = []
    for i, track in enumerate(score.tracks):
        notes = track.notes.numpy()
        start = seconds(notes["time"], score)
        end = seconds(notes["time"] + notes["duration"], score)
        measured = controls.get(i, {"track": {}, "bars": [{} for _ in range(grid.num_bars)]})
        tracks.append(
            {
                "index": i,
                "name": track.name,
                "program": -1 if track.is_drum else int(track.program),
                "is_drum": bool(track.is_drum),
                "num_notes": len(track.notes),
                # [tick, duration ticks, pitch, velocity, start s, end s]
                "notes": [
                    [int(t), int(d), int(p), int(v), round(float(s), 4), round(float(e), 4)]
                    for t, d, p, v, s, e in zip(
                        notes["time"], notes["duration"], notes["pitch"], notes["velocity"], start, end
                    )
                ],
                "controls": measured,
            }
        )
    end_tick = max(grid.starts[-1], max((t.end() for t in score.tracks if len(t.notes)), default=0))
    return {
        "tpq": score.tpq,
        "num_bars": grid.num_bars,
        "duration_s": round(float(seconds([end_tick], score)[0]), 4),
        "grid": {
            "starts": grid.starts,
            "starts_s": [round(float(x), 4) for x in seconds(grid.starts, score)],
            "time_signatures": [list(ts) for ts in grid.time_signatures],
            "file_starts": grid.file_starts,
            "file_time_signatures": [list(ts) for ts in grid.file_time_signatures],
            "first_difference": grid.first_difference,
            "difference": grid.difference(),
        },
        "tempos": [[int(t.time), round(float(t.qpm), 3)] for t in score.tempos],
        "tracks": tracks,
    }


def measured_output(
    measure: Measure, out: Score, num_bars: int, tracks: Sequence[int], bars: Sequence[int] | None
) -> dict[str, Any]:
    """Controls measured on `out` for the generated tracks: per track, its track-level values and
    the bar-level values of `bars` (all bars when None)."""
    values = measure.piece(out, num_bars)
    result = {}
    for t in tracks:
        m = values.get(t, {"track": {}, "bars": [{} for _ in range(num_bars)]})
        chosen = range(len(m["bars"])) if bars is None else [b for b in bars if b < len(m["bars"])]
        result[str(t)] = {"track": m["track"], "bars": {str(b): m["bars"][b] for b in chosen}}
    return result


# --- bundled examples ---------------------------------------------------------------------------
def _example_pop(tpq: int = 480) -> Score:
    """8 bars in C: piano chords (I vi IV V twice), a melody, a bass and a drum kit, 100 qpm."""
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 100.0))
    bar = 4 * tpq
    chords = [(60, 64, 67), (57, 60, 64), (53, 57, 60), (55, 59, 62)] * 2
    melody = [[72, 74, 76, 79], [76, 74, 72, 69], [69, 72, 74, 72], [71, 74, 72, 71]] * 2
    piano, lead = Track("Piano", 0), Track("Melody", 73)
    bass, drums = Track("Bass", 33), Track("Drums", 0, True)
    for b, (chord, line) in enumerate(zip(chords, melody)):
        t0 = b * bar
        for beat in (0, 2):
            for p in chord:
                piano.notes.append(Note(t0 + beat * tpq, 2 * tpq - 20, p, 70))
        for k, p in enumerate(line):
            lead.notes.append(Note(t0 + k * tpq, tpq - 30, p, 90))
        for beat in range(4):
            bass.notes.append(Note(t0 + beat * tpq, tpq - 40, chord[0] - 24, 95))
        for eighth in range(8):
            t = t0 + eighth * tpq // 2
            drums.notes.append(Note(t, tpq // 4, 42, 70))
            if eighth % 4 == 0:
                drums.notes.append(Note(t, tpq // 4, 36, 100))
            if eighth % 4 == 2:
                drums.notes.append(Note(t, tpq // 4, 38, 95))
    score.tracks.extend([piano, lead, bass, drums])
    return score


def _example_waltz(tpq: int = 480) -> Score:
    """12 bars of 3/4: a piano waltz (bass on 1, chords on 2 and 3) under a violin line, 132 qpm."""
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, 3, 4))
    score.tempos.append(Tempo(0, 132.0))
    bar = 3 * tpq
    roots = [50, 55, 57, 50, 47, 52, 45, 50, 50, 55, 57, 50]
    piano, violin = Track("Piano", 0), Track("Violin", 40)
    for b, root in enumerate(roots):
        t0 = b * bar
        piano.notes.append(Note(t0, tpq - 20, root - 12, 85))
        for beat in (1, 2):
            for p in (root, root + 4, root + 7):
                piano.notes.append(Note(t0 + beat * tpq, tpq - 40, p + 12, 60))
        violin.notes.append(Note(t0, 2 * tpq, root + 24, 85))
        violin.notes.append(Note(t0 + 2 * tpq, tpq, root + 26 if b % 2 else root + 28, 80))
    score.tracks.extend([piano, violin])
    return score


EXAMPLES = {
    "pop_4_tracks": ("8 bars, piano, melody, bass and drums in 4/4", _example_pop),
    "waltz": ("12 bars of 3/4, piano and violin", _example_waltz),
}


def example_midi(name: str) -> bytes:
    """The MIDI bytes of a bundled example (KeyError for an unknown name)."""
    return EXAMPLES[name][1]().dumps_midi()


def json_keys_to_bars(controls: Any) -> Any:
    """JSON object keys are strings: {"8": {...}} (controls per bar) -> {8: {...}}."""
    # ASCII digits only: str.isdigit() also takes digits int() refuses, such as "¹"
    if (
        isinstance(controls, Mapping)
        and controls
        and all(isinstance(k, str) and k.isascii() and k.isdigit() for k in controls)
    ):
        return {int(k): v for k, v in controls.items()}
    if isinstance(controls, list):
        return [json_keys_to_bars(c) for c in controls]
    return controls
