"""Infill requests drawn as `mmm.evaluate` draws them, shared by this experiment's scripts."""

from __future__ import annotations

import random
from collections.abc import Iterator

from mmm.data.store import Store
from mmm.evaluate.analysis import window_score
from mmm.generation.scores import count_bars


def has_notes(bar, vocab) -> bool:
    return any(vocab.is_note_start[i] for i in bar)


def infill_requests(
    store: Store, rng: random.Random, tokenizer, vocab, num_bars: int = 4, window: int = 16
) -> Iterator[tuple]:
    """Endless requests: a `window`-bar window of a random stored chunk as a Score, a track with
    notes in a random span of `num_bars` bars of it; yields (score, track, (a, b), the real bars
    of that span as base ids). The caller may draw from `rng` between two requests."""
    while True:
        chunk = store[rng.randrange(len(store))]
        nb = len(chunk["bars"][0])
        n = min(window, nb)
        first = rng.randrange(0, nb - n + 1)
        score, kept = window_score(chunk, first, n, tokenizer, vocab)
        n = min(n, count_bars(score, tokenizer))
        if not kept or n < num_bars:
            continue
        a = rng.randrange(0, n - num_bars + 1)
        b = a + num_bars
        candidates = [
            j for j, t in enumerate(kept) if any(has_notes(x, vocab) for x in chunk["bars"][t][first + a : first + b])
        ]
        if not candidates:
            continue
        target = rng.choice(candidates)
        yield score, target, (a, b), [list(x) for x in chunk["bars"][kept[target]][first + a : first + b]]
