"""One music file -> filtered, bar-aligned, chunked base token ids (what the store keeps).

A chunk holds, for each track, its program and one list of base ids per bar (each starting
with `Bar_None`, attribute controls not included), plus the ids of every attribute control
computed on that chunk, so the sequence builder only slices arrays at training time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from miditok import MMM
from miditok.utils import get_bars_ticks
from symusic import Score, Track

from mmm.data.controls import bar_controls, track_controls
from mmm.tokenizer import Vocab


class Rejected(Exception):
    """A file that preprocessing skips; `reason` is a short key for the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Chunk:
    programs: list[int]
    bars: list[list[list[int]]]  # track -> bar -> base ids
    track_acs: list[list[list[int]]]  # track -> track-AC family -> ids
    bar_acs: list[list[list[list[int]]]]  # track -> bar -> bar-AC family -> ids
    bar_ticks: list[int]  # chunk-relative start tick of each bar
    start_tick: int
    tpq: int
    num_notes: int = 0
    meta: dict = field(default_factory=dict)


def split_bars(ids: list[int], vocab: Vocab) -> tuple[list[int], list[list[int]]]:
    """A track's base ids `Track_Start Program ... Track_End` -> (header, bars)."""
    if not ids or ids[0] != vocab.track_start or ids[-1] != vocab.track_end:
        raise ValueError("track sequence must start with Track_Start and end with Track_End")
    body = ids[1:-1]
    starts = [i for i, t in enumerate(body) if t == vocab.bar]
    header = body[: starts[0]] if starts else body
    bars = [body[s:e] for s, e in zip(starts, starts[1:] + [len(body)])]
    return header, bars


def _chunk_bounds(bar_lengths: np.ndarray, max_tokens: int, max_track_tokens: int, min_bars: int) -> list[tuple[int, int]]:
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


@dataclass
class ScoreBars:
    """A whole score as base ids, bar-aligned across tracks (no filtering, no chunking)."""

    score: Score  # the tokenizer-preprocessed score the ids describe
    programs: list[int]  # per track, -1 for drums
    bars: list[list[list[int]]]  # track -> bar -> base ids (each bar starts with Bar_None)
    bar_ticks: list[int]  # start tick of each bar, in `score` ticks


def score_to_bars(score: Score, tokenizer: MMM, vocab: Vocab, preprocessed: bool = False) -> ScoreBars:
    """Tokenize every track and align them on bars. Raises `Rejected` when miditok fails."""
    if not preprocessed:
        try:
            score = tokenizer.preprocess_score(score)
        except Exception as err:  # miditok raises many types on odd data
            raise Rejected("preprocess_failed", f"{type(err).__name__}: {err}") from None
        if len(score.tracks) == 0:
            raise Rejected("no_notes", "no note left in the tokenizer's pitch range")
    try:
        seqs = tokenizer.encode(score, encode_ids=False, no_preprocess_score=True, concatenate_track_sequences=False)
    except Exception as err:
        raise Rejected("tokenize_failed", f"{type(err).__name__}: {err}") from None
    programs, track_bars = [], []
    for seq in seqs:
        header, bars = split_bars(seq.ids, vocab)
        programs.append(int(vocab.token_of[header[0]].split("_")[1]))
        track_bars.append(bars)
    num_bars = max(len(b) for b in track_bars)
    # Tracks that end early get empty bars (Bar_None + that bar's TimeSig) so that every
    # track has the same bars: infilling addresses bar i of any track.
    longest = max(track_bars, key=len)
    empty_bars = [[t for t in bar[:2] if t == vocab.bar or vocab.is_time_sig[t]] for bar in longest]
    for bars in track_bars:
        bars.extend(empty_bars[len(bars):])
    bar_ticks = list(get_bars_ticks(score, only_notes_onsets=True))[:num_bars]
    if len(bar_ticks) < num_bars:
        raise Rejected("tokenize_failed", f"{num_bars} bars in tokens but {len(bar_ticks)} bar ticks")
    return ScoreBars(score=score, programs=programs, bars=track_bars, bar_ticks=bar_ticks)


def tokenize_score(score: Score, tokenizer: MMM, vocab: Vocab, cfg) -> list[Chunk]:
    """Filter and tokenize one score. Raises `Rejected` with a reason for files we skip.

    `cfg` holds `min_bars`, `min_notes`, `max_notes`, `max_tracks`, `chunk_max_tokens`,
    `chunk_max_track_tokens`, `chunk_min_bars`.
    """
    raw_notes = sum(len(t.notes) for t in score.tracks)
    if raw_notes == 0:
        raise Rejected("no_notes")
    if raw_notes > cfg.max_notes:
        raise Rejected("too_many_notes", f"{raw_notes} notes > max_notes={cfg.max_notes}")
    piece = score_to_bars(score, tokenizer, vocab)
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


def carry_tempo(previous_bars: list[list[int]], bar: list[int], vocab: Vocab) -> None:
    """Give a chunk's first bar the tempo in force (REMI writes tempos only where they change),
    laid out as REMI would: `Bar TimeSig Position_0 Tempo ...`."""
    i = 2 if len(bar) > 1 and vocab.token_of[bar[1]].startswith("TimeSig") else 1
    at_zero = i < len(bar) and bar[i] == vocab.position_zero
    if at_zero and i + 1 < len(bar) and vocab.is_tempo[bar[i + 1]]:
        return  # a tempo change right at the chunk start
    tempo = next((t for b in reversed(previous_bars) for t in reversed(b) if vocab.is_tempo[t]), None)
    if tempo is None:
        return
    if at_zero:
        bar.insert(i + 1, tempo)
    else:
        bar[i:i] = [vocab.position_zero, tempo]
