"""Tests of mmm.data.sources: folder, GigaMIDI (synthetic parquet) and embedded music21 sources.

Tests on the real test MIDI read it from $MMM_TEST_MIDI and are skipped when it is unset;
everything else builds its files in tmp_path.
"""

import hashlib
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import symusic
from conftest import LAYOUTS, ROWS, SCHEMA, SUBSETS, gigamidi_rows, make_gigamidi, midi_bytes, write_parquet

import mmm.data.music21_corpus as music21_corpus
import mmm.data.sources as sources
from mmm.data.music21_corpus import convert_to_midi
from mmm.data.sources import (
    EmbeddedSource,
    FolderSource,
    GigaMIDISource,
    MusicFile,
    Source,
    build_source,
)

ABC_TUNE = "X:1\nT:Scale\nM:4/4\nL:1/8\nK:G\nGABc defg|g2f2 e2d2|]\n"


def test_music_file_md5_and_load():
    data = midi_bytes(1)
    f = MusicFile("x/y.mid", data, "midi")
    assert f.md5 == hashlib.md5(data).hexdigest()
    assert f.load().note_num() == 8
    assert MusicFile("t.abc", ABC_TUNE.encode(), "abc").load().note_num() == 12
    with pytest.raises(ValueError, match="unknown format"):
        MusicFile("x", b"", "mp3")


@pytest.mark.parametrize(
    ("name", "data", "fmt"),
    [
        ("bad/garbage.mid", b"definitely not midi", "midi"),
        ("bad/truncated.mid", midi_bytes(2)[:30], "midi"),
        ("bad/tune.abc", b"no tune here", "abc"),
    ],
)
def test_load_invalid_raises_value_error_with_name(name, data, fmt):
    with pytest.raises(ValueError, match=f"^{name}: "):
        MusicFile(name, data, fmt).load()


# ----------------------------------------------------------------------------- folder


