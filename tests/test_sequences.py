"""Training sequences (`mmm.data.sequences`) and attribute controls (`mmm.controls.measure`).

Proves: bar ACs hold miditok's own values (`encode(..., attribute_controls_indexes=...)`), and
where miditok skips single-note bars ours does not; they sit right after `Bar TimeSig`, where
the generation grammar forces them (miditok moves them after a bar-start `Position_0 Tempo`);
every built sample is well-formed (BOS, track blocks, infill bars, FillBar section, length
budget, loss mask, requested ACs present after BPE, augmentation) and deterministic; the
fast id-slicing path gives exactly the ids and labels of a slow reference that runs miditok
on an augmented Score (tests/reference.py).
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter

import numpy as np
import pytest
from conftest import chunk_dict, preprocess_settings, sequences_config, synthetic_score
from miditok.utils import get_bars_ticks
from reference import reference_sample
from symusic import Score

from mmm.controls.measure import bar_controls
from mmm.data.chunks import tokenize_score
from mmm.data.layout import insert_bar_acs, split_bars
from mmm.data.sequences import IGNORE_INDEX, SampleSpec, SequenceBuilder, TrackPart, assemble, encode_sample

ONE_CHUNK = dict(min_notes=1, min_bars=1, chunk_max_tokens=10**9, chunk_max_track_tokens=10**9)
SMALL_CHUNKS = dict(min_notes=8, chunk_max_tokens=900, chunk_max_track_tokens=400)


def single_track_scores(score: Score, strip_controls: bool = True) -> list[Score]:
    """One Score per track of `score` (same tempos and time signatures)."""
    out = []
    for track in score.tracks:
        s = Score(score.tpq)
        s.tempos = score.tempos.copy()
        s.time_signatures = score.time_signatures.copy()
        t = track.copy()
        if strip_controls:
            t.controls.clear()
            t.pitch_bends.clear()
            t.pedals.clear()
        s.tracks.append(t)
        out.append(s)
    return out


def n_notes(bar, vocab) -> int:
    return int(sum(vocab.is_note_start[i] for i in bar))


# -- 4. AC placement and values against miditok -----------------------------------------------
def compare_with_miditok_encode(score: Score, tokenizer, vocab) -> Counter:
    """Encode a single-track score with miditok, every AC family on (bar ACs on every bar),
    and compare, per bar holding >= 2 notes, with `insert_bar_acs` + our per-bar ACs, once
    miditok's bar is put in our layout (ACs after `Bar TimeSig`, without the `Position_0` that
    miditok repeats after them); the track header with our track ACs."""
    (chunk,) = tokenize_score(score, tokenizer, vocab, preprocess_settings(**ONE_CHUNK))
    num_bars = len(chunk.bar_ticks)
    # All bars: miditok's `compute` mis-slices notes when given a subset of bars (see below).
    indexes = {
        0: {i: list(range(num_bars)) if i in vocab.bar_acs else True for i in range(len(tokenizer.attribute_controls))}
    }
    (seq,) = tokenizer.encode(
        score, encode_ids=False, attribute_controls_indexes=indexes, concatenate_track_sequences=False
    )
    header, bars = split_bars(seq.ids, vocab)
    assert header == [vocab.program_id[chunk.programs[0]], *(i for f in chunk.track_acs[0] for i in f)]
    assert len(bars) == num_bars
    stats = Counter()
    for b in range(num_bars):
        ours = insert_bar_acs(chunk.bars[0][b], [i for f in chunk.bar_acs[0][b] for i in f], vocab)
        if n_notes(chunk.bars[0][b], vocab) >= 2:
            theirs = in_our_layout(bars[b], vocab)
            assert ours == theirs, (
                f"bar {b}: miditok {[vocab.token_of[i] for i in theirs[:12]]}\n"
                f"       ours    {[vocab.token_of[i] for i in ours[:12]]}"
            )
            stats["compared"] += 1
            bar = chunk.bars[0][b]
            if len(bar) > 3 and bar[2] == vocab.position_zero and vocab.is_tempo[bar[3]]:
                stats["tempo_at_bar_start"] += 1
    return stats


def in_our_layout(bar: list[int], vocab) -> list[int]:
    """miditok's `Bar TimeSig [Position_0 Tempo] ACs [Position_0] ...` as `Bar TimeSig ACs [Position_0 Tempo] ...`."""
    acs = [i for i in bar if vocab.is_ac[i]]
    if not acs:
        return list(bar)
    first = bar.index(acs[0])
    head, rest = bar[2:first], bar[first + len(acs) :]
    if head and rest and rest[0] == vocab.position_zero:  # miditok re-opens position 0 after its ACs
        rest = rest[1:]
    return [*bar[:2], *acs, *head, *rest]


