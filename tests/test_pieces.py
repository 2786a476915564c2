"""One file -> chunks of base ids (`mmm.data.chunks.tokenize_score`), what the store keeps.

Proves: the chunks of a file hold exactly its notes (time, duration, pitch, velocity, per
program / drums), tempos and time signatures, as miditok's own preprocessing gives them,
for every shared test file and for synthetic files; chunks are bar-aligned, consecutive and
within the size limits; bad files are rejected with a reason; attribute controls describe
the tokenized notes only.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from conftest import notes_of, preprocess_settings, synthetic_score
from miditok.utils import get_bars_ticks
from symusic import Note, Score, Tempo, TimeSignature, Track

from mmm.data.checks import Rejected
from mmm.data.chunks import tokenize_score
from mmm.data.layout import split_bars

SMALL_CHUNKS = dict(chunk_max_tokens=900, chunk_max_track_tokens=400)


# -- helpers -------------------------------------------------------------------------------
def chunk_ids(chunk, vocab) -> list[int]:
    """The chunk as one MMM sequence: `Track_Start Program bars... Track_End` per track."""
    ids = []
    for program, bars in zip(chunk.programs, chunk.bars):
        ids += [vocab.track_start, vocab.program_id[program], *(i for bar in bars for i in bar), vocab.track_end]
    return ids


def _dedup(events):
    out = []
    for e in events:
        if not out or out[-1][1:] != e[1:]:
            out.append(e)
    return out


def _in_chunk(events, start: Fraction, end: Fraction):
    """Events (time first) in force at `start` (moved to `start`) then those in (start, end)."""
    before = [e for e in events if e[0] <= start]
    head = [(start, *before[-1][1:])] if before else []
    return _dedup(head + [e for e in events if start < e[0] < end])


def assert_round_trip(score: Score, chunks, tokenizer, vocab, name: str = "") -> None:
    """Decoding every chunk (shifted by its start) gives back exactly the preprocessed
    score's notes; each chunk decodes the tempo and time signature in force at its start
    and every change inside it."""
    pre = tokenizer.preprocess_score(score)
    tempos = [(Fraction(t.time, pre.tpq), round(t.qpm, 2)) for t in pre.tempos]
    sigs = [(Fraction(t.time, pre.tpq), t.numerator, t.denominator) for t in pre.time_signatures]
    got = Counter()
    for k, chunk in enumerate(chunks):
        decoded = tokenizer.decode(chunk_ids(chunk, vocab))
        got += notes_of(decoded, chunk.start_tick, chunk.tpq)
        start = Fraction(chunk.start_tick, chunk.tpq)
        end = Fraction(chunks[k + 1].start_tick, chunk.tpq) if k + 1 < len(chunks) else Fraction(10**9)
        dec_tempos = _dedup([(Fraction(t.time, decoded.tpq) + start, round(t.qpm, 2)) for t in decoded.tempos])
        assert dec_tempos == _in_chunk(tempos, start, end), f"{name} chunk {k}: tempos"
        dec_sigs = _dedup(
            [(Fraction(t.time, decoded.tpq) + start, t.numerator, t.denominator) for t in decoded.time_signatures]
        )
        assert dec_sigs == _in_chunk(sigs, start, end), f"{name} chunk {k}: time signatures"
    expected = notes_of(pre)
    missing, extra = expected - got, got - expected
    assert not missing and not extra, (
        f"{name}: {sum(missing.values())} notes missing, {sum(extra.values())} extra "
        f"(of {sum(expected.values())}), e.g. {list(missing)[:3]} / {list(extra)[:3]}"
    )


def assert_chunk_invariants(score: Score, chunks, tokenizer, vocab, settings, name: str = "") -> None:
    pre = tokenizer.preprocess_score(score)
    assert chunks, name
    n_bar_acs, n_track_acs = len(vocab.bar_acs), len(vocab.track_acs)
    abs_ticks = []
    for k, c in enumerate(chunks):
        num_tracks, num_bars = len(c.programs), len(c.bar_ticks)
        assert num_tracks == len(pre.tracks) == len(c.bars) == len(c.track_acs) == len(c.bar_acs)
        assert c.programs == [-1 if t.is_drum else t.program for t in pre.tracks]
        assert c.tpq == pre.tpq
        assert c.bar_ticks[0] == 0 and all(a < b for a, b in zip(c.bar_ticks, c.bar_ticks[1:]))
        abs_ticks += [c.start_tick + t for t in c.bar_ticks]
        for t in range(num_tracks):
            assert len(c.bars[t]) == num_bars, f"{name}: every track has every bar"
            assert len(c.bar_acs[t]) == num_bars and len(c.track_acs[t]) == n_track_acs
            for b, bar in enumerate(c.bars[t]):
                assert bar[0] == vocab.bar and vocab.bar not in bar[1:]
                assert vocab.is_time_sig[bar[1]], "REMI (MMM) writes the time signature in every bar"
                assert not any(vocab.is_ac[i] for i in bar), "the store keeps bars without ACs"
                assert not {vocab.track_start, vocab.track_end, vocab.bos, vocab.pad} & set(bar)
                has_notes = any(vocab.is_note_start[i] for i in bar)
                families = c.bar_acs[t][b]
                assert len(families) == n_bar_acs
                assert all(bool(f) == has_notes for f in families), f"{name}: bar ACs exactly on non-empty bars"
                for f, ids in zip(vocab.bar_acs, families):
                    prefix = type(tokenizer.attribute_controls[f]).__name__
                    assert all(vocab.token_of[i].startswith("AC" + prefix[:7]) for i in ids)
        # size limits (a chunk may only exceed them when it has the minimum number of bars,
        # or when it is the last one and absorbed a short tail). The limits apply before a
        # later chunk's first bar gets the tempo in force (`Position_0 Tempo`, 2 tokens).
        lengths = np.array([[len(bar) for bar in bars] for bars in c.bars])
        carry = 2 if k > 0 else 0
        within = (
            lengths.sum() <= settings.chunk_max_tokens + carry * num_tracks
            and lengths.sum(axis=1).max() <= settings.chunk_max_track_tokens + carry
        )
        if len(chunks) > 1:
            assert num_bars >= settings.chunk_min_bars, f"{name}: chunk {k} has {num_bars} bars"
            if k + 1 < len(chunks):
                assert within or num_bars == settings.chunk_min_bars, f"{name}: chunk {k} over the limits"
    # chunks are consecutive, bar-aligned with miditok's bars, and hold every note once
    bar_ticks = list(get_bars_ticks(pre, only_notes_onsets=True))
    assert abs_ticks == bar_ticks[: len(abs_ticks)]
    assert sum(c.num_notes for c in chunks) == sum(len(t.notes) for t in pre.tracks)


# -- synthetic files (need nothing outside the repo) -----------------------------------------
@pytest.mark.parametrize(
    "settings",
    [preprocess_settings(min_notes=8), preprocess_settings(min_notes=8, **SMALL_CHUNKS)],
    ids=["default-chunks", "small-chunks"],
)
def test_round_trip_synthetic(synthetic_dir, tokenizer, vocab, settings):
    several = 0
    for path in sorted(synthetic_dir.glob("*.mid")):
        score = Score(path)
        chunks = tokenize_score(score, tokenizer, vocab, settings)
        several += len(chunks) > 1
        assert_chunk_invariants(score, chunks, tokenizer, vocab, settings, path.name)
        assert_round_trip(score, chunks, tokenizer, vocab, path.name)
    if settings.chunk_max_tokens < 1000:
        assert several >= 2, "small chunks must split some files"


def test_synthetic_file_is_what_the_tests_need(synthetic_chunks, tokenizer, vocab):
    """The synthetic files really exercise drums, tempo changes, notes at bar starts,
    single-note bars, tracks ending early, and non-tokenized events."""
    path, score, chunks = synthetic_chunks[0]
    assert any(t.is_drum for t in score.tracks) and len(score.tracks) >= 5
    assert len(score.tempos) >= 3 and any(len(t.controls) for t in score.tracks)
    c = chunks[0]
    assert len(c.bar_ticks) >= 8 or len(chunks) > 1
    flute = c.programs.index(73)
    single = [b for b, bar in enumerate(c.bars[flute]) if sum(vocab.is_note_start[i] for i in bar) == 1]
    assert len(single) >= 4

    def note_at_bar_start(bar):
        rest = [i for i in bar[3:] if not vocab.is_tempo[i]]  # Bar TimeSig Position_0 [Tempo] Pitch
        return len(rest) > 0 and bar[2] == vocab.position_zero and bool(vocab.is_note_start[rest[0]])

    assert sum(map(note_at_bar_start, c.bars[flute])) >= 2, "single notes at bar starts"
    assert sum(note_at_bar_start(bar) for bar in c.bars[flute] if len(bar) > 3 and vocab.is_tempo[bar[3]]) >= 1, (
        "... after a tempo"
    )
    guitar = c.programs.index(25)
    assert all(bar == c.bars[guitar][-1] and len(bar) == 2 for bar in c.bars[guitar][6:]), "empty bars after its end"
    drums = c.programs.index(-1)
    assert any(vocab.token_of[i].startswith("PitchDrum_") for i in c.bars[drums][0])
    assert any(vocab.is_tempo[i] for bars in c.bars for bar in bars[4:] for i in bar), "tempo changes inside"


def test_first_bar_of_every_chunk_states_its_tempo(tokenizer, vocab):
    """REMI writes tempos only where they change: a later chunk's first bar gets the tempo in
    force (`Bar TimeSig Position_0 Tempo`), in every track."""
    score = synthetic_score(seed=4, num_bars=24)
    chunks = tokenize_score(score, tokenizer, vocab, preprocess_settings(min_notes=8, **SMALL_CHUNKS))
    assert len(chunks) >= 3
    for c in chunks:
        for bars in c.bars:
            bar = bars[0]
            assert bar[2] == vocab.position_zero and vocab.is_tempo[bar[3]], [vocab.token_of[i] for i in bar[:5]]


def test_acs_ignore_events_that_are_not_tokenized(tokenizer, vocab):
    """ACs describe the tokenized music. symusic's pianoroll (used by TrackRepetition) runs
    up to `Track.end()`, which counts control changes and pitch bends: a CC long after a
    track's last note must not change its ACs."""
    score = synthetic_score(seed=0, num_bars=12)
    stripped = score.copy()
    for t in stripped.tracks:
        t.controls.clear()
        t.pitch_bends.clear()
        t.pedals.clear()
    settings = preprocess_settings(min_notes=8)
    with_cc = tokenize_score(score, tokenizer, vocab, settings)
    without = tokenize_score(stripped, tokenizer, vocab, settings)
    assert [c.bars for c in with_cc] == [c.bars for c in without], "CCs are not tokenized"
    assert [c.track_acs for c in with_cc] == [c.track_acs for c in without]
    assert [c.bar_acs for c in with_cc] == [c.bar_acs for c in without]


