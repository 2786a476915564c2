"""The token layout, in one place: how a score becomes bars of base ids and back.

A track is `Track_Start Program <bars> Track_End`; a bar is REMI's `Bar TimeSig Position Tempo
Pitch Velocity Duration ...` (docs/token_format.rst). Every track of a `Piece` has the same bars,
so bar i of any track can be infilled. Bar attribute controls sit right after `Bar TimeSig`, the
place the generation grammar forces them (`insert_bar_acs`); a bar cut out of its piece gets the
tempo in force (`carry_tempo`), since REMI writes tempos only where they change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from miditok import MMM as MMMTokenizer
from miditok.utils import get_bars_ticks
from symusic import Score, Track

from mmm.data.checks import Rejected
from mmm.tokenizer import Vocab


# --- bars ---------------------------------------------------------------------------------------
def split_bars(ids: list[int], vocab: Vocab) -> tuple[list[int], list[list[int]]]:
    """A track's base ids `Track_Start Program ... Track_End` -> (header, bars)."""
    if not ids or ids[0] != vocab.track_start or ids[-1] != vocab.track_end:
        raise ValueError("track sequence must start with Track_Start and end with Track_End")
    body = ids[1:-1]
    starts = [i for i, t in enumerate(body) if t == vocab.bar]
    header = body[: starts[0]] if starts else body
    bars = [body[s:e] for s, e in zip(starts, starts[1:] + [len(body)])]
    return header, bars


# Ids around a track's bars: Track_Start Program ... Track_End (each its own BPE word, so a
# track block costs its bars' model ids plus these, whatever the tokenizer).
TRACK_FRAME = 3


def track_ids(program: int, bars: Sequence[Sequence[int]], vocab: Vocab) -> list[int]:
    """The base ids of one track: what `tokenizer.decode` reads back into notes."""
    return [vocab.track_start, vocab.program_id[program], *(i for bar in bars for i in bar), vocab.track_end]


def empty_bar(time_sig: int, vocab: Vocab) -> list[int]:
    """A bar without notes: `Bar TimeSig`."""
    return [vocab.bar, time_sig]


def time_signature_of(token: str) -> tuple[int, int]:
    """`TimeSig_3/4` -> (3, 4)."""
    num, den = token.split("_", 1)[1].split("/")
    return int(num), int(den)


def ticks_per_bar(time_sig: int, vocab: Vocab, tpq: int) -> int:
    num, den = time_signature_of(vocab.token_of[time_sig])
    return num * tpq * 4 // den


def bar_ac_position(bar: Sequence[int], vocab: Vocab) -> int:
    """Where bar ACs go: after `Bar TimeSig` (after `Bar` alone if the bar has no TimeSig)."""
    return 2 if len(bar) > 1 and vocab.is_time_sig[bar[1]] else 1


def insert_bar_acs(bar: Sequence[int], acs: Sequence[int], vocab: Vocab) -> list[int]:
    """Put bar ACs right after the bar's `Bar TimeSig`, always: the place the generation grammar
    forces them. (miditok's own encode puts them after a bar-start `Position_0 Tempo` instead;
    a layout that depends on the bar's content cannot be forced before the content exists.)"""
    if not acs:
        return list(bar)
    i = bar_ac_position(bar, vocab)
    return [*bar[:i], *acs, *bar[i:]]


def carry_tempo(previous_bars: list[list[int]], bar: list[int], vocab: Vocab) -> None:
    """Give a bar cut out of its piece the tempo in force (REMI writes tempos only where they
    change), laid out as REMI would: `Bar TimeSig Position_0 Tempo ...`."""
    i = bar_ac_position(bar, vocab)
    at_zero = i < len(bar) and bar[i] == vocab.position_zero
    if at_zero and i + 1 < len(bar) and vocab.is_tempo[bar[i + 1]]:
        return  # a tempo change right at the bar start
    tempo = next((t for b in reversed(previous_bars) for t in reversed(b) if vocab.is_tempo[t]), None)
    if tempo is None:
        return
    if at_zero:
        bar.insert(i + 1, tempo)
    else:
        bar[i:i] = [vocab.position_zero, tempo]


def generated_bars(ids: Sequence[int], vocab: Vocab) -> list[list[int]]:
    """Base ids written by the model (its end token last) -> bars, attribute controls removed."""
    bars: list[list[int]] = []
    for i in ids[:-1]:
        if i == vocab.bar:
            bars.append([i])
        elif not vocab.is_ac[i]:
            bars[-1].append(i)
    return bars


def bar_ticks_of(pre: Score, num_bars: int) -> list[int]:
    """Start ticks of `num_bars` + 1 bars of a preprocessed score (the last is the end of the
    last bar; bars past the score's end continue its last time signature)."""
    ticks = [int(t) for t in get_bars_ticks(pre, only_notes_onsets=True)][: num_bars + 1]
    ts = pre.time_signatures[-1] if len(pre.time_signatures) else None
    per_bar = ts.numerator * pre.tpq * 4 // ts.denominator if ts is not None else 4 * pre.tpq
    while len(ticks) < num_bars + 1:
        ticks.append(ticks[-1] + per_bar)
    return ticks