def test_bar_acs_where_and_as_miditok_puts_them_synthetic(tokenizer, vocab):
    stats = Counter()
    for seed in (0, 1):
        for score in single_track_scores(synthetic_score(seed, 12)):
            stats += compare_with_miditok_encode(score, tokenizer, vocab)
    assert stats["compared"] >= 50 and stats["tempo_at_bar_start"] >= 2, stats


@pytest.mark.slow
def test_bar_acs_where_and_as_miditok_puts_them_real(real_files, tokenizer, vocab):
    picked = [p for p in real_files if p.parent.name == "single_track"][::4]
    stats = Counter()
    for path in picked:
        stats += compare_with_miditok_encode(single_track_scores(Score(path))[0], tokenizer, vocab)
    assert stats["compared"] >= 200, stats


def test_insert_bar_acs_layout(vocab):
    t = vocab.tokenizer.vocab
    ts, p0, tempo, pitch, vel, dur = (
        t["TimeSig_4/4"],
        t["Position_0"],
        t["Tempo_120.21"],
        t["Pitch_60"],
        t["Velocity_63"],
        t["Duration_1.0.4"],
    )
    p12 = t["Position_12"]
    acs = [t["ACBarNoteDensity_3"], t["ACBarPitchClass_0"]]
    bar = [vocab.bar, ts, p0, tempo, pitch, vel, dur]
    assert insert_bar_acs(bar, acs, vocab) == [vocab.bar, ts, *acs, p0, tempo, pitch, vel, dur]
    bar = [vocab.bar, ts, p0, tempo, p12, pitch, vel, dur]
    assert insert_bar_acs(bar, acs, vocab) == [vocab.bar, ts, *acs, p0, tempo, p12, pitch, vel, dur]
    bar = [vocab.bar, ts, p0, pitch, vel, dur]
    assert insert_bar_acs(bar, acs, vocab) == [vocab.bar, ts, *acs, p0, pitch, vel, dur]
    assert insert_bar_acs(bar, [], vocab) == bar
    assert insert_bar_acs([vocab.bar, ts], acs, vocab) == [vocab.bar, ts, *acs]


