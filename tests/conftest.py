"""Shared helpers and fixtures of the test suite, in one place (no test module imports another):

- configs: `compose_config` composes configs/ with Hydra as the entry points do; the data and
  tokenizer configs, preprocessing settings and the small training run are derived from it;
- synthetic music: multi-track MIDI written into tmp folders (so the tests need nothing outside
  the repository), corpora to preprocess and train on, a fake GigaMIDI download;
- models: a tiny random-weight transformer;
- fixtures: the tokenizer of `configs/tokenizer/mmm.yaml`, a small BPE-trained copy of it,
  synthetic chunks, corpora, the real test MIDI of `$MMM_TEST_MIDI`, a served model.

Callback classes that runs started by the tests instantiate by name (`_target_`) live in
tests/rank_probe.py."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from symusic import ControlChange, Note, PitchBend, Score, Tempo, TimeSignature, Track

import mmm.config  # noqa: F401 (registers the ${mmm.slug:...} resolver the data configs use)
import mmm.data.sources as sources
from mmm.data.chunks import tokenize_score
from mmm.data.store import Store
from mmm.tokenizer import Vocab, build_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BPE_VOCAB_SIZE = 1000


# -- configs -------------------------------------------------------------------------------
def compose_config(config_name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """`configs/<config_name>.yaml` composed by Hydra with `overrides` (command-line syntax),
    as `python -m mmm.<entry point> <overrides>` composes it, without running anything. The
    one way the tests build a config from configs/ (a fresh, unresolved config each call)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@functools.lru_cache(maxsize=None)
def _resolved_preprocess_config(overrides: tuple[str, ...]) -> dict:
    """`compose_config("preprocess", overrides)` as plain resolved containers (cached: treat
    as read-only, callers get deep copies)."""
    return OmegaConf.to_container(compose_config("preprocess", overrides), resolve=True)


def data_config(path: str | Path = "unused", store: str | Path | None = None) -> dict:
    """The `data` config `python -m mmm.preprocess data=folder data.path=<path> [data.store=<store>]`
    hands to `mmm.data.store_writer.preprocess`, composed by Hydra and resolved into plain, mutable
    containers (a fresh copy each call). Its `preprocess`, `split` and `sequences` sections
    are those of configs/data/common.yaml; `path` defaults to a placeholder."""
    overrides = ["data=folder", f"data.path={path}"] + ([f"data.store={store}"] if store is not None else [])
    return copy.deepcopy(_resolved_preprocess_config(tuple(overrides))["data"])


def tokenizer_config() -> dict:
    """The composed `tokenizer` config (configs/tokenizer/mmm.yaml: `vocab_size`, `path`,
    `params`), resolved into plain containers (a fresh copy each call)."""
    return copy.deepcopy(_resolved_preprocess_config(("data=folder", "data.path=unused"))["tokenizer"])


def tokenizer_params() -> dict:
    """The `params:` mapping of configs/tokenizer/mmm.yaml (a fresh copy each call)."""
    return tokenizer_config()["params"]


def preprocess_settings(**overrides) -> SimpleNamespace:
    """The `data.preprocess` settings (configs/data/common.yaml) with `overrides`, as the
    namespace `mmm.data.chunks.tokenize_score` takes."""
    return SimpleNamespace(**{**data_config()["preprocess"], **overrides})


def sequences_config(**overrides) -> dict:
    """The `data.sequences` settings (configs/data/common.yaml) with `overrides`."""
    return {**data_config()["sequences"], **overrides}


def data_cfg(source_path: Path, store: Path, **preprocess_overrides) -> dict:
    """The data config of a folder source for `mmm.data.store_writer.preprocess`, with small test
    settings (1 worker, shards of 4 files, pieces of at least 16 notes) and
    `preprocess_overrides` on top (e.g. `num_workers=2`, `shard_size=1`)."""
    cfg = data_config(source_path, store)
    cfg["preprocess"].update({"num_workers": 1, "shard_size": 4, "min_notes": 16, **preprocess_overrides})
    return cfg