def _score(tracks, num_bars=10, tpq=480):
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 120))
    for program, is_drum, pitch in tracks:
        t = Track("", program, is_drum)
        for b in range(num_bars):
            for beat in range(4):
                t.notes.append(Note((4 * b + beat) * tpq, tpq, pitch, 90))
        score.tracks.append(t)
    return score


@pytest.mark.parametrize(
    ("score", "overrides", "reason"),
    [
        (Score(480), {}, "no_notes"),
        (_score([(0, False, 10)]), {}, "no_notes"),  # below the pitch range: nothing left
        (_score([(0, False, 60)], num_bars=5), {"min_notes": 8}, "too_few_bars"),
        (_score([(0, False, 60)], num_bars=8), {"min_notes": 33}, "too_few_notes"),
        (_score([(0, False, 60)]), {"max_notes": 39}, "too_many_notes"),
        (_score([(p, False, 60) for p in range(5)]), {"max_tracks": 4}, "too_many_tracks"),
    ],
    ids=["empty", "out-of-range", "short", "few-notes", "many-notes", "many-tracks"],
)
def test_rejections(tokenizer, vocab, score, overrides, reason):
    with pytest.raises(Rejected) as err:
        tokenize_score(score, tokenizer, vocab, preprocess_settings(**overrides))
    assert err.value.reason == reason


