"""Evaluation statistics with no model inside: n-gram baselines over model ids, musical
statistics of a span of bars, control adherence scores, Spearman correlation, overlap.

N-gram baselines. Both predict exactly the positions the transformer is scored on (targets
`labels[1:] != IGNORE_INDEX`, each from the previous *input* id, which may be a prompt-only
token), over the model vocabulary (V ids, BPE included), and are fitted on training
sequences built like the model's.
- unigram, add-one (Laplace): P(w) = (c(w) + 1) / (N + V): no id gets probability 0.
- bigram, interpolated Kneser-Ney (one discount d, 0.75 by default):
  P(w|v) = max(c(v,w) - d, 0) / c(v) + d * T(v) / c(v) * Pc(w), T(v) = distinct w after v,
  and Pc(w) = (N1+(.,w) + 1) / (B + V), the continuation probability (in how many contexts
  w was seen, B = distinct bigrams), add-one smoothed so that an id never seen stays > 0.
  An unseen context v backs off to Pc(w). Each distribution sums to 1 (tested).

Musical statistics follow the definitions of MusPy (Dong et al., 2020) and of the papers it
cites (Wu & Yang 2020; Mogren 2016; MuseGAN), measured on a *span* of bars of length L
ticks rather than on a whole song: MusPy takes the length of a piece from its last note
end, so trailing empty bars of a span would not count as empty and a note ending on the
span end adds a phantom bar; here the span sets the number of beats and bars. On a piece
whose last note ends inside its last beat the values equal MusPy's (tested when installed).
Pitch statistics ignore drums; empty beats and groove count every note, as in MusPy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mmm.data.sequences import IGNORE_INDEX

LOG2 = math.log(2)


# --- n-gram baselines -------------------------------------------------------------------------
def targets(ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(previous id, target id, mask over positions 1..T-1) of one sequence: what a causal
    model predicts (position j from the ids before j) when its loss uses `labels`."""
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    mask = labels[1:] != IGNORE_INDEX
    return ids[:-1][mask], labels[1:][mask], mask


class UnigramLM:
    """Add-one smoothed unigram over `vocab_size` ids."""

    name = "unigram"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def fit(self, sequences: Iterable[tuple[np.ndarray, np.ndarray]]) -> UnigramLM:
        for ids, labels in sequences:
            _, tgt, _ = targets(ids, labels)
            self.counts += np.bincount(tgt, minlength=self.vocab_size)
        return self

    def prob(self, prev: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        del prev
        return (self.counts[tgt] + 1) / (self.counts.sum() + self.vocab_size)

    def bits(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """-log2 P of every target of one sequence (positions of `targets(...)[2]`)."""
        prev, tgt, _ = targets(ids, labels)
        return -np.log2(self.prob(prev, tgt))


class BigramKN:
    """Interpolated Kneser-Ney bigram (see the module docstring), sparse counts."""

    name = "bigram"

    def __init__(self, vocab_size: int, discount: float = 0.75) -> None:
        if not 0 < discount < 1:
            raise ValueError(f"kn_discount must be in (0, 1), got {discount}")
        self.vocab_size, self.d = vocab_size, discount
        self.keys = np.zeros(0, dtype=np.int64)  # sorted v * V + w of seen bigrams
        self.key_counts = np.zeros(0, dtype=np.int64)

    def fit(self, sequences: Iterable[tuple[np.ndarray, np.ndarray]]) -> BigramKN:
        V = self.vocab_size
        parts = [self.keys.repeat(self.key_counts)]
        for ids, labels in sequences:
            prev, tgt, _ = targets(ids, labels)
            parts.append(prev * V + tgt)
        self.keys, self.key_counts = np.unique(np.concatenate(parts), return_counts=True)
        v, w = self.keys // V, self.keys % V
        self.context_count = np.bincount(v, weights=self.key_counts, minlength=V)  # c(v)
        self.followers = np.bincount(v, minlength=V)  # T(v)
        continuation = np.bincount(w, minlength=V)  # N1+(., w)
        self.p_cont = (continuation + 1) / (len(self.keys) + V)
        return self

    def prob(self, prev: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        prev, tgt = np.asarray(prev, dtype=np.int64), np.asarray(tgt, dtype=np.int64)
        key = prev * self.vocab_size + tgt
        pos = np.searchsorted(self.keys, key)
        pos_ok = np.minimum(pos, max(len(self.keys) - 1, 0))
        seen = (pos < len(self.keys)) & (self.keys[pos_ok] == key) if len(self.keys) else np.zeros(len(key), bool)
        pair = np.where(seen, self.key_counts[pos_ok] if len(self.keys) else 0, 0)
        c = self.context_count[prev]
        p_cont = self.p_cont[tgt]
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.maximum(pair - self.d, 0) / c + self.d * self.followers[prev] / c * p_cont
        return np.where(c > 0, p, p_cont)

    def bits(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        prev, tgt, _ = targets(ids, labels)
        return -np.log2(self.prob(prev, tgt))


# --- musical statistics of a span -------------------------------------------------------------
MUSICAL_STATS = (
    "pitch_class_entropy",
    "scale_consistency",
    "polyphony",
    "pitch_range",
    "empty_beat_rate",
    "groove_consistency",
)
_MAJOR = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1], bool)
_MINOR = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0], bool)
_SCALES = np.array([np.roll(s, root) for s in (_MAJOR, _MINOR) for root in range(12)])