def tok_cfg() -> dict:
    """The tokenizer config for `mmm.data.store_writer.preprocess`: the YAML params, no BPE, no file."""
    return {**tokenizer_config(), "vocab_size": None, "path": "unused"}


def small_overrides(corpus: Path, root: Path) -> list[str]:
    """Overrides of the real train config (`compose_config("train", ...)`, `python -m mmm.train`)
    that shrink it to seconds on a CPU: the folder `corpus`, data and run folder under `root`,
    a 2-layer model of width 32, 6 steps with checkpoints and validation every 3."""
    return [
        "data=folder",
        f"data.path={corpus}",
        f"paths.data_dir={root / 'data'}",
        f"run_dir={root / 'run'}",
        "data.split.valid=0.3",
        "data.split.test=0.1",
        "data.max_seq_len=256",
        "data.loader.batch_size=2",
        "data.loader.num_workers=0",
        "data.preprocess.num_workers=1",
        "data.preprocess.min_notes=16",
        "tokenizer.vocab_size=800",
        "++model.overrides={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}",
        "trainer=cpu",
        "trainer.precision=32",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.progress_bar=null",
        "optim.warmup_steps=2",
    ]


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
        for _ in range(rng.randint(2, 6)):  # a melody
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
    """`synthetic_score(seed, num_bars)` written as a MIDI file at `path` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_score(seed, num_bars).dump_midi(path)
    return path


def corpus_with_bad_files(root: Path, n: int = 10) -> Path:
    """n synthetic pieces under `root/songs` plus files every real collection has, under
    `root/bad`: garbage, empty, truncated (and a README.txt that is not a music file)."""
    for seed in range(n):
        write_synthetic_midi(root / "songs" / f"song_{seed:02d}.mid", seed, 10 + seed % 5)
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "not_midi.mid").write_bytes(b"this is a text file, not a MIDI file\n" * 10)
    (root / "bad" / "zero.mid").write_bytes(b"")
    good = (root / "songs" / "song_00.mid").read_bytes()
    (root / "bad" / "truncated.mid").write_bytes(good[: len(good) // 3])
    (root / "songs" / "README.txt").write_text("not music: ignored by extension")
    return root


def store_rows(store: Path) -> list[tuple]:
    """Every row of a token store (all splits) as comparable tuples (name, chunk, split, bars,
    bar ACs), sorted: two stores with the same rows hold the same data."""
    rows = []
    for split in ("train", "valid", "test"):
        s = Store(store, split)
        rows += [
            (r["name"], r["chunk"], r["split"], json.dumps(r["bars"]), json.dumps(r["bar_acs"]))
            for r in map(s.__getitem__, range(len(s)))
        ]
    return sorted(rows)


def midi_bytes(seed: int, tracks: int = 2) -> bytes:
    """A small valid MIDI file (one bar of 4 notes per track) whose bytes differ for every seed."""
    score = Score(480)
    for k in range(tracks):
        track = Track(name=f"t{k}", program=k)
        for j in range(4):
            track.notes.append(Note(j * 480, 480, 40 + (seed + 7 * k + j) % 60, 64 + seed % 60))
        score.tracks.append(track)
    return score.dumps_midi()


# -- a fake GigaMIDI download --------------------------------------------------------------
SUBSETS = ("all-instruments-with-drums", "drums-only", "no-drums")
ROWS = 2  # per subset and split
SCHEMA = pa.schema(
    [
        ("md5", pa.string()),
        ("music", pa.binary()),
        ("instrument_category", pa.string()),
        ("music_styles_curated", pa.list_(pa.string())),
        ("split", pa.string()),
    ]
)
LAYOUTS = ("per-subset", "per-subset-sharded", "column-str", "column-int")  # the layouts `make_gigamidi` writes


def gigamidi_rows(subset: str, split: str) -> list[dict]:
    """The `ROWS` parquet rows of one subset and split (`midi_bytes` pieces, distinct everywhere)."""
    base = 100 * SUBSETS.index(subset) + 10 * sources.GIGAMIDI_SPLITS.index(split)
    rows = []
    for k in range(ROWS):
        music = midi_bytes(base + k)
        rows.append(
            {
                "md5": hashlib.md5(music).hexdigest(),
                "music": music,
                "instrument_category": subset,
                "music_styles_curated": ["rock"] if k else ["jazz", "pop"],
                "split": split,
            }
        )
    return rows


def write_parquet(path: Path, rows: list[dict], int_category: bool = False) -> None:
    """Write GigaMIDI rows as a parquet file of `SCHEMA`; `int_category`: the newer releases'
    0/1/2 codes in a long-named column instead of the subset names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if int_category:
        codes = pa.array([sources._CATEGORY_CODES[c] for c in table["instrument_category"].to_pylist()], pa.int64())
        table = table.drop_columns(["instrument_category"]).append_column(
            "instrument_category__drums-only__0__all-instruments-with-drums__1_no-drums__2", codes
        )
    pq.write_table(table, path)