def test_miditok_skips_single_note_bars_ours_does_not(tokenizer, vocab):
    """miditok's `BarAttributeControl.compute` gives no AC for a bar holding one note (its
    test is `note_end_idx > note_start_idx + 1`; only the track's last bar escapes it), so
    `encode` with ACs leaves those bars without ACs. `bar_controls` computes them."""
    score = synthetic_score(0, 12)
    flute = next(s for s in single_track_scores(score) if s.tracks[0].program == 73)
    pre = tokenizer.preprocess_score(flute)
    track = pre.tracks[0]
    bar_ticks = list(get_bars_ticks(pre, only_notes_onsets=True))
    onsets = np.array([n.time for n in track.notes])
    per_bar = np.histogram(onsets, bins=[*bar_ticks, np.iinfo(np.int64).max])[0]
    single = [b for b, n in enumerate(per_bar) if n == 1 and b < len(bar_ticks) - 1]
    assert len(single) >= 4
    ours = bar_controls(tokenizer, vocab, track, pre.tpq, bar_ticks)
    for i in vocab.bar_acs:
        ac = tokenizer.attribute_controls[i]
        theirs = {int(e.time) for e in ac.compute(track, pre.tpq, np.array(bar_ticks), [], list(range(len(bar_ticks))))}
        for b in single:
            assert bar_ticks[b] not in theirs, f"miditok now computes {type(ac).__name__} on single-note bars"
    for b in single:
        assert all(ours[b]), f"bar {b}: every bar family has a value"
        assert vocab.token_of[ours[b][vocab.bar_acs.index(4)][0]] == "ACBarNoteDensity_1"
    # and through `encode`: no AC token in those bars
    (chunk,) = tokenize_score(flute, tokenizer, vocab, preprocess_settings(**ONE_CHUNK))
    indexes = {0: {i: list(range(len(bar_ticks))) for i in vocab.bar_acs}}
    (seq,) = tokenizer.encode(
        flute, encode_ids=False, attribute_controls_indexes=indexes, concatenate_track_sequences=False
    )
    _, bars = split_bars(seq.ids, vocab)
    for b in single:
        assert not any(vocab.is_ac[i] for i in bars[b])
        assert chunk.bar_acs[0][b] == ours[b]


def test_miditok_compute_on_a_subset_of_bars_miscounts(tokenizer, vocab):
    """Why we call `_compute_on_bar` per bar: miditok's `compute` given a subset of bars
    counts the notes of every skipped bar into the next selected one."""
    score = single_track_scores(synthetic_score(0, 12))[1]  # the bass: 4 notes in every bar
    pre = tokenizer.preprocess_score(score)
    bar_ticks = np.array(get_bars_ticks(pre, only_notes_onsets=True))
    density = tokenizer.attribute_controls[4]
    assert type(density).__name__ == "BarNoteDensity"
    all_bars = {
        int(e.time): e.value
        for e in density.compute(pre.tracks[0], pre.tpq, bar_ticks, [], list(range(len(bar_ticks))))
    }
    subset = {int(e.time): e.value for e in density.compute(pre.tracks[0], pre.tpq, bar_ticks, [], [3, 6])}
    assert all_bars[int(bar_ticks[3])] == 4
    assert subset[int(bar_ticks[3])] == 16, "bars 0-3 counted as bar 3"
    ours = bar_controls(tokenizer, vocab, pre.tracks[0], pre.tpq, list(bar_ticks))
    assert vocab.token_of[ours[3][vocab.bar_acs.index(4)][0]] == "ACBarNoteDensity_4"


# -- 5. well-formed samples ------------------------------------------------------------------
def _augmented(bar, spec, drums, vocab) -> list[str]:
    """A chunk bar after augmentation, written with token strings (independent of ids)."""
    vels = list(vocab.velocity_values)
    out = []
    for i in bar:
        kind, _, value = vocab.token_of[i].partition("_")
        if kind == "Pitch" and not drums:
            value = str(int(value) + spec.pitch_shift)
        elif kind == "Velocity":
            value = str(vels[int(np.clip(vels.index(int(value)) + spec.velocity_shift, 0, len(vels) - 1))])
        out.append(f"{kind}_{value}")
    return out


def _strip_acs(bar, vocab) -> list[int]:
    out = [i for i in bar if not vocab.is_ac[i]]
    # insert_bar_acs repeats `Position_0` after `Position_0 Tempo ACs` when a note follows
    if len(out) > 4 and out[2] == out[4] == vocab.position_zero and vocab.is_tempo[out[3]]:
        del out[4]
    return out


def _split_units(body, vocab) -> list[list[int]]:
    """Bars (from each Bar_None) and single Infill_Bar tokens."""
    units = []
    for i in body:
        if i in (vocab.bar, vocab.infill_bar):
            units.append([i])
        else:
            assert units, f"{vocab.token_of[i]} before the first bar"
            assert units[-1][0] == vocab.bar, "nothing may follow Infill_Bar in the same unit"
            units[-1].append(i)
    return units


