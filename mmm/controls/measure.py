"""Attribute controls (ACs) computed with miditok's own classes, per bar and per track.

miditok's `BarAttributeControl.compute` skips every bar holding a single note (its test is
`note_end_idx > note_start_idx + 1`), so we call each class's per-bar `_compute_on_bar` on
the notes of every non-empty bar ourselves. Track-level classes are called unchanged.
The results are base ids, grouped per AC family in `tokenizer.attribute_controls` order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from miditok import MMM as MMMTokenizer
from symusic.core import TrackTick

from mmm.tokenizer import Vocab


def _event_ids(tokenizer: MMMTokenizer, events) -> list[int]:
    return [tokenizer.vocab[f"{e.type_}_{e.value}"] for e in events]


def track_controls(
    tokenizer: MMMTokenizer, vocab: Vocab, track: TrackTick, tpq: int, bar_ticks: Sequence[int]
) -> list[list[int]]:
    """Ids of each track-level AC family for `track` (empty list when not computable)."""
    if len(track.notes) == 0:
        return [[] for _ in vocab.track_acs]
    return [
        _event_ids(tokenizer, tokenizer.attribute_controls[i].compute(track, tpq, list(bar_ticks), [], []))
        for i in vocab.track_acs
    ]


def bar_controls(
    tokenizer: MMMTokenizer, vocab: Vocab, track: TrackTick, tpq: int, bar_ticks: Sequence[int]
) -> list[list[list[int]]]:
    """Per bar, the ids of each bar-level AC family (all empty for an empty bar)."""
    notes = track.notes.numpy()
    onsets = notes["time"]
    bounds = np.searchsorted(onsets, np.asarray(list(bar_ticks) + [np.iinfo(np.int64).max]), side="left")
    families = [tokenizer.attribute_controls[i] for i in vocab.bar_acs]
    result = []
    for b in range(len(bar_ticks)):
        lo, hi = bounds[b], bounds[b + 1]
        if hi <= lo:
            result.append([[] for _ in families])
            continue
        bar_notes = {key: value[lo:hi] for key, value in notes.items()}
        result.append([_event_ids(tokenizer, ac._compute_on_bar(bar_notes, {}, {}, tpq)) for ac in families])
    return result


def pitch_class_rotation(vocab: Vocab) -> dict[int, list[int]]:
    """For each transposition k in 0..11, the base-id map of ACBarPitchClass_p -> _(p+k)%12."""
    ids = [vocab.tokenizer.vocab.get(f"ACBarPitchClass_{p}") for p in range(12)]
    if any(i is None for i in ids):
        return {}
    return {k: {ids[p]: ids[(p + k) % 12] for p in range(12)} for k in range(12)}
