"""Scores as the tokenizer sees them, and the musical statistics of a span of bars: a stored
test window decoded to a Score, bar start ticks, a track's notes in a span (`mmm.evaluate.metrics`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from symusic import Score, Track

from mmm.data.layout import carry_tempo, track_ids
from mmm.evaluate.metrics import musical_stats
from mmm.tokenizer import Vocab


def note_arrays(track: Track) -> dict[str, np.ndarray]:
    return {k: v.astype(np.int64) for k, v in track.notes.numpy().items()}


def window_score(chunk: Mapping, first: int, num_bars: int, tokenizer, vocab: Vocab) -> tuple[Score, list[int]]:
    """Bars [first, first+num_bars) of a stored chunk decoded to a Score; tracks without notes
    in the window are left out. Returns the score and the chunk track of each score track."""
    ids, kept = [], []
    for t, program in enumerate(chunk["programs"]):
        bars = [list(b) for b in chunk["bars"][t][first : first + num_bars]]
        if not any(vocab.is_note_start[i] for bar in bars for i in bar):
            continue
        if first > 0:
            carry_tempo(chunk["bars"][t][:first], bars[0], vocab)
        ids += track_ids(program, bars, vocab)
        kept.append(t)
    if not kept:
        return Score(480), []
    score = tokenizer.decode(ids)  # base ids are their own ids in model space
    if len(score.tracks) != len(kept):
        raise RuntimeError(f"decoding a test window gave {len(score.tracks)} tracks for {len(kept)}")
    return score, kept


def _span_notes(track: Track | None, start: int, end: int) -> dict[str, np.ndarray]:
    if track is None:
        return {k: np.zeros(0, dtype=np.int64) for k in ("time", "duration", "pitch", "velocity")}
    notes = note_arrays(track)
    inside = (notes["time"] >= start) & (notes["time"] < end)
    return {k: v[inside] for k, v in notes.items()}


def pitch_in_range(real: Track | None, generated: Track | None, start: int, end: int) -> tuple[int, int]:
    """(generated notes in [start, end) within the pitch range the track has outside that span,
    widened by 3 semitones; all generated notes there). (0, 0) when either side has no note."""
    if real is None or generated is None:
        return 0, 0
    context = note_arrays(real)
    outside = context["pitch"][(context["time"] < start) | (context["time"] >= end)]
    if len(outside) == 0:
        return 0, 0
    pitches = _span_notes(generated, start, end)["pitch"]
    return int(((pitches >= outside.min() - 3) & (pitches <= outside.max() + 3)).sum()), len(pitches)


def span_stats(
    track: Track | None, is_drum: bool, start: int, end: int, tpq: int, ticks_per_bar: int
) -> dict[str, float]:
    notes = _span_notes(track, start, end)
    return musical_stats(
        notes["time"] - start,
        notes["duration"],
        notes["pitch"],
        [is_drum] * len(notes["time"]),
        end - start,
        tpq,
        ticks_per_bar,
    )
