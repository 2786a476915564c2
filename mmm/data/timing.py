"""Where each id of a sequence sits in the music: its bar and onset (musical time) and whether it
belongs to the part being written (the target). The model's alignment signals read these.

MMM's sequence is track-major: the bar of another track that sounds with the bar being filled sits
hundreds of ids back, and only the count of bar starts says which it is. So every id gets

- a **musical time**: its bar index in the sample (the count of bar starts, `Bar_None` words or
  `Infill_Bar`, since its track's `Track_Start`; in the fill section, the bar of the first
  `Infill_Bar` plus the bars written so far), and with ``"onset"`` timing ``bar * stride + onset``,
  the onset being the last `Position` value seen in that bar (0 at the bar start). Notes that sound
  together in different tracks share it; ``stride`` is the longest bar of the vocabulary in
  positions, so no two bars overlap (the model config's ``time_rope`` names the kind);
- a **target flag**: 1 on the block of the track being written (the one holding `Infill_Bar`, or
  the last track of a new-track sample) and on everything after `FillBar_Start`.

`sequence_timing` computes both for a whole sequence (training samples, prompts); a `Clock` runs
the same rule one id at a time (generation), so the two can never disagree.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import numpy as np

from mmm.data.layout import time_signature_of
from mmm.tokenizer import Vocab


class TimingTables:
    """Per model id: does it open a bar, and the last `Position` value inside it (-1: none)."""

    _instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        position = np.full(vocab.base_size, -1, dtype=np.int64)
        for token, i in vocab.tokenizer.vocab.items():
            if token.startswith("Position_"):
                position[i] = int(token.split("_")[1])
        self.opens_bar = [bases[0] == vocab.bar for bases in vocab.model_to_base]
        self.opens_bar[vocab.infill_bar] = True
        self.last_position = [int(max(position[list(bases)].max(), -1)) for bases in vocab.model_to_base]
        # REMI counts a bar's positions per beat of its time signature's denominator.
        resolution = vocab.tokenizer.config.max_num_pos_per_beat
        self.stride = max(
            time_signature_of(t)[0] * resolution for t in vocab.tokenizer.vocab if t.startswith("TimeSig_")
        )

    @classmethod
    def of(cls, vocab: Vocab) -> TimingTables:
        """The tables of `vocab`, built once."""
        tables = cls._instances.get(vocab)
        if tables is None:
            tables = cls._instances[vocab] = cls(vocab)
        return tables


TIMINGS = ("bar", "onset")


class Clock:
    """The musical time of ids read one at a time: `advance(id)` returns the time of that id."""

    def __init__(self, tables: TimingTables, kind: str = "onset") -> None:
        if kind not in TIMINGS:
            raise ValueError(f"musical time kind must be one of {TIMINGS}, got {kind!r}")
        self.tables = tables
        self.stride = tables.stride if kind == "onset" else 0
        self.bar = -1  # bars started in the current track (-1: none yet)
        self.onset = 0  # last Position value in the current bar
        self.first_infill = 0  # bar of the first Infill_Bar seen (where the fill section starts)
        self.seen_infill = False

    def advance(self, model_id: int) -> int:
        tables, vocab = self.tables, self.tables.vocab
        if model_id == vocab.track_start:
            self.bar, self.onset = -1, 0
        elif model_id == vocab.fill_start:
            self.bar, self.onset = self.first_infill - 1, 0
        elif tables.opens_bar[model_id]:
            self.bar += 1
            self.onset = 0
            if model_id == vocab.infill_bar and not self.seen_infill:
                self.first_infill, self.seen_infill = self.bar, True
        position = tables.last_position[model_id]
        if position >= 0:
            self.onset = position
        bar = max(self.bar, 0)
        return bar * self.stride + self.onset if self.stride else bar

    def copy(self) -> Clock:
        return copy.copy(self)


def target_flags(ids: np.ndarray, vocab: Vocab) -> np.ndarray:
    """1 on the target track's block and after `FillBar_Start`, 0 elsewhere (see the module)."""
    ids = np.asarray(ids)
    block = np.cumsum(ids == vocab.track_start)  # block k: from the k-th Track_Start to the next
    infill = np.flatnonzero(ids == vocab.infill_bar)
    flags = block == (block[infill[0]] if len(infill) else block[-1])
    fill = np.flatnonzero(ids == vocab.fill_start)
    if len(fill):
        flags[fill[0] :] = True
    return flags.astype(np.int64)


def sequence_timing(ids: Sequence[int], vocab: Vocab, kind: str = "onset") -> tuple[np.ndarray, np.ndarray, Clock]:
    """(musical time of `kind`, target flag) of every id of a sequence, int64 arrays like `ids`,
    and the clock standing after the last id (a prompt's: it times the ids generated after it)."""
    clock = Clock(TimingTables.of(vocab), kind)
    times = np.fromiter((clock.advance(int(i)) for i in ids), dtype=np.int64, count=len(ids))
    return times, target_flags(np.asarray(ids), vocab), clock
