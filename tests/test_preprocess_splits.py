"""Where a piece goes: GigaMIDI's own splits are kept, other sources are split by a hash of the
tokenized content, and exact duplicates (same content after tokenization) are kept once."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import symusic
from conftest import LAYOUTS, SCHEMA, data_cfg, make_gigamidi, midi_bytes, store_rows, tok_cfg, write_synthetic_midi

from mmm.data.store import Store
from mmm.data.store_writer import preprocess, split_of

# Every test preprocesses, in worker processes.
pytestmark = pytest.mark.subprocess

SMALL = {"min_bars": 1, "min_notes": 1, "chunk_min_bars": 1}  # midi_bytes pieces are one bar long


def gigamidi_cfg(root, version, store, tmp_path, subset: str = "all") -> dict:
    cfg = data_cfg(root, store, **SMALL)
    cfg["source"] = {
        "name": "gigamidi",
        "path": str(root),
        "version": version,
        "subset": subset,
        "cache_dir": str(tmp_path / "hf-cache"),
    }
    cfg["split"] = {"valid": 0.5, "test": 0.3}  # a hash would scatter files over every split
    return cfg


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2]])  # v1.0.0 per-subset files, v1.1.0 hub shards
def test_gigamidi_splits_are_kept(tmp_path, layout):
    root = tmp_path / "gigamidi"
    version = make_gigamidi(root, layout)
    # One subset: make_gigamidi's rows of different subsets repeat the same music.
    report = preprocess(gigamidi_cfg(root, version, tmp_path / "store", tmp_path, "drums-only"), tok_cfg())
    assert report["kept"] == 6 and report["duplicates"] == 0
    ours = {"train": "train", "validation": "valid", "test": "test"}
    for k in report["kept_files"]:
        assert k["split"] == ours[k["name"].split("/")[0]], k
    assert {s: v["files"] for s, v in report["splits"].items()} == {"train": 2, "valid": 2, "test": 2}
    for split in ("train", "valid", "test"):
        assert {ours[n.split("/")[0]] for n in Store(tmp_path / "store", split).table["name"].to_pylist()} == {split}


def test_sources_without_splits_are_split_by_content(tmp_path):
    songs = tmp_path / "songs"
    songs.mkdir()
    for seed in range(18):
        (songs / f"{seed:02d}.mid").write_bytes(midi_bytes(seed))
    cfg = data_cfg(songs, tmp_path / "store", **SMALL)
    cfg["split"] = {"valid": 0.5, "test": 0.3}
    report = preprocess(cfg, tok_cfg())
    assert report["kept"] == 18
    for k in report["kept_files"]:
        assert k["split"] == split_of(k["content"], 0.5, 0.3)
    assert all(v["files"] for v in report["splits"].values())  # 18 pieces land in all three


def same_notes_other_bytes(data: bytes) -> bytes:
    """The same music under other bytes: renamed tracks and another tick resolution."""
    score = symusic.Score.from_midi(data)
    for k, track in enumerate(score.tracks):
        track.name = f"renamed {k}"
    return score.resample(score.tpq * 2).dumps_midi()


def test_duplicates_are_kept_once_and_reported(tmp_path):
    songs = tmp_path / "songs"
    for seed in range(4):
        write_synthetic_midi(songs / f"song_{seed}.mid", seed, 10)
    original = (songs / "song_1.mid").read_bytes()
    (songs / "copy_of_1.mid").write_bytes(original)  # same bytes, another name
    (songs / "zz_renamed_1.mid").write_bytes(same_notes_other_bytes(original))
    score = symusic.Score.from_midi(original)
    score.tracks[0].notes[0].pitch += 1  # one note differs: not a duplicate
    (songs / "zz_one_note_off.mid").write_bytes(score.dumps_midi())
    store = tmp_path / "store"
    report = preprocess(data_cfg(songs, store, shard_size=2), tok_cfg())

    assert report["files"] == 7 and report["kept"] == 5 and report["duplicates"] == 2
    assert {d["name"]: d["same_as"] for d in report["duplicate_files"]} == {
        "song_1.mid": "copy_of_1.mid",
        "zz_renamed_1.mid": "copy_of_1.mid",
    }  # the first in source order stays
    names = {r[0] for r in store_rows(store)}
    assert names == {"copy_of_1.mid", "song_0.mid", "song_2.mid", "song_3.mid", "zz_one_note_off.mid"}
    # Every copy was given the split of the content, so no copy could have sat elsewhere.
    shards = [json.loads(p.read_text()) for p in sorted((store / "shards").glob("*.json"))]
    kept = {k["name"]: k for s in shards for k in s["kept"]}
    assert len({kept[n]["split"] for n in ("song_1.mid", "copy_of_1.mid", "zz_renamed_1.mid")}) == 1
    assert len({kept[n]["content"] for n in ("song_1.mid", "copy_of_1.mid", "zz_renamed_1.mid")}) == 1
    assert kept["zz_one_note_off.mid"]["content"] != kept["song_1.mid"]["content"]
    assert sum(v["files"] for v in report["splits"].values()) == 5


def test_duplicate_across_gigamidi_splits_keeps_the_held_out_copy(tmp_path):
    root = tmp_path / "gigamidi" / "v1.1.0"
    music = {
        split: [midi_bytes(10 * i + k) for k in range(2)] for i, split in enumerate(("train", "validation", "test"))
    }
    music["train"].append(same_notes_other_bytes(music["test"][0]))  # a test piece also in train
    for split, pieces in music.items():
        rows = [
            {
                "md5": hashlib.md5(m).hexdigest(),
                "music": m,
                "instrument_category": "no-drums",
                "music_styles_curated": [],
                "split": split,
            }
            for m in pieces
        ]
        (root / split).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / split / "0.parquet")
    report = preprocess(gigamidi_cfg(tmp_path / "gigamidi", "v1.1.0", tmp_path / "store", tmp_path), tok_cfg())
    assert report["duplicates"] == 1
    (dup,) = report["duplicate_files"]
    assert dup["split"] == "train" and dup["same_as"].startswith("test/")  # the test set stays whole
    assert report["splits"]["test"]["files"] == 2 and report["splits"]["train"]["files"] == 2