def _expected_bar_acs(chunk, spec, t, b, vocab) -> list[int]:
    drums = chunk["programs"][t] < 0
    out = []
    for f in spec.bar_acs:
        ids = chunk["bar_acs"][t][b][f]
        if ids and vocab.token_of[ids[0]].startswith("ACBarPitchClass_") and not drums:
            classes = sorted((int(vocab.token_of[i].split("_")[1]) + spec.pitch_shift) % 12 for i in ids)
            ids = [vocab.tokenizer.vocab[f"ACBarPitchClass_{c}"] for c in classes]
        out.extend(ids)
    empty = not any(vocab.is_note_start[i] for i in chunk["bars"][t][b])
    if spec.bar_acs and not out and empty:  # an empty bar given ACs: the explicit "no note" marker
        out = [vocab.tokenizer.vocab["ACBarNoteDensity_0"]]
    return out


def check_sample(ids, labels, spec: SampleSpec, chunk, vocab, max_seq_len: int) -> Counter:
    """Assert everything a training sample must be; `spec` is the one `fit` used (after its
    track/AC dropping). Returns what it saw."""
    seen = Counter()
    assert ids.dtype == np.int64 and ids.shape == labels.shape and len(ids) <= max_seq_len
    assert ids.min() >= 0 and ids.max() < vocab.size
    # loss mask: exactly on AC, Infill_Bar and FillBar_Start (in model-id space)
    masked = labels == IGNORE_INDEX
    parts = [vocab.model_to_base[m] for m in ids]
    prompt_only = np.array(
        [len(p) == 1 and (vocab.is_ac[p[0]] or p[0] in (vocab.infill_bar, vocab.fill_start)) for p in parts]
    )
    assert np.array_equal(masked, prompt_only)
    assert np.array_equal(labels[~masked], ids[~masked])
    base = vocab.to_base(ids.tolist())
    assert base[0] == vocab.bos and vocab.bos not in base[1:] and vocab.pad not in base and vocab.eos not in base
    assert base.count(vocab.track_start) == base.count(vocab.track_end) == len(spec.tracks)
    # track blocks
    blocks, pos = [], 1
    while pos < len(base) and base[pos] == vocab.track_start:
        end = base.index(vocab.track_end, pos)
        assert vocab.track_start not in base[pos + 1 : end], "unbalanced Track_Start"
        blocks.append(base[pos : end + 1])
        pos = end + 1
    rest = base[pos:]
    assert len(blocks) == len(spec.tracks)
    # the sample's bars are chunk bars offset..offset+num_bars (`fit` may crop outer bars)
    parsed = []
    for block, t in zip(blocks, spec.tracks):
        assert block[1] == vocab.program_id[chunk["programs"][t]]
        body = block[2:-1]
        k = 0
        while k < len(body) and vocab.is_ac[body[k]]:
            k += 1
        units = _split_units(body[k:], vocab)
        assert units and units[0][0] in (vocab.bar, vocab.infill_bar), "Track_Start Program [ACs] Bar..."
        parsed.append((t, body, body[:k], units))
    num_bars = len(parsed[0][3])
    assert all(len(units) == num_bars for *_, units in parsed), "every track has the same bars"
    fill = []
    if spec.task == "infill":
        assert rest and rest[0] == vocab.fill_start and rest[-1] == vocab.fill_end, "FillBar_Start ... FillBar_End last"
        fill = _split_units(rest[1:-1], vocab)
        assert all(u[0] == vocab.bar for u in fill)
        assert len(fill) == spec.span[1] - spec.span[0] >= 1
        assert base.count(vocab.fill_start) == base.count(vocab.fill_end) == 1
        assert base.count(vocab.infill_bar) == len(fill)
    else:
        assert rest == [] and base[-1] == vocab.track_end, "a new-track sample ends with Track_End"
        assert spec.tracks[-1] == spec.target
        assert vocab.fill_start not in base and vocab.fill_end not in base and vocab.infill_bar not in base

    def text(unit):
        return [vocab.token_of[i] for i in _strip_acs(unit, vocab)]

    def matches(o):
        for t, _, _, units in parsed:
            drums = chunk["programs"][t] < 0
            for j, unit in enumerate(units):
                if unit[0] == vocab.bar and text(unit) != _augmented(chunk["bars"][t][o + j], spec, drums, vocab):
                    return False
        drums = chunk["programs"][spec.target] < 0
        return all(
            text(u) == _augmented(chunk["bars"][spec.target][o + spec.span[0] + j], spec, drums, vocab)
            for j, u in enumerate(fill)
        )

    chunk_bars = len(chunk["bars"][0])
    offsets = [o for o in range(chunk_bars - num_bars + 1) if matches(o)]
    assert offsets, "the bars are not the (augmented) chunk bars"
    seen["cropped"] += num_bars < chunk_bars
    for t, body, track_acs, units in parsed:
        drums = chunk["programs"][t] < 0
        pitches = [
            int(vocab.token_of[i].split("_")[1]) for u in units for i in u if vocab.token_of[i].startswith("Pitch_")
        ]
        assert all(21 <= p <= 108 for p in pitches)
        if drums:  # drums use PitchDrum tokens and are never transposed (checked by `matches`)
            assert not pitches
        if t != spec.target:
            assert not any(vocab.is_ac[i] for i in body) and vocab.infill_bar not in body, "ACs only on the target"
            continue
        assert track_acs == [i for f in spec.track_acs for i in chunk["track_acs"][t][f]]
        seen["track_acs"] += len(track_acs)
        infill = [j for j, u in enumerate(units) if u[0] == vocab.infill_bar]
        # bar ACs: on the span's bars in the FillBar section, or inline for a new track
        with_acs = fill if spec.task == "infill" else units
        first = spec.span[0] if spec.task == "infill" else 0
        if spec.task == "infill":
            assert infill == list(range(*spec.span)), "exactly N contiguous Infill_Bar at the span"
            assert not any(vocab.is_ac[i] for u in units for i in u), "bar ACs of an infill go in the FillBar section"
        else:
            assert not infill
        for j, unit in enumerate(with_acs):
            acs = [i for i in unit if vocab.is_ac[i]]
            # ACs of a bar whichever offset matched (they are the same bar's)
            candidates = [
                _expected_bar_acs(chunk, spec, t, o + first + j, vocab) if first + j in spec.ac_bars else []
                for o in offsets
            ]
            assert acs in candidates, f"bar {first + j}: {[vocab.token_of[i] for i in acs]}"
            seen["bar_acs"] += len(acs)
    assert abs(spec.pitch_shift) <= 6 and abs(spec.velocity_shift) <= 2
    seen[spec.task] += 1
    return seen


