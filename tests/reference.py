"""The slow reference path of the sequence builder (DESIGN.md §4): everything done by miditok
on a `symusic.Score`, nothing by id arithmetic.

For a fixed `SampleSpec` and a stored chunk:
1. decode the chunk's base ids to a Score (one `tokenizer.decode` per track: tracks stay
   aligned with the chunk even when one is empty; global events from the first track);
2. augment the Score: transpose the pitched tracks by `spec.pitch_shift`, move every velocity
   `spec.velocity_shift` bins along `tokenizer.velocities` (clipped at the ends);
3. preprocess and re-encode every track with miditok, without attribute controls; split the
   tokens in bars and give every track the chunk's number of bars (`Bar TimeSig` empty bars);
4. recompute the attribute controls on the augmented Score with miditok's own classes:
   track-level families via `.compute`, bar-level ones via `_compute_on_bar` on the notes of
   each non-empty bar (miditok's `compute` skips single-note bars), over the chunk's bars;
5. build the `TrackPart`s (an empty bar given bar ACs gets `ACBarNoteDensity_0`) and go
   through `assemble` + `encode_sample`.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction

import numpy as np
from miditok import MMM
from symusic import Note, Score, Track

from mmm.data.layout import split_bars
from mmm.data.sequences import SampleSpec, TrackPart, assemble, encode_sample
from mmm.tokenizer import Vocab


def _events_to_ids(tokenizer: MMM, events) -> list[int]:
    return [tokenizer.vocab[f"{e.type_}_{e.value}"] for e in events]


def decode_chunk(chunk: Mapping, tokenizer: MMM, vocab: Vocab) -> tuple[Score, list[bool]]:
    """The chunk as a Score (chunk-relative times, tokenizer time division), one Track per
    chunk track (empty Track where the chunk has no note), and which tracks are empty."""
    score = None
    tracks, empty = [], []
    for program, bars in zip(chunk["programs"], chunk["bars"]):
        ids = [vocab.track_start, vocab.program_id[program], *(i for bar in bars for i in bar), vocab.track_end]
        decoded = tokenizer.decode(ids)
        if score is None:  # global events (tempos, time signatures): the first track's
            score = Score(decoded.tpq)
            score.tempos = decoded.tempos.copy()
            score.time_signatures = decoded.time_signatures.copy()
        if len(decoded.tracks) == 0:
            tracks.append(Track("", 0 if program < 0 else program, program < 0))
            empty.append(True)
        else:
            assert len(decoded.tracks) == 1, "one track sequence decodes to one track"
            tracks.append(decoded.tracks[0])
            empty.append(False)
    for t in tracks:
        score.tracks.append(t)
    return score, empty


def augment_score(score: Score, tokenizer: MMM, pitch_shift: int, velocity_shift: int) -> Score:
    """Transpose pitched tracks, shift velocities along the tokenizer's velocity bins."""
    score = score.copy()
    bins = np.asarray(tokenizer.velocities)
    for track in score.tracks:
        if len(track.notes) == 0:
            continue
        notes = track.notes.numpy()
        if not track.is_drum and pitch_shift:
            notes["pitch"] = notes["pitch"] + pitch_shift
        if velocity_shift:
            index = np.searchsorted(bins, notes["velocity"])
            assert np.array_equal(bins[index], notes["velocity"]), "decoded velocities are bin values"
            notes["velocity"] = bins[np.clip(index + velocity_shift, 0, len(bins) - 1)]
        track.notes = Note.from_numpy(
            time=notes["time"], duration=notes["duration"], pitch=notes["pitch"], velocity=notes["velocity"]
        )
    return score


def _empty_bar(score: Score, tick: int, vocab: Vocab) -> list[int]:
    ts = [t for t in score.time_signatures if t.time <= tick][-1]
    return [vocab.bar, vocab.tokenizer.vocab[f"TimeSig_{ts.numerator}/{ts.denominator}"]]


def preprocess(score: Score, empty: list[bool], tokenizer: MMM) -> Score:
    """miditok's preprocessing, with the tracks it drops for being empty put back in place."""
    pre = tokenizer.preprocess_score(score)
    kept = iter(pre.tracks)
    tracks = []
    for t, is_empty in zip(score.tracks, empty):
        tracks.append(Track("", t.program, t.is_drum) if is_empty else next(kept))
    assert next(kept, None) is None, "preprocessing dropped a track with notes"
    pre.tracks = tracks
    return pre


