"""The tokenizer of configs/tokenizer/mmm.yaml and its BPE model (DESIGN.md §3).

Proves: the YAML builds the published MMM vocabulary; misspelled keys and bad values fail
loudly (miditok itself accepts them silently); BPE keeps base ids and every AC token as its
own id; decoding through `Vocab.to_base` keeps every note where miditok's `decode` of a BPE
`TokSequence` loses some; a saved tokenizer reloads to identical encodings.
"""

from __future__ import annotations

import copy
import random

import pytest
from conftest import (
    BPE_VOCAB_SIZE,
    chunk_dict,
    notes_of,
    sequences_config,
    synthetic_score,
    tokenizer_params,
)
from miditok import MMM, TokenizerConfig
from miditok.attribute_controls import BarAttributeControl

from mmm.data.layout import insert_bar_acs
from mmm.data.sequences import SequenceBuilder, assemble, empty_bar_marker
from mmm.tokenizer import Vocab, build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_config, train_bpe

AC_FAMILIES = {
    # class name -> token prefixes it adds to the vocabulary
    "TrackOnsetPolyphony": ("ACTrackOnsetPolyphonyMin", "ACTrackOnsetPolyphonyMax"),
    "BarOnsetPolyphony": ("ACBarOnsetPolyphonyMin", "ACBarOnsetPolyphonyMax"),
    "BarPitchClass": ("ACBarPitchClass",),
    "TrackNoteDensity": ("ACTrackNoteDensityMin", "ACTrackNoteDensityMax"),
    "BarNoteDensity": ("ACBarNoteDensity",),
    "BarNoteDuration": ("ACBarNoteDurationWhole", "ACBarNoteDurationQuarter", "ACBarNoteDurationThirtySecond"),
    "TrackNoteDuration": ("ACTrackNoteDurationWhole", "ACTrackNoteDurationQuarter", "ACTrackNoteDurationThirtySecond"),
    "TrackRepetition": ("ACTrackRepetition",),
}


def _values(tokenizer, kind: str) -> list[str]:
    return [t.split("_", 1)[1] for t in tokenizer.vocab if t.split("_", 1)[0] == kind]


# -- 1. config -----------------------------------------------------------------------------
def test_yaml_builds_the_published_vocabulary(tokenizer):
    assert isinstance(tokenizer, MMM)
    assert tokenizer.config.additional_params["base_tokenizer"] == "REMI"
    pitches = sorted(int(v) for v in _values(tokenizer, "Pitch"))
    assert pitches == list(range(21, 109)), "88 keys, A0..C8"
    assert len(_values(tokenizer, "Velocity")) == 24
    assert len(_values(tokenizer, "Tempo")) == 48
    assert sorted(int(v) for v in _values(tokenizer, "Program")) == list(range(-1, 128))
    assert _values(tokenizer, "TimeSig"), "time signatures are on"
    assert not _values(tokenizer, "Chord") and not _values(tokenizer, "Rest")
    for special in (
        "PAD_None",
        "BOS_None",
        "EOS_None",
        "Infill_Bar",
        "Infill_Track",
        "FillBar_Start",
        "FillBar_End",
        "Track_Start",
        "Track_End",
    ):
        assert special in tokenizer.vocab, special
    assert tokenizer.config.encode_ids_split == "bar"
    # beat_res as in the published MMM: 12 positions per beat in the first beat
    assert tokenizer.config.beat_res == {(0, 1): 12, (1, 2): 4, (2, 4): 2, (4, 8): 1}


def test_vocab_has_all_eight_ac_families(tokenizer, vocab):
    names = [type(ac).__name__ for ac in tokenizer.attribute_controls]
    assert sorted(names) == sorted(AC_FAMILIES), names
    for _name, prefixes in AC_FAMILIES.items():
        for prefix in prefixes:
            assert any(t.startswith(prefix + "_") for t in tokenizer.vocab), prefix
    bar_names = {names[i] for i in vocab.bar_acs}
    assert bar_names == {"BarOnsetPolyphony", "BarPitchClass", "BarNoteDensity", "BarNoteDuration"}
    assert {names[i] for i in vocab.track_acs} == set(AC_FAMILIES) - bar_names
    assert all(isinstance(tokenizer.attribute_controls[i], BarAttributeControl) for i in vocab.bar_acs)
    # ranges of the published MMM
    assert sorted(int(v) for v in _values(tokenizer, "ACBarOnsetPolyphonyMax")) == list(range(1, 7))
    assert len(_values(tokenizer, "ACTrackRepetition")) == 10
    assert _values(tokenizer, "ACBarNoteDensity")[-1] == "18+"
    assert vocab.is_ac.sum() == sum(t.startswith("AC") for t in tokenizer.vocab) > 0