def _chunks(synthetic_chunks, small: bool, tokenizer, vocab):
    if not small:
        return [chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs]
    out = []
    for seed in range(4):
        out += [
            chunk_dict(c)
            for c in tokenize_score(synthetic_score(seed, 16), tokenizer, vocab, preprocess_settings(**SMALL_CHUNKS))
        ]
    return out


def run_samples(builder, chunks, n, seed, vocab, max_seq_len):
    rng = random.Random(seed)
    seen = Counter()
    for k in range(n):
        chunk = chunks[(k * 7 + seed) % len(chunks)]
        spec = builder.draw_spec(chunk, rng)
        drawn = copy.deepcopy(spec)
        ids, labels = builder.build(chunk, spec, rng)
        seen += check_sample(ids, labels, spec, chunk, vocab, max_seq_len)
        seen["tracks_dropped"] += len(spec.tracks) < len(drawn.tracks)
        seen["acs_dropped"] += bool(drawn.track_acs or drawn.bar_acs) and not (spec.track_acs or spec.bar_acs)
        seen["pitch_shifted"] += spec.pitch_shift != 0
        seen["drums"] += any(chunk["programs"][t] < 0 for t in spec.tracks)
    return seen


@pytest.mark.parametrize("max_seq_len", [1024, 256])
def test_samples_are_well_formed(bpe_vocab, bpe_tokenizer, synthetic_chunks, max_seq_len):
    small = max_seq_len < 512
    chunks = _chunks(synthetic_chunks, small, bpe_tokenizer, bpe_vocab)
    assert len(chunks) >= 4
    builder = SequenceBuilder(bpe_vocab, sequences_config(), max_seq_len)
    seen = Counter()
    for seed in range(3):
        seen += run_samples(builder, chunks, 100, seed, bpe_vocab, max_seq_len)
    assert seen["infill"] + seen["track"] == 300
    assert seen["infill"] > 150 and seen["track"] > 30
    assert seen["bar_acs"] > 200 and seen["track_acs"] > 100 and seen["pitch_shifted"] > 100 and seen["drums"] > 50
    if small:  # the length budget had to act in every way
        assert seen["tracks_dropped"] > 50 and seen["acs_dropped"] > 0 and seen["cropped"] > 0, seen