# --- a piece ------------------------------------------------------------------------------------
@dataclass
class Piece:
    """A score as the model sees it: base ids per track and bar, every track the same bars."""

    programs: list[int]  # per track, -1 for drums
    bars: list[list[list[int]]]  # track -> bar -> base ids (each bar starts with `Bar`)
    time_sigs: list[int]  # TimeSig base id of each bar
    bar_ticks: list[int]  # start tick of each bar, in `tpq`
    tpq: int
    score: Score | None = None  # the tokenizer-preprocessed score the ids describe
    source: list[int] = field(default_factory=list)  # index of each track in the input score
    empty: list[bool] = field(default_factory=list)  # no notes: left out of prompts unless targeted
    _lengths: dict = field(default_factory=dict, repr=False)  # track -> cumulative model-id lengths

    @property
    def num_bars(self) -> int:
        return len(self.time_sigs)

    def end_tick(self, vocab: Vocab) -> int:
        """The end of the last bar, in `tpq`."""
        return self.bar_ticks[-1] + ticks_per_bar(self.time_sigs[-1], vocab, self.tpq)

    def copy(self) -> Piece:
        return Piece(
            list(self.programs),
            [[list(b) for b in t] for t in self.bars],
            list(self.time_sigs),
            list(self.bar_ticks),
            self.tpq,
            self.score,
            list(self.source),
            list(self.empty),
        )

    def cumlen(self, t: int, vocab: Vocab) -> np.ndarray:
        """Model ids (after BPE) of track t's bars, cumulated: `cumlen[b]` is the length of bars 0..b-1."""
        c = self._lengths.get(t)
        if c is None:
            lengths = [len(vocab.encode_words([bar])) for bar in self.bars[t]]
            c = self._lengths[t] = np.concatenate([[0], np.cumsum(lengths)])
        return c

    def set_bars(self, t: int, start: int, bars: list[list[int]]) -> None:
        self.bars[t][start : start + len(bars)] = bars
        self._lengths.pop(t, None)

    def add_track(self, program: int, vocab: Vocab) -> int:
        """An empty track appended; returns its index."""
        self.programs.append(program)
        self.bars.append([empty_bar(ts, vocab) for ts in self.time_sigs])
        self.empty.append(True)
        return len(self.bars) - 1


def mark_tracks(score: Score) -> Score:
    """A copy whose tracks are named by their index: the name survives the tokenizer's
    preprocessing (which drops and reorders tracks), so its tracks map back to the input's."""
    marked = score.copy()
    for i, track in enumerate(marked.tracks):
        track.name = str(i)
    return marked


def tokenize_bars(score: Score, tokenizer: MMMTokenizer, vocab: Vocab, preprocessed: bool = False) -> Piece:
    """Tokenize every track the tokenizer keeps and align them on bars (tracks in the order of
    the preprocessed score). Raises `Rejected` when miditok fails."""
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
    # Tracks that end early get empty bars (that bar's `Bar TimeSig`) so that every track has
    # the same bars: infilling addresses bar i of any track.
    longest = max(track_bars, key=len)
    time_sigs = [next(i for i in bar if vocab.is_time_sig[i]) for bar in longest]
    for bars in track_bars:
        bars.extend(empty_bar(ts, vocab) for ts in time_sigs[len(bars) :])
    bar_ticks = list(get_bars_ticks(score, only_notes_onsets=True))[:num_bars]
    if len(bar_ticks) < num_bars:
        raise Rejected("tokenize_failed", f"{num_bars} bars in tokens but {len(bar_ticks)} bar ticks")
    return Piece(
        programs,
        track_bars,
        time_sigs,
        [int(t) for t in bar_ticks],
        int(score.tpq),
        score,
        list(range(len(programs))),
        [False] * len(programs),
    )


def piece_from_score(score: Score, tokenizer: MMMTokenizer, vocab: Vocab) -> Piece:
    """Every track of `score`, in its order (tracks the tokenizer drops, such as those with no
    note in its range, are empty but still addressable); ValueError for a score without notes."""
    try:
        tokenized = tokenize_bars(mark_tracks(score), tokenizer, vocab)
    except Rejected as err:
        if err.reason == "no_notes":
            raise ValueError(
                "the score has no note the tokenizer can represent: use MMM.generate to start from scratch"
            ) from None
        raise ValueError(f"cannot tokenize the score: {err}") from None
    by_input = {int(track.name): j for j, track in enumerate(tokenized.score.tracks)}
    programs, bars, empty = [], [], []
    for i, track in enumerate(score.tracks):
        j = by_input.get(i)
        if j is None:
            programs.append(-1 if track.is_drum else int(track.program))
            bars.append([empty_bar(ts, vocab) for ts in tokenized.time_sigs])
            empty.append(True)
        else:
            programs.append(tokenized.programs[j])
            bars.append(tokenized.bars[j])
            empty.append(False)
    return Piece(
        programs,
        bars,
        tokenized.time_sigs,
        tokenized.bar_ticks,
        tokenized.tpq,
        tokenized.score,
        list(range(len(score.tracks))),
        empty,
    )


class InputTracks(NamedTuple):
    """A score as the tokenizer sees it (preprocessed) and its note-only tracks by input index
    (a track the tokenizer drops is absent): what a model's output is measured on."""

    score: Score
    tracks: dict[int, Track]


def input_tracks(score: Score, tokenizer: MMMTokenizer) -> InputTracks:
    pre = tokenizer.preprocess_score(mark_tracks(score))
    tracks = {}
    for track in pre.tracks:
        notes = Track(track.name, track.program, track.is_drum)
        notes.notes = track.notes.copy()
        notes.sort()
        tracks[int(track.name)] = notes
    return InputTracks(pre, tracks)