def test_pitch_range_upper_bound_is_inclusive(tokenizer):
    assert "Pitch_108" in tokenizer.vocab and "Pitch_21" in tokenizer.vocab
    assert "Pitch_109" not in tokenizer.vocab and "Pitch_20" not in tokenizer.vocab
    # the miditok 3.1.0 edge of DESIGN.md §3: (21, 109) adds Pitch_109 and shifts every id after it
    params = tokenizer_params()
    params["pitch_range"] = [21, 109]
    wider = build_tokenizer(params)
    assert "Pitch_109" in wider.vocab
    assert wider.vocab["Velocity_5"] == tokenizer.vocab["Velocity_5"] + 1


@pytest.mark.parametrize(
    ("wrong", "right"),
    [
        ("ac_polyphony_bars", "ac_polyphony_bar"),
        ("pitch_ranges", "pitch_range"),
        ("num_velocity", "num_velocities"),
        ("use_tempo", "use_tempos"),
    ],
)
def test_misspelled_key_is_named_with_a_suggestion(wrong, right):
    params = tokenizer_params()
    params[wrong] = params.pop(right, True)
    with pytest.raises(ValueError, match=wrong) as err:
        build_tokenizer(params)
    assert f"did you mean tokenizer.params.{right}?" in str(err.value)


def test_miditok_alone_accepts_a_misspelled_key():
    """Why we validate: miditok keeps the misspelled key in `additional_params` and the
    tokenizer silently has no bar polyphony control."""
    config = TokenizerConfig(ac_polyphony_bars=True, base_tokenizer="REMI")
    assert config.ac_polyphony_bar is False
    assert not any(t.startswith("ACBarOnsetPolyphony") for t in MMM(config).vocab)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("base_tokenizer", "MIDILike", "only 'REMI'"),
        ("use_programs", False, "use_programs"),
        ("use_time_signatures", False, "use_time_signatures"),
        ("special_tokens", ["PAD", "BOS", "EOS"], "Infill_Bar"),
        ("programs", "0-127", "programs"),
    ],
)
def test_invalid_values_are_rejected(key, value, match):
    params = tokenizer_params()
    params[key] = value
    with pytest.raises(ValueError, match=match):
        build_tokenizer(params)


def test_programs_range_string():
    params = tokenizer_params()
    params["programs"] = "0..3"
    assert sorted(tokenizer_config(params).programs) == [0, 1, 2, 3]


@pytest.mark.parametrize("key", ["0-1", "a_b", "0_1_2", "01"])
def test_beat_res_bad_key_is_clear(key):
    params = tokenizer_params()
    params["beat_res"] = {key: 4}
    with pytest.raises(ValueError, match=r"tokenizer\.beat_res") as err:
        build_tokenizer(params)
    assert repr(key) in str(err.value) and "'0_1'" in str(err.value)


@pytest.mark.parametrize(
    "beat_res",
    [
        {"0_1": "twelve"},  # not a number
        {"0_1": 12.5},  # silently truncated to 12
        {"0_1": 0},
        {"0_1": -4},
        [[0, 1, 12]],  # not a mapping
        {},  # nothing
        {"1_0": 4},  # end before start
        {"1_2": 4},  # does not start at beat 0
        {"0_1": 12, "2_4": 2},  # gap
        {"0_2": 12, "1_4": 4},  # overlap
    ],
    ids=["str-value", "float-value", "zero", "negative", "list", "empty", "reversed", "not-from-0", "gap", "overlap"],
)
def test_beat_res_bad_value_is_clear(beat_res):
    """Every malformed beat_res fails with a ValueError naming `tokenizer.beat_res` (not a
    bare int() error, an AttributeError, or a silently broken vocabulary)."""
    params = tokenizer_params()
    params["beat_res"] = beat_res
    with pytest.raises(ValueError, match=r"tokenizer\.beat_res"):
        build_tokenizer(params)