def test_accepts_the_limits(tokenizer, vocab):
    score = _score([(0, False, 60), (0, True, 36)], num_bars=8)  # 64 notes, 8 bars
    chunks = tokenize_score(score, tokenizer, vocab, preprocess_settings(min_notes=64, max_notes=64, max_tracks=2))
    assert len(chunks) == 1 and chunks[0].programs == [0, -1]


def test_split_bars(vocab):
    ids = [vocab.track_start, vocab.program_id[0], vocab.bar, 5, vocab.bar, 6, 7, vocab.track_end]
    assert split_bars(ids, vocab) == ([vocab.program_id[0]], [[vocab.bar, 5], [vocab.bar, 6, 7]])
    with pytest.raises(ValueError, match="Track_Start"):
        split_bars(ids[:-1], vocab)


# -- the shared test MIDI ($MMM_TEST_MIDI) ---------------------------------------------------
@pytest.mark.slow
def test_round_trip_every_shared_file(real_pieces, tokenizer, vocab):
    settings = preprocess_settings()
    for path, (score, chunks) in real_pieces.items():
        assert_chunk_invariants(score, chunks, tokenizer, vocab, settings, path.name)
        assert_round_trip(score, chunks, tokenizer, vocab, path.name)
    folders = Counter(p.parent.name for p in real_pieces)
    assert folders["multitrack"] >= 10 and folders["single_track"] >= 10 and folders["abc"] >= 3


@pytest.mark.slow
def test_round_trip_small_chunks_shared_files(real_files, tokenizer, vocab):
    settings = preprocess_settings(min_notes=8, **SMALL_CHUNKS)
    picked = [
        p
        for p in real_files
        if p.name in ("Funkytown.mid", "Shut Up.mid", "POP909_008.mid", "flowers_of_edinburgh.abc")
    ]
    assert len(picked) == 4
    for path in picked:
        score = Score(path)
        chunks = tokenize_score(score, tokenizer, vocab, settings)
        assert len(chunks) > 1
        assert_chunk_invariants(score, chunks, tokenizer, vocab, settings, path.name)
        assert_round_trip(score, chunks, tokenizer, vocab, path.name)


def test_invalid_files(midi_dir, tokenizer, vocab):
    with pytest.raises(Exception, match="control_value"):  # symusic refuses it (RuntimeError in 0.6)
        Score(midi_dir / "invalid" / "ValueError_Control168.mid")
    with pytest.raises(Rejected) as err:
        tokenize_score(Score(midi_dir / "invalid" / "empty.mid"), tokenizer, vocab, preprocess_settings())
    assert err.value.reason == "no_notes"