def musical_stats(
    time: Sequence[int],
    duration: Sequence[int],
    pitch: Sequence[int],
    is_drum: Sequence[bool],
    length: int,
    ticks_per_beat: int,
    ticks_per_bar: int,
) -> dict[str, float]:
    """The six statistics of the notes of a span `[0, length)` (times relative to its start).

    NaN where undefined: pitch statistics without pitched notes, groove with fewer than 2 bars.
    - pitch_class_entropy: entropy (bits) of the pitch-class histogram of the notes.
    - scale_consistency: largest fraction of notes inside one major or natural-minor scale.
    - polyphony: mean number of pitches sounding, over the ticks where at least one sounds.
    - pitch_range: highest minus lowest pitch (semitones).
    - empty_beat_rate: fraction of the span's beats during which no note sounds.
    - groove_consistency: 1 - mean Hamming distance between the onset patterns of
      consecutive bars, divided by the positions per bar (1 = the same rhythm every bar).
    """
    time = np.asarray(time, dtype=np.int64)
    end = time + np.maximum(np.asarray(duration, dtype=np.int64), 1)
    pitch = np.asarray(pitch, dtype=np.int64)
    drum = np.asarray(is_drum, dtype=bool)
    if length < 1 or ticks_per_beat < 1 or ticks_per_bar < 1:
        raise ValueError("length, ticks_per_beat and ticks_per_bar must be positive")
    out = dict.fromkeys(MUSICAL_STATS, math.nan)
    pitched = ~drum
    if pitched.any():
        pcs = np.bincount(pitch[pitched] % 12, minlength=12)
        prob = pcs[pcs > 0] / pcs.sum()
        out["pitch_class_entropy"] = float(-(prob * np.log2(prob)).sum())
        out["scale_consistency"] = float((_SCALES @ pcs).max() / pcs.sum())
        out["pitch_range"] = float(pitch[pitched].max() - pitch[pitched].min())
        roll = np.zeros((int(end[pitched].max()), 128), dtype=bool)
        for t, e, p in zip(time[pitched], end[pitched], pitch[pitched]):
            roll[t:e, p] = True
        sounding = roll.sum(1)
        out["polyphony"] = float(sounding.sum() / np.count_nonzero(sounding))
    num_beats = -(-length // ticks_per_beat)
    busy = np.zeros(num_beats, dtype=bool)
    for t, e in zip(time, np.minimum(end, length)):
        if t < length:
            busy[t // ticks_per_beat : (e - 1) // ticks_per_beat + 1] = True
    out["empty_beat_rate"] = float(1 - busy.mean())
    num_bars = -(-length // ticks_per_bar)
    if num_bars >= 2:
        groove = np.zeros((num_bars, ticks_per_bar), dtype=bool)
        inside = time < length
        groove[time[inside] // ticks_per_bar, time[inside] % ticks_per_bar] = True
        distance = np.count_nonzero(groove[:-1] != groove[1:])
        out["groove_consistency"] = float(1 - distance / (ticks_per_bar * (num_bars - 1)))
    return out


def histogram_overlap(a: Sequence[float], b: Sequence[float], bins: int = 10) -> float:
    """Overlapping area of the normalised histograms of `a` and `b` on shared bins (0..1);
    NaN values are left out, NaN when either side is empty."""
    a = np.asarray([x for x in a if not math.isnan(x)], dtype=float)
    b = np.asarray([x for x in b if not math.isnan(x)], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    pa = np.histogram(a, edges)[0] / len(a)
    pb = np.histogram(b, edges)[0] / len(b)
    return float(np.minimum(pa, pb).sum())


# --- control adherence -----------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); NaN when fewer than 3 pairs or
    when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 3:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def adherence(
    requested: Sequence[Any], achieved: Sequence[Any], kind: str, bins: Sequence[float] | None = None
) -> dict[str, Any]:
    """Scores of achieved vs requested control values.

    `kind` as in `mmm.controls.table.Controls`: "int" (ordinal bins), "float" (snapped to `bins`),
    "set" / "durations" (sets). An achieved value of None (e.g. no note in the bar) is a miss.
    Ordinal kinds get exact, within_1 (one bin away) and spearman (over defined pairs); set
    kinds get exact and the mean Jaccard similarity.
    """
    n = len(requested)
    if n != len(achieved):
        raise ValueError("adherence: requested and achieved differ in length")
    out: dict[str, Any] = {"n": n}
    if n == 0:
        return {**out, "exact": math.nan}
    if kind in ("int", "float"):

        def index(v: Any) -> float:
            if v is None:
                return math.nan
            if kind == "int":
                return float(v)
            return float(np.argmin([abs(b - v) for b in bins]))  # bin index

        req = np.array([index(v) for v in requested])
        ach = np.array([index(v) for v in achieved])
        defined = ~np.isnan(ach)
        diff = np.abs(req - ach)
        out["exact"] = float(np.mean(defined & (diff == 0)))
        out["within_1"] = float(np.mean(defined & (diff <= 1)))
        out["spearman"] = spearman(req[defined], ach[defined])
        out["mean_abs_error"] = float(diff[defined].mean()) if defined.any() else math.nan
        return out
    if kind in ("set", "durations"):
        exact, jaccard = [], []
        for r, a in zip(requested, achieved):
            r, a = set(r), set(a) if a is not None else None
            exact.append(a is not None and r == a)
            jaccard.append(0.0 if a is None else (len(r & a) / len(r | a) if r | a else 1.0))
        return {**out, "exact": float(np.mean(exact)), "jaccard": float(np.mean(jaccard))}
    raise ValueError(f"adherence: unknown control kind {kind!r}")


def summarize(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean of each list, NaN values left out (NaN when none is left)."""
    out = {}
    for key, xs in values.items():
        xs = [x for x in xs if not math.isnan(x)]
        out[key] = float(np.mean(xs)) if xs else math.nan
    return out
