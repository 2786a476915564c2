"""Facts about the training data that generation needs, measured once when a model is exported.

- `max_bar_tokens`: a high quantile of the model ids one bar takes (BPE applied, bar ACs not
  counted). Generation sizes its spans and token budgets from it, so a model trained on dense
  piano music gets a larger per-bar budget than one trained on chorales.
- `controls_seen`: every attribute-control id a training sample can hold (with the pitch-class
  rotations that transposition adds, and the empty-bar marker). A control value outside this set
  was never trained, and `MMM` refuses it instead of feeding the model an unknown token.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from mmm.controls.measure import pitch_class_rotation
from mmm.data.sequences import empty_bar_marker
from mmm.data.store import Store
from mmm.tokenizer import Vocab

BAR_QUANTILE = 0.999


def generation_stats(
    store: Store, vocab: Vocab, pitch_shift: int, max_chunks: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """`{"max_bar_tokens", "bar_tokens_quantile", "controls_seen"}` over (a sample of) `store`."""
    if len(store) == 0:
        raise ValueError(f"the {store.split!r} split of {store.path} is empty: nothing to measure")
    chunks = range(len(store))
    if len(store) > max_chunks:
        chunks = sorted(random.Random(seed).sample(chunks, max_chunks))
    lengths: list[int] = []
    seen: set[int] = set()
    any_empty = False
    for i in chunks:
        chunk = store[i]
        for t, bars in enumerate(chunk["bars"]):
            for bar in bars:
                lengths.append(len(vocab.encode_words([bar])))
                any_empty |= not any(vocab.is_note_start[x] for x in bar)
            for family in chunk["track_acs"][t]:
                seen.update(family)
            for bar_acs in chunk["bar_acs"][t]:
                for family in bar_acs:
                    seen.update(family)
    rotation = pitch_class_rotation(vocab)
    for k in range(-pitch_shift, pitch_shift + 1):  # transposed samples rotate pitch-class ACs
        table = rotation.get(k % 12, {})
        seen.update(table[i] for i in list(seen) if i in table)
    marker = empty_bar_marker(vocab)
    if any_empty and marker is not None:
        seen.add(marker)
    quantile = float(np.quantile(lengths, BAR_QUANTILE))
    return {
        "max_bar_tokens": max(8, math.ceil(quantile)),
        "bar_tokens_quantile": BAR_QUANTILE,
        "bars_measured": len(lengths),
        "controls_seen": sorted(int(i) for i in seen),
    }