# -- 2. BPE --------------------------------------------------------------------------------
def test_bpe_keeps_every_base_id(tokenizer, bpe_tokenizer, bpe_vocab):
    assert bpe_tokenizer.is_trained
    assert bpe_tokenizer.vocab == tokenizer.vocab, "BPE must not change the base vocabulary"
    assert bpe_vocab.base_size < bpe_vocab.size <= BPE_VOCAB_SIZE
    assert bpe_vocab.size > bpe_vocab.base_size + 100, "BPE learned merges"
    for i in range(bpe_vocab.base_size):
        assert bpe_vocab.model_to_base[i] == (i,), bpe_vocab.token_of[i]
    assert all(len(bpe_vocab.model_to_base[i]) > 1 for i in range(bpe_vocab.base_size, bpe_vocab.size))


def test_train_bpe_rejects_bad_inputs(tokenizer):
    fresh = build_tokenizer(tokenizer_params())
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(fresh, [[1, 2, 3]], len(tokenizer.vocab))
    with pytest.raises(ValueError, match="no bars"):
        train_bpe(fresh, [[], []], 1000)


def test_encode_words_to_base_round_trip(bpe_vocab, synthetic_chunks):
    words = [bar for _, _, chunks in synthetic_chunks for c in chunks for track in c.bars for bar in track]
    rng = random.Random(0)
    rng.shuffle(words)
    ids = bpe_vocab.encode_words(words)
    assert bpe_vocab.to_base(ids) == [i for w in words for i in w]
    assert len(ids) < 0.6 * sum(map(len, words)), "BPE compresses"
    assert max(ids) >= bpe_vocab.base_size
    # per word too (BPE never merges across words)
    for w in words[:200]:
        assert bpe_vocab.to_base(bpe_vocab.encode_words([w])) == w
    assert bpe_vocab.encode_words([w for w in words[:50]]) == [
        i for w in words[:50] for i in bpe_vocab.encode_words([w])
    ]


def test_a_bar_opens_with_the_same_ids_with_or_without_bar_acs(bpe_vocab, synthetic_chunks):
    """A bar's header is a BPE word of its own: with bar ACs after it or not, the bar encodes to
    the same header ids and the same body ids. (Merged with its body when no AC separated them,
    a header-only id followed by no AC meant "empty bar" in training, and uncontrolled
    generation wrote empty bars.)"""
    v = bpe_vocab
    marker = empty_bar_marker(v)
    bars = [
        bar
        for _, _, chunks in synthetic_chunks
        for c in chunks
        for track in c.bars
        for bar in track
        if any(v.is_note_start[i] for i in bar)
    ]
    assert len(bars) > 100
    for bar in bars[:300]:
        plain_ids = v.encode_words([bar])
        controlled = v.encode_words([insert_bar_acs(bar, [marker], v)])
        assert (
            controlled == plain_ids[:1] + [marker] + plain_ids[1:]
            or controlled == plain_ids[:2] + [marker] + plain_ids[2:]
        ), (bar, plain_ids, controlled)
        assert v.to_base(plain_ids[:1]) == list(bar[:2]) or v.to_base(plain_ids[:2]) == list(bar[:2])


def test_bpe_learns_headers_as_words(bpe_vocab):
    """No learned id holds a bar header and more: encoding never produces one."""
    v = bpe_vocab
    assert not [bases for bases in v.model_to_base if bases[0] == v.bar and len(bases) > 2]
    assert any(bases[0] == v.bar and len(bases) == 2 for bases in v.model_to_base), "headers merge into one id"


def _check_ac_ids(vocab: Vocab, samples) -> int:
    """Every model id holding an AC base token is exactly that token (its own base id)."""
    n_acs = 0
    for ids, _ in samples:
        ids = ids.tolist()
        base = vocab.to_base(ids)
        for m in ids:
            parts = vocab.model_to_base[m]
            if any(vocab.is_ac[b] for b in parts):
                assert parts == (m,), (
                    f"model id {m} mixes an AC with other tokens: {[vocab.token_of[b] for b in parts]}"
                )
                assert vocab.is_ac_model[m]
        ac_base = sum(vocab.is_ac[b] for b in base)
        assert ac_base == sum(vocab.is_ac_model[m] for m in ids)
        n_acs += ac_base
    return n_acs


def _samples(vocab, chunks, n, seed=0, max_seq_len=2048):
    builder = SequenceBuilder(
        vocab, sequences_config(track_acs_ratio=[0.5, 1.0], bar_acs_ratio=[0.5, 1.0]), max_seq_len
    )
    rng = random.Random(seed)
    return [builder(chunks[i % len(chunks)], rng) for i in range(n)]


