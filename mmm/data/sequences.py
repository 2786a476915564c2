"""Training sequences built at load time from a stored chunk, by slicing id arrays.

Format (docs/token_format.rst, sections "One sequence per sample" and "Bar layout"), one sequence per sample, model (BPE) ids:

    BOS
    Track_Start Program_p [track ACs] Bar ... Track_End        one block per kept track
    ...                                                        (shuffled order)
  bar infill: the target track has its bars a..b-1 replaced by (b-a) x Infill_Bar, and after
    all tracks comes  FillBar_Start <bars a..b-1, bar ACs inline> FillBar_End
  new track: the target track comes last, with its track ACs and bar ACs on some bars.

Attribute controls are given only for what the model must generate (the infilled bars, the
target track), as at inference. Loss is masked on prompt-only tokens: Infill_Bar,
FillBar_Start and every AC token, in model-id space (ACs never merge under our BPE).
Augmentation works on ids: Pitch ids shift by a transposition (drums untouched, pitch-class
ACs rotate with it), Velocity ids by a few bins.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain

import numpy as np
from miditok.constants import MIDI_INSTRUMENTS

from mmm.config import at_least, check_section, interval, within
from mmm.controls.measure import pitch_class_rotation
from mmm.data.layout import TRACK_FRAME, insert_bar_acs
from mmm.tokenizer import Vocab

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceConfig:
    """`data.sequences`: how training samples are drawn (configs/data/common.yaml explains each key).
    `*_ratio` pairs are ranges [a, b] a fraction is drawn from uniformly."""

    infill_ratio: float = field(metadata=within(0, 1))
    all_tracks_ratio: float = field(metadata=within(0, 1))
    tracks_ratio: tuple[float, float] = field(metadata=interval())
    infill_bars_ratio: tuple[float, float] = field(metadata=interval())
    track_acs_ratio: tuple[float, float] = field(metadata=interval())
    uncontrolled_ratio: float = field(metadata=within(0, 1))
    bar_acs_ratio: tuple[float, float] = field(metadata=interval())
    ac_bars_ratio: tuple[float, float] = field(metadata=interval())
    context_loss: bool
    pitch_shift: int = field(metadata=at_least(0))
    velocity_shift: int = field(metadata=at_least(0))


@dataclass
class SampleSpec:
    """Every random choice of one sample; the fast path and the reference path share it."""

    task: str  # "infill" or "track"
    tracks: list[int]  # chunk track indices, in sequence order (target included)
    target: int
    span: tuple[int, int] = (0, 0)  # bars [a, b) to infill
    track_acs: list[int] = field(default_factory=list)  # positions in vocab.track_acs
    bar_acs: list[int] = field(default_factory=list)  # positions in vocab.bar_acs
    ac_bars: list[int] = field(default_factory=list)  # target bars given bar ACs
    pitch_shift: int = 0
    velocity_shift: int = 0


@dataclass
class TrackPart:
    """One track ready for assembly: base ids per bar (augmented), ACs selected."""

    program: int
    bars: list[list[int]]
    track_acs: list[int] = field(default_factory=list)
    bar_acs: dict[int, list[int]] = field(default_factory=dict)  # bar -> AC ids


def assemble(
    spec: SampleSpec, parts: Mapping[int, TrackPart], vocab: Vocab, fill_program: bool = False
) -> list[list[int]]:
    """Words of base ids (one per bar, one per structural token); BPE never crosses words. With
    `fill_program` the fill section opens with the target's `Program` (`ModelConfig.fill_program`)."""
    words: list[list[int]] = [[vocab.bos]]
    fill: list[list[int]] = []
    for t in spec.tracks:
        part = parts[t]
        words.append([vocab.track_start])
        words.append([vocab.program_id[part.program]])
        is_target = t == spec.target
        if is_target:
            words.extend([a] for a in part.track_acs)
        for b, bar in enumerate(part.bars):
            bar = insert_bar_acs(bar, part.bar_acs.get(b, ()), vocab) if is_target else bar
            if is_target and spec.task == "infill" and spec.span[0] <= b < spec.span[1]:
                words.append([vocab.infill_bar])
                fill.append(bar)
            else:
                words.append(bar)
        words.append([vocab.track_end])
    if spec.task == "infill":
        words.append([vocab.fill_start])
        if fill_program:
            words.append([vocab.program_id[parts[spec.target].program]])
        words.extend(fill)
        words.append([vocab.fill_end])
    return words