def make_gigamidi(root: Path, layout: str) -> str:
    """Write a tiny GigaMIDI download in one of the known `LAYOUTS`; returns its version."""
    splits = sources.GIGAMIDI_SPLITS
    if layout == "per-subset":  # v1.0.0: {subset}/{split}.parquet
        for subset in SUBSETS:
            for split in splits:
                write_parquet(root / "v1.0.0" / subset / f"{split}.parquet", gigamidi_rows(subset, split))
        return "v1.0.0"
    if layout == "per-subset-sharded":  # v1.1.0/{subset}/{split}/*.parquet
        for subset in SUBSETS:
            for split in splits:
                rows = gigamidi_rows(subset, split)
                for shard in range(ROWS):
                    write_parquet(root / "v1.1.0" / subset / split / f"{shard:05d}.parquet", rows[shard : shard + 1])
        return "v1.1.0"
    # Hub layout v1.1.0/{split}/*.parquet: subsets only in a column, rows mixed in shards.
    for split in splits:
        rows = [r for subset in SUBSETS for r in gigamidi_rows(subset, split)]
        half = len(rows) // 2
        for shard, part in enumerate((rows[:half], rows[half:])):
            write_parquet(
                root / "v1.1.0" / split / f"{split}-{shard:05d}-of-00002.parquet",
                part,
                int_category=layout == "column-int",
            )
    # Hidden folders (download caches, like the ".cache" of `huggingface-cli download`) are ignored.
    write_parquet(root / "v1.1.0" / ".cache" / "stale-train.parquet", gigamidi_rows("drums-only", "train"))
    return "v1.1.0"


# -- notes as exact musical times ----------------------------------------------------------
def note_key(track) -> tuple[int, bool]:
    """(program, is_drum) of a track; drums are program -1 whatever their MIDI program."""
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


# -- models --------------------------------------------------------------------------------
def tiny_model(vocab_size: int, max_seq_len: int = 512, seed: int = 0, **overrides):
    """A random-weight `MMMTransformer` of 2 layers and width 32 (seeded), in eval mode;
    `overrides` are other `ModelConfig` fields (the alignment signals)."""
    import torch

    from mmm.model import MMMTransformer, ModelConfig

    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_seq_len=max_seq_len,
        attention="sdpa",
        **overrides,
    )
    return MMMTransformer(config).eval()


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer():
    """The miditok tokenizer of configs/tokenizer/mmm.yaml, without BPE."""
    return build_tokenizer(tokenizer_params())


@pytest.fixture(scope="session")
def vocab(tokenizer):
    """The `Vocab` of the `tokenizer` fixture."""
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
    """The `Vocab` of the `bpe_tokenizer` fixture."""
    return Vocab(bpe_tokenizer)


REAL_FOLDERS = ("multitrack", "single_track", "abc")


@pytest.fixture(scope="session")
def real_files(midi_dir) -> list[Path]:
    """The real test files of `$MMM_TEST_MIDI` (multi-track, single-track and ABC folders)."""
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


@pytest.fixture(scope="module")
def serve_mmm(tokenizer, vocab):
    """An `MMM` over a `tiny_model` (context 1024) and the base tokenizer, as the serve, studio
    and load tests serve it."""
    from mmm.generation.api import MMM

    return MMM(tiny_model(vocab.size, max_seq_len=1024), tokenizer, max_bar_tokens=24, num_threads=1)