def test_ac_tokens_keep_their_own_id_after_bpe(bpe_vocab, synthetic_chunks):
    chunks = [chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs]
    n_acs = _check_ac_ids(bpe_vocab, _samples(bpe_vocab, chunks, 200))
    assert n_acs > 1000, "the samples must contain many ACs for this test to mean anything"


@pytest.mark.slow
def test_ac_tokens_keep_their_own_id_after_bpe_real(real_pieces):
    """DESIGN.md §3 measurement, redone: BPE (vocab 3000, per bar) trained on the multitrack
    files keeps every AC token of real samples as its own id."""
    tok = build_tokenizer(tokenizer_params())
    multitrack = [chunks for path, (_, chunks) in real_pieces.items() if path.parent.name == "multitrack"]
    train_bpe(tok, [bar for chunks in multitrack for c in chunks for track in c.bars for bar in track], 3000)
    vocab = Vocab(tok)
    chunks = [chunk_dict(c) for chunks in multitrack for c in chunks]
    assert _check_ac_ids(vocab, _samples(vocab, chunks, 150)) > 1000


def test_miditok_decode_of_bpe_tokseq_loses_notes(bpe_tokenizer, bpe_vocab):
    """The miditok 3.1.0 pitfall of DESIGN.md §3, as it behaves here.

    `encode` returns a TokSequence with `.tokens` (base tokens) filled and `.ids` BPE-encoded.
    `decode` then skips BPE decoding (`.tokens` is not empty) and MMM's
    `split_tokseq_per_track` finds the Track_Start positions in the (shorter) BPE `.ids` and
    slices `.tokens` at those positions: tracks are cut at the wrong places and notes are
    lost. Decoding base ids (`Vocab.to_base`) keeps every note.
    """
    score = synthetic_score(seed=123, num_bars=12)
    expected = notes_of(bpe_tokenizer.preprocess_score(score))
    seq = bpe_tokenizer.encode(score)
    assert seq.are_ids_encoded and len(seq.tokens) > len(seq.ids)

    pitfall = notes_of(bpe_tokenizer.decode(copy.deepcopy(seq)))
    assert pitfall != expected
    assert sum(pitfall.values()) < sum(expected.values()), "notes are lost"

    ours = notes_of(bpe_tokenizer.decode(bpe_vocab.to_base(seq.ids)))
    assert ours == expected
    # (in 3.1.0 a plain list of BPE ids is detected as encoded and decodes right too)
    assert notes_of(bpe_tokenizer.decode(list(seq.ids))) == expected


@pytest.mark.slow
def test_save_and_load_give_identical_encodings(bpe_tokenizer, bpe_vocab, synthetic_chunks, tmp_path):
    path = save_tokenizer(bpe_tokenizer, tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"], "no temporary file left behind"
    chunks = [chunk_dict(c) for _, _, cs in synthetic_chunks for c in cs]
    builder = SequenceBuilder(bpe_vocab, sequences_config(), 4096)
    rng = random.Random(3)
    sample_words = [
        assemble(spec, builder.parts(c, spec), bpe_vocab) for c in chunks for spec in [builder.draw_spec(c, rng)]
    ]
    words = [bar for c in chunks for track in c["bars"] for bar in track]
    score = synthetic_score(seed=7, num_bars=10)
    expected = bpe_tokenizer.encode(score)
    for loaded in (load_tokenizer(path.parent), load_tokenizer(path), MMM(params=path)):
        assert loaded.is_trained
        assert loaded.vocab == bpe_tokenizer.vocab
        assert [type(a).__name__ for a in loaded.attribute_controls] == [
            type(a).__name__ for a in bpe_tokenizer.attribute_controls
        ]
        vocab = Vocab(loaded)
        assert vocab.size == bpe_vocab.size and vocab.model_to_base == bpe_vocab.model_to_base
        assert vocab.encode_words(words) == bpe_vocab.encode_words(words)
        for w in sample_words:  # samples with ACs, Infill_Bar, FillBar...
            assert vocab.encode_words(w) == bpe_vocab.encode_words(w)
        got = loaded.encode(score)
        assert got.ids == expected.ids and got.tokens == expected.tokens
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_save_and_load_untrained(tokenizer, tmp_path):
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "t.json"))
    assert not loaded.is_trained and loaded.vocab == tokenizer.vocab
    score = synthetic_score(seed=5, num_bars=9)
    assert loaded.encode(score, encode_ids=False).ids == tokenizer.encode(score, encode_ids=False).ids
