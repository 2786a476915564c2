"""Scores in and out of the generation API: reading a MIDI/ABC file with clear errors, and the
bars of a piece as the model counts them (`bar_grid`) beside the file's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from miditok import MMM as MMMTokenizer
from miditok.utils import get_bars_ticks
from symusic import Score

from mmm.data.checks import Rejected, check_midi_header, check_score
from mmm.data.layout import Piece, piece_from_score, time_signature_of
from mmm.tokenizer import Vocab


def read_score(score: Score | str | Path) -> Score:
    """A `symusic.Score` from a Score or a MIDI/ABC path, with clear errors."""
    if isinstance(score, Score):
        return score
    if not isinstance(score, (str, Path)):
        raise TypeError(f"score must be a symusic.Score or a file path, got {type(score).__name__}")
    path = Path(score)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    try:
        if path.suffix.lower() in (".mid", ".midi"):
            check_midi_header(path.read_bytes())
        loaded = Score(str(path))
    except Exception as err:  # Rejected, or symusic's RuntimeError/ValueError on corrupt files
        raise ValueError(f"cannot read {path} as MIDI/ABC: {err}") from None
    try:  # the checks preprocessing applies, except that a drums-only piece is a fine input
        check_score(loaded, {"allow_drums_only": True})
    except Rejected as err:
        raise ValueError(
            f"{path}: {err.reason.replace('_', ' ')}" + (f" ({err.detail})" if err.detail else "")
        ) from None
    return loaded


def count_bars(score: Score, tokenizer: MMMTokenizer | None = None) -> int:
    """Bars of the piece as the API counts them (with the tokenizer: exactly; without: the score's
    bars up to its last onset, which can differ by a few bars)."""
    if sum(len(t.notes) for t in score.tracks) == 0:
        return 0
    if tokenizer is None:
        return len(get_bars_ticks(score, only_notes_onsets=True))
    try:
        return piece_from_score(score, tokenizer, Vocab(tokenizer)).num_bars
    except ValueError:
        return 0


@dataclass
class BarGrid:
    """The bars of a piece as the model counts them, beside the bars of the file itself.

    They differ when the file has a time signature the tokenizer cannot represent: the model
    then keeps the previous one, so its bar n can start elsewhere than the file's bar n (what a
    musician reads in a DAW). Ticks are in the score's own ticks."""

    starts: list[int]  # model bars: start tick of each bar, then the end of the last one
    time_signatures: list[tuple[int, int]]  # model bars: (numerator, denominator)
    file_starts: list[int]  # the file's bars (its own time signatures), start ticks
    file_time_signatures: list[tuple[int, int]]

    @property
    def num_bars(self) -> int:
        return len(self.time_signatures)

    @property
    def first_difference(self) -> int | None:
        """The first bar whose start or time signature differs between the two grids."""
        pairs = zip(self.starts, self.time_signatures, self.file_starts, self.file_time_signatures)
        return next((i for i, (a, ta, b, tb) in enumerate(pairs) if a != b or ta != tb), None)

    def difference(self) -> str | None:
        """A sentence for a person when the grids differ, else None."""
        i = self.first_difference
        if i is None:
            return None
        missing = sorted(set(self.file_time_signatures) - set(self.time_signatures))
        return (
            f"the model counts bars differently from the file from bar {i} on (file: bar {i} starts at tick "
            f"{self.file_starts[i]} in {'/'.join(map(str, self.file_time_signatures[i]))}; model: tick "
            f"{self.starts[i]} in {'/'.join(map(str, self.time_signatures[i]))})"
            + (
                f": time signature(s) {', '.join(f'{n}/{d}' for n, d in missing)} are not in the tokenizer's vocabulary"
                if missing
                else ""
            )
            + "; bar numbers in requests follow the model's grid"
        )


def bar_grid(score: Score, tokenizer: MMMTokenizer, vocab: Vocab | None = None, piece: Piece | None = None) -> BarGrid:
    """The model's bar grid of `score` (see `BarGrid`), with the file's own grid beside it
    (`piece`: the score already tokenized, e.g. by `MMM.check`)."""
    vocab = vocab or Vocab(tokenizer)
    piece = piece or piece_from_score(score, tokenizer, vocab)
    sigs = [time_signature_of(vocab.token_of[ts]) for ts in piece.time_sigs]
    ticks = list(piece.bar_ticks) + [piece.end_tick(vocab)]
    file_starts = [int(t) for t in get_bars_ticks(score, only_notes_onsets=True)]
    # by time only: of two events at the same tick the later one in the file rules (as in miditok)
    changes = sorted(
        ((int(ts.time), int(ts.numerator), int(ts.denominator)) for ts in score.time_signatures),
        key=lambda change: change[0],
    )
    file_sigs = []
    for start in file_starts:
        current = (4, 4)  # MIDI's default before any time signature event
        for time, num, den in changes:
            if time > start:
                break
            current = (num, den)
        file_sigs.append(current)
    return BarGrid([to_ticks(t, piece.tpq, score.tpq) for t in ticks], sigs, file_starts, file_sigs)


def to_ticks(ticks: int, from_tpq: int, to_tpq: int) -> int:
    return int(round(ticks * to_tpq / from_tpq))
