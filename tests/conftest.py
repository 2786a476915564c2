"""Shared fixtures of the data-pipeline tests: the tokenizer of `configs/tokenizer/mmm.yaml`,
a small BPE-trained copy of it, synthetic multi-track MIDI written into tmp folders (so the
tests need nothing outside the repository), and the real test MIDI of `$MMM_TEST_MIDI`."""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from symusic import ControlChange, Note, PitchBend, Score, Tempo, TimeSignature, Track

from mmm.data.pieces import tokenize_score
from mmm.tokenizer import Vocab, build_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_YAML = REPO / "configs" / "tokenizer" / "mmm.yaml"
DATA_YAML = REPO / "configs" / "data" / "common.yaml"
BPE_VOCAB_SIZE = 1000


# -- configs -------------------------------------------------------------------------------
def tokenizer_params() -> dict:
    """The `params:` mapping of configs/tokenizer/mmm.yaml (a fresh copy each call)."""
    return yaml.safe_load(TOKENIZER_YAML.read_text())["params"]


def data_config() -> dict:
    return yaml.safe_load(DATA_YAML.read_text())


def preprocess_settings(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{**data_config()["preprocess"], **overrides})


def sequences_config(**overrides) -> dict:
    return {**data_config()["sequences"], **overrides}


# -- synthetic music -----------------------------------------------------------------------
TPQ = 480
BAR = 4 * TPQ


