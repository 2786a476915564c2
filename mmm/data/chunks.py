"""One music file -> filtered, bar-aligned, chunked base token ids (what the store keeps).

A chunk holds, for each track, its program and one list of base ids per bar (each starting
with `Bar_None`, attribute controls not included), plus the ids of every attribute control
computed on that chunk, so the sequence builder only slices arrays at training time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from miditok import MMM as MMMTokenizer
from symusic import Score, Track

from mmm.controls.measure import bar_controls, track_controls
from mmm.data.checks import Rejected
from mmm.data.layout import carry_tempo, tokenize_bars
from mmm.tokenizer import Vocab


@dataclass
class Chunk:
    """What the store keeps of a stretch of a `mmm.data.layout.Piece`: its bars cut on bar
    boundaries (a first bar given the tempo in force) and the attribute controls computed on it."""

    programs: list[int]
    bars: list[list[list[int]]]  # track -> bar -> base ids
    track_acs: list[list[list[int]]]  # track -> track-AC family -> ids
    bar_acs: list[list[list[list[int]]]]  # track -> bar -> bar-AC family -> ids
    bar_ticks: list[int]  # chunk-relative start tick of each bar
    start_tick: int
    tpq: int
    num_notes: int = 0


def _chunk_bounds(
    bar_lengths: np.ndarray, max_tokens: int, max_track_tokens: int, min_bars: int
) -> list[tuple[int, int]]:
    """Greedy bar ranges whose summed tokens (all tracks / longest track) stay under the limits."""
    total = bar_lengths.sum(axis=0)
    bounds, start = [], 0
    run_total, run_track = 0, np.zeros(bar_lengths.shape[0], dtype=np.int64)
    for b in range(bar_lengths.shape[1]):
        over = run_total + total[b] > max_tokens or (run_track + bar_lengths[:, b]).max() > max_track_tokens
        if over and b - start >= min_bars:
            bounds.append((start, b))
            start, run_total, run_track = b, 0, np.zeros_like(run_track)
        run_total += total[b]
        run_track += bar_lengths[:, b]
    if bounds and bar_lengths.shape[1] - start < min_bars:
        bounds[-1] = (bounds[-1][0], bar_lengths.shape[1])  # a short tail joins the previous chunk
    else:
        bounds.append((start, bar_lengths.shape[1]))
    return bounds


def tokenize_score(score: Score, tokenizer: MMMTokenizer, vocab: Vocab, cfg) -> list[Chunk]:
    """Filter and tokenize one score. Raises `Rejected` with a reason for files we skip.

    `cfg` holds `min_bars`, `min_notes`, `max_notes`, `max_tracks`, `chunk_max_tokens`,
    `chunk_max_track_tokens`, `chunk_min_bars`.
    """
    raw_notes = sum(len(t.notes) for t in score.tracks)
    if raw_notes == 0:
        raise Rejected("no_notes")
    if raw_notes > cfg.max_notes:
        raise Rejected("too_many_notes", f"{raw_notes} notes > max_notes={cfg.max_notes}")
    piece = tokenize_bars(score, tokenizer, vocab)
    score = piece.score
    if len(score.tracks) > cfg.max_tracks:
        raise Rejected("too_many_tracks", f"{len(score.tracks)} tracks > max_tracks={cfg.max_tracks}")
    num_notes = sum(len(t.notes) for t in score.tracks)
    if num_notes < cfg.min_notes:
        raise Rejected("too_few_notes", f"{num_notes} notes < min_notes={cfg.min_notes}")
    programs, track_bars, bar_ticks = piece.programs, piece.bars, piece.bar_ticks
    num_bars = len(bar_ticks)
    if num_bars < cfg.min_bars:
        raise Rejected("too_few_bars", f"{num_bars} bars < min_bars={cfg.min_bars}")
    # ACs describe what the tokens hold: the notes only. symusic's pianoroll (TrackRepetition)
    # spans up to `Track.end()`, which also counts control changes, pitch bends, pedals and
    # lyrics that are not tokenized.
    note_tracks = []
    for track in score.tracks:
        note_track = Track(track.name, track.program, track.is_drum)
        note_track.notes = track.notes.copy()
        note_tracks.append(note_track)
    lengths = np.array([[len(bar) for bar in bars] for bars in track_bars], dtype=np.int64)
    chunks = []
    bounds = _chunk_bounds(lengths, cfg.chunk_max_tokens, cfg.chunk_max_track_tokens, cfg.chunk_min_bars)
    for first, last in bounds:
        start = bar_ticks[first]
        end = bar_ticks[last] if last < num_bars else score.end() + 1
        rel_ticks = [t - start for t in bar_ticks[first:last]]
        chunk_bars = [[list(bar) for bar in bars[first:last]] for bars in track_bars]
        if first > 0:
            for bars, chunk in zip(track_bars, chunk_bars):
                carry_tempo(bars[:first], chunk[0], vocab)
        track_acs, bar_acs, n = [], [], 0
        for track in note_tracks:
            clipped = track.clip(start, end, clip_end=False).shift_time(-start)
            n += len(clipped.notes)
            track_acs.append(track_controls(tokenizer, vocab, clipped, score.tpq, rel_ticks))
            bar_acs.append(bar_controls(tokenizer, vocab, clipped, score.tpq, rel_ticks))
        chunks.append(
            Chunk(
                programs=programs,
                bars=chunk_bars,
                track_acs=track_acs,
                bar_acs=bar_acs,
                bar_ticks=rel_ticks,
                start_tick=int(start),
                tpq=int(score.tpq),
                num_notes=n,
            )
        )
    return chunks