@pytest.mark.slow
def test_samples_are_well_formed_real(real_pieces, tokenizer, vocab):
    """Base-id samples (untrained tokenizer) on real multitrack and single-track chunks."""
    chunks = [chunk_dict(c) for path, (_, cs) in real_pieces.items() if path.name[0] in "AFMSP" for c in cs]
    for max_seq_len in (2048, 512):
        builder = SequenceBuilder(vocab, sequences_config(), max_seq_len)
        rng = random.Random(max_seq_len)
        n = 0
        for _k in range(120):
            chunk = chunks[rng.randrange(len(chunks))]
            spec = builder.draw_spec(chunk, rng)
            try:
                ids, labels = builder.build(chunk, spec, rng)
            except ValueError as err:  # one track's infill span alone is over the budget
                assert "max_seq_len" in str(err) and max_seq_len == 512
                continue
            check_sample(ids, labels, spec, chunk, vocab, max_seq_len)
            n += 1
        assert n >= 100


def test_too_long_span_is_a_clear_error(vocab, synthetic_chunks):
    chunk = chunk_dict(synthetic_chunks[0][2][0])
    builder = SequenceBuilder(vocab, sequences_config(), 24)
    t = chunk["programs"].index(0)
    spec = SampleSpec(task="infill", tracks=[t], target=t, span=(0, len(chunk["bars"][t])))
    with pytest.raises(ValueError, match="max_seq_len=24"):
        builder.build(chunk, spec, random.Random(0))