def make_folder(root: Path) -> None:
    files = {
        "b/song.mid": midi_bytes(1),
        "A.MID": midi_bytes(2),
        "b/deep/er/x.MiDi": midi_bytes(3),
        "tune.abc": ABC_TUNE.encode(),
        "notes.txt": b"not music",
        ".hidden.mid": midi_bytes(4),
        "b/._song.mid": b"macOS resource fork",
        ".git/obj.mid": midi_bytes(5),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_folder_recursion_extensions_and_order(tmp_path):
    make_folder(tmp_path)
    src = FolderSource(tmp_path)
    assert isinstance(src, Source)
    names = [src[i].name for i in range(len(src))]
    assert names == ["A.MID", "b/deep/er/x.MiDi", "b/song.mid", "tune.abc"]
    assert [src[i].fmt for i in range(len(src))] == ["midi", "midi", "midi", "abc"]
    assert src[2].data == (tmp_path / "b/song.mid").read_bytes()
    assert src[-1].name == "tune.abc"
    with pytest.raises(IndexError):
        src[4]
    for i in range(len(src)):
        assert src[i].load().note_num() > 0
    only_mid = FolderSource(str(tmp_path), extensions=("MID",))
    assert [only_mid[i].name for i in range(len(only_mid))] == ["A.MID", "b/song.mid"]
    assert str(tmp_path) in src.description


def test_folder_fingerprint(tmp_path):
    make_folder(tmp_path)
    first = FolderSource(tmp_path).fingerprint()
    assert FolderSource(tmp_path).fingerprint() == first
    (tmp_path / "notes.txt").write_bytes(b"ignored files do not count")
    assert FolderSource(tmp_path).fingerprint() == first
    (tmp_path / "b/song.mid").write_bytes(midi_bytes(1, tracks=3))
    changed = FolderSource(tmp_path).fingerprint()
    assert changed != first
    (tmp_path / "new.mid").write_bytes(midi_bytes(9))
    assert FolderSource(tmp_path).fingerprint() not in (first, changed)
    (tmp_path / "new.mid").rename(tmp_path / "renamed.mid")
    assert FolderSource(tmp_path).fingerprint() not in (first, changed)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no music")
    with pytest.raises(ValueError, match="holds no file"):
        FolderSource(tmp_path)


# ----------------------------------------------------------------------------- real test MIDI

REAL = os.environ.get("MMM_TEST_MIDI")
needs_real = pytest.mark.skipif(not REAL, reason="MMM_TEST_MIDI is not set")


@needs_real
def test_real_folders_load():
    multi = FolderSource(Path(REAL) / "multitrack")
    assert len(multi) == 12
    names = [multi[i].name for i in range(len(multi))]
    assert names == sorted(names) and "Mr. Blue Sky.mid" in names
    for i in range(len(multi)):
        assert len(multi[i].load().tracks) >= 4
    abc = FolderSource(Path(REAL) / "abc")
    assert len(abc) == 5
    for i in range(len(abc)):
        assert abc[i].fmt == "abc" and abc[i].load().note_num() > 0


@needs_real
def test_real_invalid_files():
    src = FolderSource(Path(REAL) / "invalid")
    files = {src[i].name: src[i] for i in range(len(src))}
    with pytest.raises(ValueError, match="^ValueError_Control168.mid: .*control_value=168"):
        files["ValueError_Control168.mid"].load()
    # empty.mid is a well-formed MIDI file without notes: it parses; rejecting note-less
    # pieces is the preprocessing filter's job.
    assert files["empty.mid"].load().note_num() == 0


# ----------------------------------------------------------------------------- GigaMIDI


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gigamidi_layouts_subset_and_splits(tmp_path, layout):
    root = tmp_path / "gigamidi"
    version = make_gigamidi(root, layout)
    cache = tmp_path / "hf-cache"
    src = GigaMIDISource(root, version=version, subset="drums-only", splits=("test", "train"), cache_dir=cache)
    assert isinstance(src, Source)
    want = [f"{split}/{r['md5']}" for split in ("test", "train") for r in gigamidi_rows("drums-only", split)]
    files = [src[i] for i in range(len(src))]
    assert sorted(f.name for f in files) == sorted(want)
    assert [f.name.split("/")[0] for f in files] == ["test"] * ROWS + ["train"] * ROWS  # order of `splits`
    assert [f.split for f in files] == ["test"] * ROWS + ["train"] * ROWS  # GigaMIDI's own split, kept
    for f in files:
        assert f.fmt == "midi" and f.name.endswith(f.md5)  # md5 column == md5 of the bytes
        assert f.load().note_num() == 8
    assert [src[i].name for i in range(len(src))] == [f.name for f in files]  # deterministic

    everything = GigaMIDISource(root, version=version, subset="all", cache_dir=cache)
    assert len(everything) == len(SUBSETS) * len(sources.GIGAMIDI_SPLITS) * ROWS
    assert everything.fingerprint() != src.fingerprint()
    again = GigaMIDISource(root, version=version, subset="drums-only", splits=("test", "train"), cache_dir=cache)
    assert again.fingerprint() == src.fingerprint()
    assert "drums-only" in src.description


def test_gigamidi_picks_version_and_reports_missing(tmp_path):
    root = tmp_path / "gigamidi"
    make_gigamidi(root, "per-subset")
    make_gigamidi(root, "column-str")
    cache = tmp_path / "hf-cache"
    old = GigaMIDISource(root, version="v1.0.0", subset="no-drums", splits="validation", cache_dir=cache)
    new = GigaMIDISource(root, version="v1.1.0", subset="no-drums", splits=["validation"], cache_dir=cache)
    assert len(old) == len(new) == ROWS
    # Pointing at the version folder itself works too.
    assert (
        len(GigaMIDISource(root / "v1.0.0", version="v1.0.0", subset="no-drums", splits="test", cache_dir=cache))
        == ROWS
    )
    with pytest.raises(FileNotFoundError, match=r"v9\.9\.9 not found.*v1\.0\.0.*v1\.1\.0"):
        GigaMIDISource(root, version="v9.9.9", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="not found"):
        GigaMIDISource(tmp_path / "nowhere", cache_dir=cache)


def test_gigamidi_errors_when_nothing_matches(tmp_path):
    cache = tmp_path / "hf-cache"
    only_train = tmp_path / "only_train"
    write_parquet(only_train / "v1.1.0" / "drums-only" / "train" / "0.parquet", gigamidi_rows("drums-only", "train"))
    with pytest.raises(
        FileNotFoundError, match=r"(?s)split\(s\) \['validation', 'test'\].*drums-only/train/0\.parquet"
    ):
        GigaMIDISource(only_train, cache_dir=cache, subset="drums-only")
    with pytest.raises(FileNotFoundError, match="subset 'no-drums'"):
        GigaMIDISource(only_train, cache_dir=cache, subset="no-drums", splits="train")
    no_category = tmp_path / "no_category"
    table = pa.Table.from_pylist(gigamidi_rows("no-drums", "train"), schema=SCHEMA).drop_columns(
        ["instrument_category"]
    )
    (no_category / "v1.1.0" / "train").mkdir(parents=True)
    pq.write_table(table, no_category / "v1.1.0" / "train" / "0.parquet")
    with pytest.raises(ValueError, match="no instrument_category column"):
        GigaMIDISource(no_category, subset="no-drums", splits="train", cache_dir=cache)
    assert len(GigaMIDISource(no_category, subset="all", splits="train", cache_dir=cache)) == ROWS
    for bad in ({"subset": "drums"}, {"splits": ("training",)}, {"version": "latest"}):
        with pytest.raises(ValueError):
            GigaMIDISource(no_category, cache_dir=cache, **bad)


# ----------------------------------------------------------------------------- embedded music21 corpus


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("music21_midi")
    src = EmbeddedSource(cache, corpus="bach", max_files=3, num_workers=2)
    return cache, src


@pytest.mark.slow
def test_embedded_converts_first_works(embedded_cache):
    cache, src = embedded_cache
    assert isinstance(src, Source)
    assert len(src) == 3
    expected = [name for name, _ in music21_corpus.corpus_works("bach")[:3]]
    assert [src[i].name for i in range(3)] == expected == sorted(expected)
    for i in range(3):
        score = src[i].load()
        sounding = [t for t in score.tracks if len(t.notes) > 0]
        assert len(sounding) >= 2 and len(sounding) == len(score.tracks)
        assert not any(t.is_drum for t in score.tracks)
        assert len(score.tempos) >= 1 and len(score.time_signatures) >= 1
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_embedded_second_call_does_not_convert(embedded_cache, monkeypatch):
    cache, first = embedded_cache
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*.mid")}
    assert len(mtimes) == 3

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(EmbeddedSource, "_convert", staticmethod(no_conversion))
    again = EmbeddedSource(cache, corpus="bach", max_files=3)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.mid")} == mtimes
    assert again.fingerprint() == first.fingerprint()
    assert again[0].data == first[0].data


def test_embedded_failures_are_skipped_and_remembered(tmp_path, monkeypatch, caplog):
    calls = []

    def flaky(path):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise RuntimeError("music21 choked")
        return midi_bytes(len(calls))

    monkeypatch.setattr(music21_corpus, "convert_to_midi", flaky)
    with caplog.at_level(logging.WARNING, logger="mmm.data.sources"):
        src = EmbeddedSource(tmp_path, max_files=3, num_workers=1)
    assert len(src) == 2 and len(calls) == 3
    assert "music21 choked" in caplog.text
    failed = list(tmp_path.rglob("*.failed"))
    assert len(failed) == 1 and "music21 choked" in failed[0].read_text()
    assert len(EmbeddedSource(tmp_path, max_files=3, num_workers=1)) == 2
    assert len(calls) == 3  # neither the converted works nor the failed one were redone


def test_embedded_interrupted_conversion_resumes(tmp_path, monkeypatch):
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return midi_bytes(len(calls))

    monkeypatch.setattr(music21_corpus, "convert_to_midi", interrupted)
    with pytest.raises(KeyboardInterrupt):
        EmbeddedSource(tmp_path, max_files=3, num_workers=1)
    assert len(list(tmp_path.rglob("*.mid"))) == 1  # the interrupted work left no file at all
    assert len(EmbeddedSource(tmp_path, max_files=3, num_workers=1)) == 3
    assert len(calls) == 4  # only the two missing works were converted on the second run


@pytest.mark.slow
def test_embedded_programs():
    works = dict(music21_corpus.corpus_works("all"))
    chorale = symusic.Score.from_midi(convert_to_midi(works["bach/bwv10.7.mid"]))
    assert [(t.name, t.program) for t in chorale.tracks] == [("Soprano", 40), ("Alto", 41), ("Tenor", 42), ("Bass", 43)]
    quartet = symusic.Score.from_midi(convert_to_midi(works["haydn/opus74no1/movement3.mid"]))
    assert [t.program for t in quartet.tracks] == [40, 40, 41, 42]
    # An ABC file holding one tune per voice becomes one multi-track work.
    josquin = symusic.Score.from_midi(convert_to_midi(works["josquin/oVenusBant.mid"]))
    assert len(josquin.tracks) == 3 and all(len(t.notes) > 50 for t in josquin.tracks)


def music21_part(name: str, inst: str | None, pitches: list[int]):
    from music21 import instrument, note, stream

    part = stream.Part()
    if inst is not None:
        part.insert(0, getattr(instrument, inst)())
    part.partName = name
    for p in pitches:
        part.append(note.Note(p))
    return part


@pytest.mark.parametrize(
    ("name", "inst", "pitches", "program"),
    [
        ("Soprano", None, [72], 40),
        ("Bassus", None, [72], 43),  # the name tells the voice, whatever the notes
        ("Canto", "Piano", [48], 40),  # Monteverdi: singers encoded as pianos
        ("Quinto", "Piano", [55, 57, 60], 42),  # a voice without a range in its name: by register
        ("Violin I", "StringInstrument", [70], 40),  # the name beats a placeholder "String Ensemble"
        ("Horn 2", None, [60], 60),
        ("Piano", None, [60], 0),
        ("", "Piano", [60], 0),
        ("", "Harpsichord", [60], 6),
        ("", "KeyboardInstrument", [60], 0),
        ("", None, [40, 45], 43),
        ("Snare", "SnareDrum", [60], 41),  # never a drum kit
    ],
)
def test_program_for_part(name, inst, pitches, program):
    assert music21_corpus._program_for_part(music21_part(name, inst, pitches)) == program


def test_embedded_corpus_lists():
    bach = music21_corpus.corpus_works("bach")
    everything = music21_corpus.corpus_works("all")
    names = [n for n, _ in everything]
    assert len(bach) > 350 and set(bach) <= set(everything)
    assert names == sorted(names) and len(set(names)) == len(names)
    composers = {n.split("/")[0] for n in names}
    assert {"bach", "palestrina", "monteverdi", "haydn", "mozart", "beethoven"} <= composers
    # The chorales stored in two formats appear once, from MusicXML.
    assert dict(bach)["bach/bwv277.mid"].suffix == ".mxl"


# ----------------------------------------------------------------------------- build_source


def test_build_source(tmp_path, embedded_cache):
    make_folder(tmp_path)
    assert isinstance(build_source({"name": "folder", "path": str(tmp_path)}), FolderSource)
    cache, _ = embedded_cache
    src = build_source({"name": "embedded", "cache_dir": cache, "corpus": "bach", "max_files": 2})
    assert isinstance(src, EmbeddedSource) and len(src) == 2


@pytest.mark.parametrize(
    ("cfg", "pattern"),
    [
        (
            {"name": "folder", "pth": "x"},
            r"unknown key 'pth'.*did you mean 'path'.*allowed keys: name, path, extensions",
        ),
        ({"name": "gigamidi", "path": "x", "subsets": "all"}, r"unknown key 'subsets'.*did you mean 'subset'"),
        ({"name": "embedded", "cache_dir": "x", "max_file": 3}, r"unknown key 'max_file'.*'max_files'"),
        ({"name": "lakh", "path": "x"}, r"unknown source name 'lakh'; allowed: folder, gigamidi, embedded"),
        ({"path": "x"}, r"needs a 'name' key"),
        ({"name": "folder"}, r"needs key\(s\) 'path'"),
        ({"name": "embedded", "cache_dir": "x", "corpus": "mozart"}, r"corpus 'mozart' unknown"),
    ],
)
def test_build_source_rejects_bad_configs(cfg, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_source(cfg)


def test_folder_max_files_keeps_the_first_files(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.mid").write_bytes(midi_bytes(i))
    assert len(FolderSource(tmp_path, max_files=2)) == 2 and FolderSource(tmp_path, max_files=2)[1].name == "1.mid"
    assert len(build_source({"name": "folder", "path": str(tmp_path), "max_files": None})) == 4
    with pytest.raises(ValueError, match="max_files"):
        FolderSource(tmp_path, max_files=0)
