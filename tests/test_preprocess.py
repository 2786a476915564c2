"""`mmm.preprocess`: filtering with reasons, deterministic splits, resumable shards, the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import REPO, corpus_with_bad_files, data_cfg, store_rows, tok_cfg

from mmm.data.store import Store, done_shards, shard_paths
from mmm.data.store_writer import preprocess, split_of


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return corpus_with_bad_files(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "store"
    return store, preprocess(data_cfg(source, store), tok_cfg())


@pytest.mark.subprocess
def test_report_counts_and_reasons(built):
    store, report = built
    assert report["files"] == 13  # 10 songs + 3 bad; README.txt is not a music file
    assert report["kept"] == 10
    reasons = {r["name"]: r["reason"] for r in report["rejected_files"]}
    assert set(reasons) == {"bad/not_midi.mid", "bad/zero.mid", "bad/truncated.mid"}
    assert all(r["detail"] or r["reason"] == "no_notes" for r in report["rejected_files"])
    on_disk = json.loads((store / "report.json").read_text())
    assert on_disk["rejected_by_reason"] == report["rejected_by_reason"]
    assert sum(v["files"] for v in report["splits"].values()) == 10


@pytest.mark.subprocess
def test_store_content(built):
    store, report = built
    total = sum(len(Store(store, s)) for s in ("train", "valid", "test"))
    assert total == sum(k["chunks"] for k in report["kept_files"])
    row = Store(store, "train")[0]
    num_bars = len(row["bar_ticks"])
    assert all(len(track) == num_bars for track in row["bars"])  # tracks aligned on bars
    assert all(len(track) == num_bars for track in row["bar_acs"])
    assert all(
        bar[0] == row["bars"][0][0][0] for track in row["bars"] for bar in track
    )  # each bar starts with Bar_None
    assert Store(store, "train").num_tokens() > 0


@pytest.mark.subprocess
def test_split_is_deterministic_by_content(source, built, tmp_path):
    store, report = built
    other = tmp_path / "store"
    report2 = preprocess(data_cfg(source, other, shard_size=3), tok_cfg())  # other sharding
    assert {k["name"]: k["split"] for k in report2["kept_files"]} == {
        k["name"]: k["split"] for k in report["kept_files"]
    }
    assert store_rows(other) == store_rows(store)
    # the split depends on the hash only
    assert split_of("0" * 32, 0.05, 0.05) == "test"
    assert split_of("f" * 32, 0.05, 0.05) == "train"


@pytest.mark.subprocess
def test_rerun_after_interruption_redoes_only_missing_shards(source, built, tmp_path):
    store, _ = built
    copy = tmp_path / "store"
    preprocess(data_cfg(source, copy), tok_cfg())
    # simulate a kill: one shard never written, another killed between its data and its
    # report, and a temp file left behind by an interrupted write
    for shard in (1, 2):
        os.utime(shard_paths(copy, shard)[0])
    shard_paths(copy, 1)[0].unlink()
    shard_paths(copy, 1)[1].unlink()
    shard_paths(copy, 2)[1].unlink()
    (copy / "shards" / ".00003.arrow.tmp123").write_bytes(b"partial")
    for leftover in (".00001.arrow.tmp123", ".00002.json.tmp77"):  # of the shards to redo
        (copy / "shards" / leftover).write_bytes(b"partial")
    kept_mtime = shard_paths(copy, 0)[0].stat().st_mtime_ns
    assert done_shards(copy) == {0, 3}
    report = preprocess(data_cfg(source, copy), tok_cfg())
    assert report["files_processed_this_run"] == 8  # shards 1 and 2 only
    assert shard_paths(copy, 0)[0].stat().st_mtime_ns == kept_mtime
    assert store_rows(copy) == store_rows(store)  # nothing lost, nothing duplicated
    assert not list(copy.glob("shards/.0000[12].*"))  # a redone shard's leftovers are removed


@pytest.mark.subprocess
def test_changed_settings_refuse_to_mix_into_a_store(source, built):
    store, _ = built
    with pytest.raises(
        RuntimeError,
        match=r"made from other data or settings; changed: data\.preprocess\.min_bars: 8 -> 4\. Rebuild it: delete",
    ):
        preprocess(data_cfg(source, store, min_bars=4), tok_cfg())
    params = tok_cfg()
    params["params"]["pitch_range"] = [21, 107]
    with pytest.raises(RuntimeError, match=r"tokenizer\.params\.pitch_range: \[21, 108\] -> \[21, 107\]"):
        preprocess(data_cfg(source, store), params)


def test_bad_config_fails_before_work(source, tmp_path):
    with pytest.raises(ValueError, match="data.preprocess.min_bar .*did you mean data.preprocess.min_bars"):
        cfg = data_cfg(source, tmp_path / "s")
        cfg["preprocess"]["min_bar"] = cfg["preprocess"].pop("min_bars")
        preprocess(cfg, tok_cfg())
    bad_tok = tok_cfg()
    bad_tok["params"]["num_velocity"] = 24
    with pytest.raises(ValueError, match="num_velocity"):
        preprocess(data_cfg(source, tmp_path / "s2"), bad_tok)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s2").exists()


@pytest.mark.subprocess
def test_parallel_workers_give_the_same_store(source, built, tmp_path):
    store, _ = built
    parallel = tmp_path / "store"
    preprocess(data_cfg(source, parallel, num_workers=2), tok_cfg())
    assert store_rows(parallel) == store_rows(store)


@pytest.mark.subprocess
def test_arrow_shards_are_memory_mappable(built):
    store, _ = built
    with pa.memory_map(str(shard_paths(store, 0)[0]), "r") as f:
        table = pa.ipc.open_file(f).read_all()
    assert table.num_rows > 0 and "bars" in table.column_names


@pytest.mark.subprocess
def test_entry_point_on_shared_midi_reports_every_invalid_file(midi_dir, tmp_path):
    """`python -m mmm.preprocess data=folder data.path=<shared midi>` as the README shows it."""
    env = {**os.environ, "MMM_DATA_DIR": str(tmp_path / "data"), "MMM_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(
        [sys.executable, "-m", "mmm.preprocess", "data=folder", f"data.path={midi_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_path = next((tmp_path / "data").glob("folder-*/store/report.json"))
    report = json.loads(report_path.read_text())
    invalid = sorted(p.name for p in (midi_dir / "invalid").iterdir())
    rejected = {Path(r["name"]).name: r for r in report["rejected_files"]}
    assert sorted(rejected) == invalid, "only the invalid files are rejected"
    assert rejected["empty.mid"]["reason"] == "no_notes"
    assert "168" in rejected["ValueError_Control168.mid"]["detail"]
    music = [p for p in midi_dir.rglob("*") if p.suffix in (".mid", ".abc") and p.parent.name != "invalid"]
    assert report["kept"] == len(music)
    for name in invalid:  # the console summary names each rejected file and its reason
        assert name in proc.stdout + proc.stderr


def test_a_tempo_far_after_the_last_note_is_rejected_before_tokenizing():
    """Found by experiments/fuzz: a corrupt delta time moved the only tempo and time signature
    to tick 2^25; the tokenizer then wrote ~44k empty bars and chunking took minutes."""
    from conftest import synthetic_score
    from symusic import Tempo, TimeSignature

    from mmm.data.checks import Rejected, check_score

    for far in (Tempo(2**25, 120.0), TimeSignature(2**25, 4, 4)):
        score = synthetic_score(0, 10)
        (score.tempos if isinstance(far, Tempo) else score.time_signatures).append(far)
        with pytest.raises(Rejected, match="too_long.*notes, tempos and time signatures"):
            check_score(score)
    check_score(synthetic_score(0, 10))
