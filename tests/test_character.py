"""Decoding that keeps a track's character: the grammar holds a generated track to a pitch range and
to one note per onset (a monophonic track stays monophonic), by default as the track is in the
piece, overridable per request."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import synthetic_score, tiny_model
from symusic import Note, Track

from mmm.generation.api import MMM
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import RANGE_MARGIN, Character, Request, RequestError, character


def walk(tables: GrammarTables, plan: BarPlan, seed: int) -> list[int]:
    """A random walk through the grammar (every allowed id equally likely)."""
    rng = random.Random(seed)
    grammar = BarGrammar(tables, plan, 400)
    out = []
    while not grammar.done:
        i = int(rng.choice(np.flatnonzero(grammar.allowed())))
        grammar.advance(i)
        out.append(i)
    return out


def notes_by_onset(base_ids, vocab) -> list[list[int]]:
    """The pitches written at each onset of generated base ids."""
    groups: list[list[int]] = []
    for i in base_ids:
        token = vocab.token_of[i]
        if token.startswith(("Bar_", "Position_")):
            groups.append([])
        elif token.startswith("Pitch_"):
            groups[-1].append(int(token.split("_")[1]))
    return [g for g in groups if g]


@pytest.mark.parametrize("which", ["base", "bpe"])
def test_the_grammar_keeps_a_range_and_one_note_per_onset(which, vocab, bpe_vocab):
    v = vocab if which == "base" else bpe_vocab
    tables = GrammarTables.of(v)
    four_four = v.tokenizer.vocab["TimeSig_4/4"]
    free = BarPlan([four_four] * 4, [[]] * 4, v.fill_end, False)
    kept = BarPlan([four_four] * 4, [[]] * 4, v.fill_end, False, pitch_range=(60, 67), monophonic=True)
    free_onsets = [g for s in range(20) for g in notes_by_onset(v.to_base(walk(tables, free, s)), v)]
    kept_onsets = [g for s in range(20) for g in notes_by_onset(v.to_base(walk(tables, kept, s)), v)]
    # Without the constraints random walks leave the range and stack notes (so the test can fail) ...
    assert any(p < 60 or p > 67 for g in free_onsets for p in g) and any(len(g) > 1 for g in free_onsets)
    # ... with them, never, and they still write notes.
    assert kept_onsets and all(60 <= p <= 67 for g in kept_onsets for p in g)
    assert all(len(g) == 1 for g in kept_onsets)


def track(program: int, pitches_at: list[tuple[int, int]], drum: bool = False) -> Track:
    t = Track("t", program, drum)
    for time, pitch in pitches_at:
        t.notes.append(Note(time, 240, pitch, 80))
    return t


def test_a_tracks_character_comes_from_its_notes_unless_the_request_says_otherwise():
    melody = track(40, [(0, 60), (480, 67), (960, 64)])
    chords = track(0, [(0, 60), (0, 64), (480, 55)])
    melody, chords = melody.notes.numpy(), chords.notes.numpy()
    default = Request("infill")
    assert character(default, 40, melody) == Character((60 - RANGE_MARGIN, 67 + RANGE_MARGIN), True)
    assert character(default, 0, chords) == Character((55 - RANGE_MARGIN, 64 + RANGE_MARGIN), False)
    assert character(Request("infill", pitch_range=False, monophonic=False), 40, melody) == Character()
    assert character(Request("infill", pitch_range=[30, 50]), 0, chords).pitch_range == (30, 50)
    assert character(Request("add_track"), 33).pitch_range == (28, 55)  # a new electric bass: the GM range
    assert character(default, -1, track(0, [(0, 36)], True).notes.numpy()) == Character()  # drums: nothing kept


@pytest.mark.parametrize("bad", [[60], [70, 60], [0, 128], "wide", 3])
def test_a_bad_pitch_range_is_refused_naming_the_field(bpe_tokenizer, bpe_vocab, bad):
    mmm = MMM(tiny_model(bpe_vocab.size), bpe_tokenizer, num_threads=1)
    with pytest.raises(RequestError, match="pitch_range") as err:
        mmm.run(Request("infill", track=0, bars=(1, 2), pitch_range=bad), synthetic_score(0, 6))
    assert err.value.field == "pitch_range"
    with pytest.raises(RequestError, match="monophonic"):
        mmm.run(Request("infill", track=0, bars=(1, 2), monophonic="yes"), synthetic_score(0, 6))


def test_an_infill_keeps_the_tracks_range_and_monophony_by_default(bpe_tokenizer, bpe_vocab):
    """A random model infills a monophonic melody: by default its notes stay in the melody's range
    and never sound two at a time; with both overridden, the same seeds leave it."""
    mmm = MMM(tiny_model(bpe_vocab.size, max_seq_len=1024), bpe_tokenizer, max_bar_tokens=24, num_threads=1)
    score = synthetic_score(1, 8)
    melody = track(40, [(b * 480, 62 + (b % 3)) for b in range(32)])
    score.tracks.append(melody)
    t = len(score.tracks) - 1
    lo, hi = 62 - RANGE_MARGIN, 64 + RANGE_MARGIN  # the melody's notes outside bars 2-6 span 62-64
    span = (2 * score.tpq * 4, 6 * score.tpq * 4)

    def generated(request: Request) -> np.ndarray:
        out = mmm.run(request, score).scores[0].tracks[t].notes.numpy()
        inside = (out["time"] >= span[0]) & (out["time"] < span[1])
        return np.stack([out["time"][inside], out["duration"][inside], out["pitch"][inside]], 1)

    kept = np.concatenate([generated(Request("infill", track=t, bars=(2, 6), seed=s)) for s in range(4)])
    free = np.concatenate(
        [
            generated(Request("infill", track=t, bars=(2, 6), seed=s, pitch_range=False, monophonic=False))
            for s in range(4)
        ]
    )
    assert len(kept) and ((kept[:, 2] >= lo) & (kept[:, 2] <= hi)).all()
    for s in range(4):
        one = generated(Request("infill", track=t, bars=(2, 6), seed=s))
        order = one[np.argsort(one[:, 0])]
        assert len(np.unique(order[:, 0])) == len(order)  # one note per onset
        assert (order[:-1, 0] + order[:-1, 1] <= order[1:, 0]).all()  # each ends before the next starts
    assert ((free[:, 2] < lo) | (free[:, 2] > hi)).any()