def test_deterministic_given_the_seed(bpe_vocab, synthetic_chunks):
    chunks = [chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs]
    builder = SequenceBuilder(bpe_vocab, sequences_config(), 512)

    def draw(seed):
        rng = random.Random(seed)
        return [builder(chunks[k % len(chunks)], rng) for k in range(40)]

    a, b, c = draw(5), draw(5), draw(6)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert any(len(x[0]) != len(y[0]) or not np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    # the builder never mutates the chunk it is given
    before = copy.deepcopy(chunks)
    draw(7)
    assert chunks == before


def test_unknown_sequences_key(vocab):
    with pytest.raises(ValueError, match="infill_ratios"):
        SequenceBuilder(vocab, {**sequences_config(), "infill_ratios": 0.5}, 1024)


def test_labels_in_bpe_space(bpe_vocab):
    """The mask is computed on model ids: a merged BPE token is a target even when one of its
    base tokens would be masked as a base id (the published MMM's 20% label bug)."""
    words = [
        [bpe_vocab.bos],
        [bpe_vocab.track_start],
        [bpe_vocab.program_id[0]],
        [bpe_vocab.ac_id("ACTrackRepetition_0.00")],
        [bpe_vocab.infill_bar],
        [bpe_vocab.track_end],
        [bpe_vocab.fill_start],
    ]
    merged = next(m for m in range(bpe_vocab.base_size, bpe_vocab.size) if len(bpe_vocab.model_to_base[m]) >= 3)
    words.append(list(bpe_vocab.model_to_base[merged]))
    words.append([bpe_vocab.fill_end])
    ids, labels = encode_sample(words, bpe_vocab)
    assert ids.tolist()[-2] == merged and labels[-2] == merged
    assert (labels == IGNORE_INDEX).tolist() == [False, False, False, True, True, False, True, False, False]


# -- 6. fast path == slow reference -------------------------------------------------------------
def compare_with_reference(chunks, tokenizer, vocab, n, seed, capsys, label):
    builder = SequenceBuilder(vocab, sequences_config(), 10**6)
    rng = random.Random(seed)
    specs = []
    for k in range(n):
        chunk = chunks[k % len(chunks)]
        specs.append((chunk, builder.draw_spec(chunk, rng)))
    t0 = time.perf_counter()
    fast = [builder.build(chunk, copy.deepcopy(spec), random.Random(0)) for chunk, spec in specs]
    t1 = time.perf_counter()
    slow = [reference_sample(chunk, spec, tokenizer, vocab) for chunk, spec in specs]
    t2 = time.perf_counter()
    for k, ((_, spec), (ids, labels), (rids, rlabels)) in enumerate(zip(specs, fast, slow)):
        if not (np.array_equal(ids, rids) and np.array_equal(labels, rlabels)):
            a, r = vocab.to_base(ids.tolist()), vocab.to_base(rids.tolist())
            i = next((j for j in range(min(len(a), len(r))) if a[j] != r[j]), min(len(a), len(r)))
            pytest.fail(
                f"sample {k} ({spec}): fast and reference differ at base token {i}:\n"
                f"fast {[vocab.token_of[x] for x in a[max(0, i - 5) : i + 5]]}\n"
                f"ref  {[vocab.token_of[x] for x in r[max(0, i - 5) : i + 5]]}"
            )
    cover = Counter()
    for chunk, spec in specs:
        cover[spec.task] += 1
        cover["pitch_shift"] += spec.pitch_shift != 0
        cover["velocity_shift"] += spec.velocity_shift != 0
        cover["drum_target"] += chunk["programs"][spec.target] < 0
        cover["tempo_change"] += any(vocab.is_tempo[i] for bars in chunk["bars"] for bar in bars[1:] for i in bar)
        cover["bar_acs"] += bool(spec.bar_acs and spec.ac_bars)
    assert cover["infill"] >= 10 and cover["track"] >= 5, cover
    assert (
        min(
            cover["pitch_shift"], cover["velocity_shift"], cover["drum_target"], cover["tempo_change"], cover["bar_acs"]
        )
        >= 3
    ), cover
    with capsys.disabled():
        print(
            f"\n[{label}] {n} samples identical; fast path {n / (t1 - t0):.0f} samples/s, "
            f"reference {n / (t2 - t1):.1f} samples/s ({(t2 - t1) / (t1 - t0):.0f}x slower)"
        )


def test_fast_path_equals_reference(bpe_tokenizer, bpe_vocab, capsys):
    """Synthetic chunks (small: several per file, carried tempos, drums, CCs), BPE ids."""
    chunks = []
    for seed in range(4):
        chunks += [
            chunk_dict(c)
            for c in tokenize_score(
                synthetic_score(seed, 16), bpe_tokenizer, bpe_vocab, preprocess_settings(**SMALL_CHUNKS)
            )
        ]
    assert len(chunks) >= 8
    compare_with_reference(chunks, bpe_tokenizer, bpe_vocab, 80, 0, capsys, "synthetic, BPE")


def test_fast_path_equals_reference_real(real_pieces, capsys):
    """Real multitrack (drums, tempo changes, CCs) and single-track chunks, BPE ids."""
    from conftest import tokenizer_params

    from mmm.tokenizer import Vocab, build_tokenizer, train_bpe

    tok = build_tokenizer(tokenizer_params())
    chunks = [
        chunk_dict(c)
        for path, (_, cs) in real_pieces.items()
        for c in cs
        if path.parent.name == "multitrack" or path.name in ("Maestro_3.mid", "POP909_008.mid", "rising_sun.abc")
    ]
    train_bpe(tok, [bar for c in chunks for bars in c["bars"] for bar in bars], 2000)
    vocab = Vocab(tok)
    rng = random.Random(1)
    rng.shuffle(chunks)
    compare_with_reference(chunks[:40], tok, vocab, 60, 1, capsys, "real, BPE")


def test_reference_catches_a_wrong_fast_path(bpe_tokenizer, bpe_vocab, synthetic_chunks, monkeypatch):
    """The comparison can fail: a fast path that forgets to rotate pitch-class ACs differs."""
    chunk = chunk_dict(synthetic_chunks[0][2][0])
    t = chunk["programs"].index(0)
    spec = SampleSpec(
        task="infill", tracks=[t], target=t, span=(1, 3), bar_acs=list(range(4)), ac_bars=[1, 2], pitch_shift=3
    )
    builder = SequenceBuilder(bpe_vocab, sequences_config(), 10**6)
    ref = reference_sample(chunk, spec, bpe_tokenizer, bpe_vocab)
    assert np.array_equal(builder.build(chunk, copy.deepcopy(spec), random.Random(0))[0], ref[0])
    monkeypatch.setattr(builder, "rotation", {})
    assert not np.array_equal(builder.build(chunk, copy.deepcopy(spec), random.Random(0))[0], ref[0])


def test_track_part_defaults():
    part = TrackPart(program=0, bars=[[1]])
    assert part.track_acs == [] and part.bar_acs == {}
    spec = SampleSpec(task="track", tracks=[0], target=0)
    assert spec.span == (0, 0) and spec.pitch_shift == 0


def test_assemble_order(vocab):
    """Track blocks follow `spec.tracks`; the FillBar section follows the last track."""
    bars = [[vocab.bar, 10 + k] for k in range(4)]
    parts = {0: TrackPart(0, bars), 1: TrackPart(-1, bars, track_acs=[vocab.ac_id("ACTrackRepetition_1.00")])}
    spec = SampleSpec(task="infill", tracks=[1, 0], target=1, span=(1, 3))
    words = assemble(spec, parts, vocab)
    flat = [i for w in words for i in w]
    assert flat == [
        vocab.bos,
        vocab.track_start,
        vocab.program_id[-1],
        vocab.ac_id("ACTrackRepetition_1.00"),
        *bars[0],
        vocab.infill_bar,
        vocab.infill_bar,
        *bars[3],
        vocab.track_end,
        vocab.track_start,
        vocab.program_id[0],
        *(i for b in bars for i in b),
        vocab.track_end,
        vocab.fill_start,
        *bars[1],
        *bars[2],
        vocab.fill_end,
    ]


def test_an_infill_span_longer_than_the_context_is_shortened(tokenizer, vocab):
    """A store chunked for a long context still gives samples to a short-context model: when
    the infill span alone does not fit, it loses bars at its end instead of failing."""
    (chunk,) = tokenize_score(synthetic_score(0, 16), tokenizer, vocab, preprocess_settings(**ONE_CHUNK))
    chunk = chunk_dict(chunk)
    num_bars = len(chunk["bars"][0])
    t = max(range(len(chunk["bars"])), key=lambda k: sum(map(len, chunk["bars"][k])))
    full = SequenceBuilder(vocab, sequences_config(), max_seq_len=10**6)
    whole = SampleSpec(task="infill", tracks=[t], target=t, span=(0, num_bars))
    length = len(full.build(chunk, copy.deepcopy(whole), random.Random(0))[0])
    short = SequenceBuilder(vocab, sequences_config(), max_seq_len=length // 2)
    spec = copy.deepcopy(whole)
    ids, labels = short.build(chunk, spec, random.Random(0))
    assert len(ids) <= length // 2 and spec.span[0] == 0 and 0 < spec.span[1] < num_bars
    assert list(ids).count(vocab.infill_bar) == spec.span[1] and ids[-1] == vocab.fill_end