def synthetic_score(seed: int = 0, num_bars: int = 12, tpq: int = TPQ) -> Score:
    """A small multi-track piece exercising what the pipeline must handle.

    Tracks: piano chords + melody (polyphony), bass, a drum kit (kick on every bar start),
    a flute holding exactly one note per bar (single-note bars), a guitar that stops after
    bar 4 (tracks ending early get empty bars) and strings entering at bar 3 (leading empty
    bars). Two tempo changes (one at a bar start, one mid-bar). Onsets and durations are
    off the tokenizer's grid on purpose: quantization is part of what is compared. Control
    changes and a pitch bend (not tokenized), one long after the guitar's last note.
    """
    rng = random.Random(seed)
    bar = 4 * tpq
    score = Score(tpq)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 120.0))
    score.tempos.append(Tempo(5 * bar, 90.0))  # at a bar start
    score.tempos.append(Tempo(7 * bar + 2 * tpq, 140.0))  # mid-bar

    def track(name: str, program: int, is_drum: bool = False) -> Track:
        t = Track(name, program, is_drum)
        score.tracks.append(t)
        return t

    def vel() -> int:
        return rng.randint(20, 127)

    jitter = tpq // 40  # off-grid onsets
    piano = track("piano", 0)
    for b in range(num_bars):
        root = rng.choice([48, 50, 53, 55, 57])
        for beat in (0, 2):
            t0 = b * bar + beat * tpq
            for p in (root, root + 4, root + 7):  # a chord at the bar start / half bar
                piano.notes.append(Note(t0, 2 * tpq - rng.randint(0, 30), p, vel()))
        for k in range(rng.randint(2, 6)):  # a melody
            t0 = b * bar + rng.randint(0, 15) * tpq // 4 + rng.randint(0, jitter)
            piano.notes.append(Note(t0, rng.choice([tpq // 4, tpq // 2, tpq, tpq // 3]), rng.randint(60, 84), vel()))
    bass = track("bass", 33)
    for b in range(num_bars):
        for beat in range(4):
            bass.notes.append(Note(b * bar + beat * tpq, tpq - 10, rng.randint(28, 45), vel()))
    drums = track("drums", 0, is_drum=True)
    for b in range(num_bars):
        for eighth in range(8):
            t0 = b * bar + eighth * tpq // 2
            drums.notes.append(Note(t0, tpq // 8, 42, vel()))  # hi-hat
            if eighth % 4 == 0:
                drums.notes.append(Note(t0, tpq // 8, 36, vel()))  # kick at bar start
            if eighth % 4 == 2:
                drums.notes.append(Note(t0, tpq // 8, 38, vel()))  # snare
    flute = track("flute", 73)
    for b in range(num_bars):
        if b % 3 != 2:  # and some empty bars
            start = b * bar + (0 if b % 2 == 0 else rng.randint(1, 3) * tpq)
            flute.notes.append(Note(start, rng.randint(tpq // 2, 3 * tpq), rng.randint(72, 96), vel()))
    guitar = track("guitar", 25)  # the same riff in bars 0-3, then silent
    riff = [rng.randint(52, 70) for _ in range(4)]
    for b in range(min(4, num_bars)):
        for k, pitch in enumerate(riff):
            guitar.notes.append(Note(b * bar + k * tpq, tpq // 2, pitch, vel()))
    # Events that are not tokenized: they must change nothing (not even the ACs).
    for b in range(num_bars):
        piano.controls.append(ControlChange(b * bar, 64, 127))  # sustain pedal
        piano.controls.append(ControlChange(b * bar + 3 * tpq, 64, 0))
    guitar.controls.append(ControlChange((num_bars - 1) * bar + tpq, 7, 90))  # long after its last note
    guitar.pitch_bends.append(PitchBend((num_bars - 1) * bar + 2 * tpq, 512))
    strings = track("strings", 48)
    for b in range(3, num_bars):
        strings.notes.append(Note(b * bar, bar, rng.randint(55, 67), vel()))
        strings.notes.append(Note(b * bar, bar, rng.randint(67, 79), vel()))
    for t in score.tracks:
        t.notes.sort(key=lambda n: (n.time, n.pitch))
    return score


def write_synthetic_midi(path: Path, seed: int = 0, num_bars: int = 12) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_score(seed, num_bars).dump_midi(path)
    return path


# -- notes as exact musical times ----------------------------------------------------------
def note_key(track) -> tuple[int, bool]:
    return (-1 if track.is_drum else int(track.program), bool(track.is_drum))


def notes_of(score: Score, offset_ticks: int = 0, offset_tpq: int | None = None) -> Counter:
    """Multiset of (program, drum, onset, duration, pitch, velocity); times are Fractions of
    quarter notes so that scores of different tpq compare exactly. `offset_ticks` (in
    `offset_tpq` ticks per quarter) is added to every onset."""
    shift = Fraction(offset_ticks, offset_tpq or score.tpq)
    out = Counter()
    for t in score.tracks:
        key = note_key(t)
        for n in t.notes:
            out[(*key, Fraction(n.time, score.tpq) + shift, Fraction(n.duration, score.tpq), n.pitch, n.velocity)] += 1
    return out


def chunk_dict(chunk) -> dict:
    """A `Chunk` as the mapping the store gives to the sequence builder."""
    return dataclasses.asdict(chunk)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(tokenizer_params())


@pytest.fixture(scope="session")
def vocab(tokenizer):
    return Vocab(tokenizer)


@pytest.fixture(scope="session")
def midi_dir() -> Path:
    """The real test MIDI folder (`$MMM_TEST_MIDI`); tests using it skip when unset."""
    root = os.environ.get("MMM_TEST_MIDI")
    if not root:
        pytest.skip("MMM_TEST_MIDI is not set")
    root = Path(root)
    if not root.is_dir():
        pytest.fail(f"MMM_TEST_MIDI={root} is not a folder")
    return root


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Synthetic MIDI files written with symusic (several seeds and lengths)."""
    root = tmp_path_factory.mktemp("synthetic_midi")
    for seed, bars in ((0, 12), (1, 9), (2, 16), (3, 24)):
        write_synthetic_midi(root / f"synthetic_{seed}.mid", seed, bars)
    return root


@pytest.fixture(scope="session")
def synthetic_chunks(synthetic_dir, tokenizer, vocab):
    """(path, score, chunks) of every synthetic file; small chunks force several per file."""
    settings = preprocess_settings(chunk_max_tokens=900, chunk_max_track_tokens=400, min_notes=8)
    out = []
    for path in sorted(synthetic_dir.glob("*.mid")):
        score = Score(path)
        out.append((path, score, tokenize_score(score, tokenizer, vocab, settings)))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer(synthetic_chunks):
    """A BPE-trained copy of the YAML tokenizer (vocab ~1000) trained with `train_bpe` on
    the bars of chunks (synthetic ones, many seeds), never on ACs."""
    tok = build_tokenizer(tokenizer_params())
    vocab = Vocab(tok)
    settings = preprocess_settings(min_notes=8)
    bars = [bar for _, _, chunks in synthetic_chunks for c in chunks for track in c.bars for bar in track]
    for seed in range(10, 30):
        for c in tokenize_score(synthetic_score(seed, 10), tok, vocab, settings):
            bars.extend(bar for track in c.bars for bar in track)
    train_bpe(tok, bars, BPE_VOCAB_SIZE)
    return tok


@pytest.fixture(scope="session")
def bpe_vocab(bpe_tokenizer):
    return Vocab(bpe_tokenizer)


REAL_FOLDERS = ("multitrack", "single_track", "abc")


@pytest.fixture(scope="session")
def real_files(midi_dir) -> list[Path]:
    files = sorted(p for folder in REAL_FOLDERS for p in (midi_dir / folder).iterdir() if p.is_file())
    assert len(files) >= 30, f"expected the shared test MIDI under {midi_dir}"
    return files


@pytest.fixture(scope="session")
def real_pieces(real_files, tokenizer, vocab) -> dict:
    """path -> (score, chunks) for every real file, with the store's default settings."""
    settings = preprocess_settings()
    return {path: (score := Score(path), tokenize_score(score, tokenizer, vocab, settings)) for path in real_files}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of 10 synthetic pieces: a corpus to preprocess and train on in seconds."""
    root = tmp_path_factory.mktemp("corpus")
    for seed in range(10):
        write_synthetic_midi(root / f"piece_{seed}.mid", seed, 12)
    return root