def encode_tracks(pre: Score, tokenizer: MMM, vocab: Vocab, bar_ticks: list[int]) -> list[list[list[int]]]:
    """Each track of a preprocessed score encoded (no ACs) as bars of base ids, padded with
    empty bars to the chunk's `len(bar_ticks)` bars."""
    num_bars = len(bar_ticks)
    seqs = tokenizer.encode(pre, encode_ids=False, no_preprocess_score=True, concatenate_track_sequences=False)
    all_bars = []
    for seq in seqs:
        _, bars = split_bars(seq.ids, vocab)
        assert len(bars) <= num_bars, "re-encoding produced more bars than the chunk"
        bars.extend(_empty_bar(pre, bar_ticks[b], vocab) for b in range(len(bars), num_bars))
        all_bars.append(bars)
    return all_bars


def controls(score: Score, tokenizer: MMM, vocab: Vocab, bar_ticks: list[int]) -> tuple[list, list]:
    """Per track: track-AC ids per family (`vocab.track_acs` order) and, per bar, bar-AC ids
    per family (`vocab.bar_acs` order), with miditok's classes."""
    track_acs, bar_acs = [], []
    ends = [*bar_ticks[1:], None]
    for track in score.tracks:
        if len(track.notes) == 0:
            track_acs.append([[] for _ in vocab.track_acs])
            bar_acs.append([[[] for _ in vocab.bar_acs] for _ in bar_ticks])
            continue
        track_acs.append(
            [
                _events_to_ids(
                    tokenizer, tokenizer.attribute_controls[i].compute(track, score.tpq, list(bar_ticks), [], [])
                )
                for i in vocab.track_acs
            ]
        )
        notes = track.notes.numpy()
        per_bar = []
        for start, end in zip(bar_ticks, ends):
            inside = (notes["time"] >= start) & (notes["time"] < end if end is not None else True)
            if not inside.any():
                per_bar.append([[] for _ in vocab.bar_acs])
                continue
            bar_notes = {k: v[inside] for k, v in notes.items()}
            per_bar.append(
                [
                    _events_to_ids(
                        tokenizer, tokenizer.attribute_controls[i]._compute_on_bar(bar_notes, {}, {}, score.tpq)
                    )
                    for i in vocab.bar_acs
                ]
            )
        bar_acs.append(per_bar)
    return track_acs, bar_acs


def reference_sample(chunk: Mapping, spec: SampleSpec, tokenizer: MMM, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Model ids and labels of `spec` on `chunk`, built through miditok on a Score."""
    decoded, empty = decode_chunk(chunk, tokenizer, vocab)
    augmented = augment_score(decoded, tokenizer, spec.pitch_shift, spec.velocity_shift)
    pre = preprocess(augmented, empty, tokenizer)
    # The chunk's bars in the time division of the preprocessed score (exact: same grid).
    scale = Fraction(pre.tpq, chunk["tpq"])
    assert all((t * scale).denominator == 1 for t in chunk["bar_ticks"])
    bar_ticks = [int(t * scale) for t in chunk["bar_ticks"]]
    bars = encode_tracks(pre, tokenizer, vocab, bar_ticks)
    track_acs, bar_acs = controls(pre, tokenizer, vocab, bar_ticks)
    parts = {}
    for t in spec.tracks:
        part = TrackPart(program=chunk["programs"][t], bars=bars[t])
        if t == spec.target:
            part.track_acs = [i for f in spec.track_acs for i in track_acs[t][f]]
            for b in spec.ac_bars if spec.bar_acs else ():
                acs = [i for f in spec.bar_acs for i in bar_acs[t][b][f]]
                if not acs and not any(
                    tok.startswith(("Pitch", "PitchDrum")) for tok in map(vocab.token_of.get, bars[t][b])
                ):
                    acs = [tokenizer.vocab["ACBarNoteDensity_0"]]  # an empty bar given ACs: "no note"
                if acs:
                    part.bar_acs[b] = acs
        parts[t] = part
    return encode_sample(assemble(spec, parts, vocab), vocab)