def encode_sample(
    words: Sequence[Sequence[int]], vocab: Vocab, context_loss: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Model ids and labels (prompt-only tokens set to IGNORE_INDEX). With `context_loss=False`
    only the generated part is a target: the FillBar section of an infill, the last track's
    bars of a new-track sample."""
    ids = np.asarray(vocab.encode_words(words), dtype=np.int64)
    labels = ids.copy()
    labels[vocab.prompt_only_model[ids]] = IGNORE_INDEX
    fill = np.flatnonzero(ids == vocab.fill_start)
    if len(fill) and fill[-1] + 1 < len(ids) and vocab.is_program[ids[fill[-1] + 1]]:
        labels[fill[-1] + 1] = IGNORE_INDEX  # the target's program heading the fill section: prompt
    if not context_loss:
        labels[: generated_start(ids, vocab)] = IGNORE_INDEX
    return ids, labels


def generated_start(ids: np.ndarray, vocab: Vocab) -> int:
    """Index of the first id the model generates at inference: after `FillBar_Start` (and the
    target's `Program` heading the fill section, if any) for an infill, after the last
    `Track_Start Program` for a new track (its ACs are prompt-only)."""
    fill = np.flatnonzero(ids == vocab.fill_start)
    if len(fill):
        after = int(fill[-1]) + 1
        return after + 1 if after < len(ids) and vocab.is_program[ids[after]] else after
    return int(np.flatnonzero(ids == vocab.track_start)[-1]) + 2


def empty_bar_marker(vocab: Vocab) -> int | None:
    """Base id of `ACBarNoteDensity_0`, given to an empty bar whose bar ACs are given (miditok
    computes no AC for an empty bar). Without it, "this bar has no AC token" would mean "this
    bar is empty" in training, and a model asked for bars without controls writes silence."""
    return vocab.tokenizer.vocab.get("ACBarNoteDensity_0")


class SequenceBuilder:
    """Draws a `SampleSpec` for a stored chunk and builds its sequence from token ids."""

    def __init__(
        self,
        vocab: Vocab,
        cfg: SequenceConfig | Mapping,
        max_seq_len: int,
        fill_program: bool = False,
        target_last: bool = False,
    ) -> None:
        """`fill_program`, `target_last`: the model's `ModelConfig` settings of the same names (the
        fill section opens with the target's program; an infill sample lists the target last)."""
        self.vocab = vocab
        self.cfg = check_section("data.sequences", cfg, SequenceConfig)
        self.fill_program, self.target_last = fill_program, target_last
        self.empty_marker = empty_bar_marker(vocab)
        self.max_seq_len = max_seq_len
        self.rotation = pitch_class_rotation(vocab)
        self._tables: dict[tuple[int, int], np.ndarray] = {}
        lo, hi = (int(x) for x in np.flatnonzero(vocab.pitch_id >= 0)[[0, -1]])
        self.pitch_range = (lo, hi)

    # -- random choices -------------------------------------------------------------------
    def draw_spec(self, chunk: Mapping, rng: random.Random) -> SampleSpec:
        cfg, bars = self.cfg, chunk["bars"]
        num_tracks, num_bars = len(bars), len(bars[0])
        with_notes = [t for t in range(num_tracks) if any(self._has_notes(bar) for bar in bars[t])]
        target = rng.choice(with_notes or list(range(num_tracks)))
        # Drawn only when asked for, so that a recipe without it draws the samples it always did.
        if cfg.all_tracks_ratio and rng.random() < cfg.all_tracks_ratio:
            keep = num_tracks
        else:
            keep = max(1, round(rng.uniform(*cfg.tracks_ratio) * num_tracks))
        others = [t for t in range(num_tracks) if t != target]
        rng.shuffle(others)
        context = others[: keep - 1]
        task = "infill" if rng.random() < cfg.infill_ratio else "track"
        spec = SampleSpec(task=task, tracks=[], target=target)
        spec.tracks = context + [target]
        if task == "infill":
            rng.shuffle(spec.tracks)
            if self.target_last:
                spec.tracks.remove(target)
                spec.tracks.append(target)
            n = min(num_bars, max(1, round(rng.uniform(*cfg.infill_bars_ratio) * num_bars)))
            a = rng.randrange(0, num_bars - n + 1)
            spec.span = (a, a + n)
        generated = list(range(*spec.span)) if task == "infill" else list(range(num_bars))
        n_track_acs = len(self.vocab.track_acs)
        spec.track_acs = sorted(rng.sample(range(n_track_acs), round(rng.uniform(*cfg.track_acs_ratio) * n_track_acs)))
        # Uncontrolled samples (no bar AC at all) teach the model what a bar is like when the
        # user gives no control, the common case at inference.
        if rng.random() >= cfg.uncontrolled_ratio:
            n_bar_acs = len(self.vocab.bar_acs)
            spec.bar_acs = sorted(rng.sample(range(n_bar_acs), round(rng.uniform(*cfg.bar_acs_ratio) * n_bar_acs)))
            n = round(rng.uniform(*cfg.ac_bars_ratio) * len(generated))
            spec.ac_bars = sorted(rng.sample(generated, n))
        spec.pitch_shift = rng.choice(self.feasible_shifts(chunk, spec.tracks))
        spec.velocity_shift = rng.randint(-cfg.velocity_shift, cfg.velocity_shift)
        return spec

    def _has_notes(self, bar: Sequence[int]) -> bool:
        return any(self.vocab.is_note_start[t] for t in bar)

    def feasible_shifts(self, chunk: Mapping, tracks: Sequence[int]) -> list[int]:
        """Transpositions within ±pitch_shift keeping every pitched note inside the tokenizer
        range and inside the instrument's tessitura (or its own range, if already wider)."""
        k = self.cfg.pitch_shift
        lo_shift, hi_shift = -k, k
        for t in tracks:
            program = chunk["programs"][t]
            if program < 0:
                continue
            pitches = self.vocab.pitch_of[np.fromiter(chain.from_iterable(chunk["bars"][t]), dtype=np.int64)]
            pitches = pitches[pitches >= 0]
            if len(pitches) == 0:
                continue
            low, high = int(pitches.min()), int(pitches.max())
            tess = MIDI_INSTRUMENTS[program]["pitch_range"]
            floor = max(self.pitch_range[0], min(tess.start, low))
            ceil = min(self.pitch_range[1], max(tess.stop - 1, high))
            lo_shift, hi_shift = max(lo_shift, floor - low), min(hi_shift, ceil - high)
        return list(range(lo_shift, hi_shift + 1)) if lo_shift <= hi_shift else [0]

    # -- fast path: token ids ------------------------------------------------------------
    def _augmentation_table(self, spec: SampleSpec, drums: bool) -> np.ndarray | None:
        """base id -> augmented base id for this sample's shifts (cached: few combinations)."""
        key = (0 if drums else spec.pitch_shift, spec.velocity_shift)
        if key == (0, 0):
            return None
        if key not in self._tables:
            v = self.vocab
            table = np.arange(v.base_size)
            pitch = v.pitch_of[table]
            is_pitch = pitch >= 0
            table[is_pitch] = v.pitch_id[np.clip(pitch[is_pitch] + key[0], 0, 127)]
            vel = v.velocity_index_of[table]
            is_vel = vel >= 0
            table[is_vel] = v.velocity_ids[np.clip(vel[is_vel] + key[1], 0, len(v.velocity_ids) - 1)]
            self._tables[key] = table
        return self._tables[key]

    def augment_bars(self, bars: Sequence[Sequence[int]], spec: SampleSpec, drums: bool) -> list[list[int]]:
        """Pitch (not drums) and velocity shifts on ids: one table lookup for the whole track."""
        table = self._augmentation_table(spec, drums)
        if table is None:
            return [list(bar) for bar in bars]
        lengths = [len(bar) for bar in bars]
        flat = table[np.fromiter(chain.from_iterable(bars), dtype=np.int64, count=sum(lengths))].tolist()
        ends = list(accumulate(lengths))
        return [flat[end - n : end] for end, n in zip(ends, lengths)]

    def parts(self, chunk: Mapping, spec: SampleSpec) -> dict[int, TrackPart]:
        parts = {}
        for t in spec.tracks:
            drums = chunk["programs"][t] < 0
            part = TrackPart(program=chunk["programs"][t], bars=self.augment_bars(chunk["bars"][t], spec, drums))
            if t == spec.target:
                part.track_acs = [i for f in spec.track_acs for i in chunk["track_acs"][t][f]]
                rotate = self.rotation.get(spec.pitch_shift % 12, {}) if not drums else {}
                for b in spec.ac_bars if spec.bar_acs else ():
                    acs = [i for f in spec.bar_acs for i in self._rotated(chunk["bar_acs"][t][b][f], rotate)]
                    if not acs and self.empty_marker is not None and not self._has_notes(chunk["bars"][t][b]):
                        acs = [self.empty_marker]
                    if acs:
                        part.bar_acs[b] = acs
            parts[t] = part
        return parts

    @staticmethod
    def _rotated(ids: Sequence[int], rotate: Mapping[int, int]) -> list[int]:
        if not rotate or not ids or ids[0] not in rotate:
            return list(ids)
        return sorted(rotate[i] for i in ids)  # miditok lists pitch classes in ascending order

    # -- length budget -------------------------------------------------------------------
    def build(self, chunk: Mapping, spec: SampleSpec, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """Build the sample, dropping context tracks (then ACs, then outer bars) until it
        fits `max_seq_len`. A bar is never cut and every track keeps its Track_End."""
        while True:
            parts = self.parts(chunk, spec)
            words = assemble(spec, parts, self.vocab, self.fill_program)
            ids, labels = encode_sample(words, self.vocab, self.cfg.context_loss)
            if len(ids) <= self.max_seq_len:
                return ids, labels
            if len(spec.tracks) > 1:
                # BPE never crosses words, so a context track's block adds a fixed number of
                # ids: drop tracks by arithmetic, then build the sample once more.
                excess = len(ids) - self.max_seq_len
                while excess > 0 and len(spec.tracks) > 1:
                    t = rng.choice([t for t in spec.tracks if t != spec.target])
                    spec.tracks.remove(t)
                    excess -= TRACK_FRAME + len(self.vocab.encode_words(parts[t].bars))
            elif spec.track_acs or spec.bar_acs:
                spec.track_acs, spec.bar_acs = [], []
            else:
                chunk = self._crop(chunk, spec, len(ids))

    def _crop(self, chunk: Mapping, spec: SampleSpec, length: int) -> dict:
        """Drop one bar at the edge farthest from the infill span; when the span is all that is
        left, its own last bar (a chunk made for a longer context still gives samples)."""
        num_bars = len(chunk["bars"][0])
        a, b = spec.span if spec.task == "infill" else (0, 0)
        if num_bars <= 1:
            raise ValueError(
                f"a single bar of a single track needs {length} tokens > max_seq_len={self.max_seq_len}: "
                "raise data.max_seq_len"
            )
        drop_first = spec.task == "infill" and a > num_bars - b
        sl = slice(1, None) if drop_first else slice(None, -1)
        chunk = {
            **chunk,
            "bars": [bars[sl] for bars in chunk["bars"]],
            "bar_acs": [bars[sl] for bars in chunk["bar_acs"]],
        }
        if drop_first:
            spec.span = (a - 1, b - 1)
            spec.ac_bars = [x - 1 for x in spec.ac_bars if x > 0]
        else:
            spec.ac_bars = [x for x in spec.ac_bars if x < num_bars - 1]
            if spec.task == "infill" and b == num_bars:
                spec.span = (a, b - 1)
        return chunk

    def __call__(self, chunk: Mapping, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        return self.build(chunk, self.draw_spec(chunk, rng), rng)
