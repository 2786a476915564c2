"""The model shipped in models/ (its card: models/mmm-music21-small/README.md): it loads as
documented, knows what it was trained on, and rewrites bars and adds a track with the
structure a musician asked for, on music that is not in its corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO, synthetic_score

SHIPPED = REPO / "models" / "mmm-music21-small"


@pytest.fixture(scope="module")
def shipped():
    from mmm import MMM

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.fail(f"{SHIPPED} is missing: the repository ships this model (see its README)")
    return MMM.from_pretrained(SHIPPED, num_threads=1)


def test_the_folder_carries_its_generation_settings_and_card(shipped):
    config = json.loads((SHIPPED / "config.json").read_text())
    assert shipped.max_bar_tokens == config["generation"]["max_bar_tokens"] >= 16
    assert shipped.controls_seen == sorted(config["generation"]["controls_seen"])
    assert config["training"]["experiment"] == "music21"
    assert (SHIPPED / "README.md").is_file() and (SHIPPED / "loss_curves.png").is_file()
    assert (SHIPPED / "model.safetensors").stat().st_size < 50 * 2**20


@pytest.mark.slow
def test_infill_and_new_track_keep_the_requested_structure(shipped):
    score = synthetic_score(3, 12)
    out = shipped.infill(score, track=0, bars=(4, 8), seed=0)
    assert shipped.bar_grid(out).num_bars == shipped.bar_grid(score).num_bars
    for t, (before, after) in enumerate(zip(score.tracks, out.tracks)):
        b, a = before.notes.numpy(), after.notes.numpy()
        if t != 0:  # every other track is untouched
            assert all(np.array_equal(b[k], a[k]) for k in ("time", "pitch", "duration"))
    added = shipped.add_track(score, program=33, seed=0)
    assert len(added.tracks) == len(score.tracks) + 1 and added.tracks[-1].program == 33
    assert all(note.time < shipped.bar_grid(score).starts[-1] for note in added.tracks[-1].notes)


@pytest.mark.slow
def test_an_uncontrolled_infill_bar_is_rarely_expected_empty(shipped):
    """The model's own probability that an infilled bar is empty, given the real bars before it
    (teacher forcing, the prompt the API builds), for a bass whose every bar has four notes.
    Before bar headers were BPE words of their own, a bar opened without controls was read as
    an empty bar: the first infilled bar got a ~50% chance of silence (experiments/sparse_infills)."""
    import torch

    from mmm.data.timing import sequence_timing
    from mmm.generation.grammar import GrammarTables
    from mmm.generation.request import Request

    score = synthetic_score(3, 12)
    track, (a, b) = 1, (4, 8)
    request = Request("infill", track=track, bars=(a, b), seed=0)
    prompt = list(shipped.run(request, score).report.steps[0].prompt)
    _, _, piece = shipped.check(request, score)
    vocab, model = shipped.vocab, shipped.model
    tables = GrammarTables.of(vocab)
    closes = tables.opens_bar.copy()
    closes[vocab.fill_end] = True
    header_only = tables.opens_bar & (tables.first_pos < 0)
    ids = list(prompt)
    expected_empty = []

    def next_id(ids: list[int]) -> torch.Tensor:
        """The model's distribution after `ids`, with their musical times when it reads them."""
        timing = {}
        if model.config.timing is not None:
            times, flags, _ = sequence_timing(ids, vocab, model.config.timing)
            timing = {"times": torch.from_numpy(times)[None], "flags": torch.from_numpy(flags)[None]}
        return model(torch.tensor([ids]), last_only=True, **timing)[0, -1].float().softmax(-1)

    with torch.inference_mode():
        for bar in piece.bars[track][a:b]:
            assert any(vocab.is_note_start[i] for i in bar)
            p = next_id(ids)
            empty = 0.0
            for h in np.flatnonzero(header_only & (p.numpy() > 0.005)):
                q = next_id(ids + [int(h)])
                empty += float(p[h]) * float(q[torch.from_numpy(closes)].sum())
            expected_empty.append(empty)
            ids += vocab.encode_words([list(bar)])
    assert max(expected_empty) < 0.2, expected_empty


@pytest.mark.slow
def test_the_cards_scripts_run_on_the_shipped_model(tmp_path):
    """The commands the card gives for its outside-corpus table and its gallery run on the
    shipped folder (a folder of MIDI files; a data folder whose store lists held-out chorales)."""
    import subprocess
    import sys

    from conftest import write_synthetic_midi

    for seed in (0, 1):
        write_synthetic_midi(tmp_path / "songs" / f"song_{seed}.mid", seed, 12)
    script = REPO / "experiments" / "shipped_model" / "outside_music.py"
    args = [sys.executable, str(script), str(SHIPPED), str(tmp_path / "songs"), "--window-bars", "8", "--threads", "1"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("| song_") == 2 and "2 infills: exact bars 2/2" in out.stdout
    listening = out.stdout[out.stdout.index("## Listening") :]
    assert (
        "| the original bars | " in listening and "of 2 files (a window of 8 bars in the middle of each)" in listening
    )

    data = tmp_path / "data"
    kept = []
    for seed in range(3):
        name = f"bach/chorale_{seed}.mid"
        write_synthetic_midi(data / "music21_midi" / name, seed, 8)
        kept.append({"name": name, "split": "test", "notes": 100 - seed})
    (data / "corpus" / "store").mkdir(parents=True)
    (data / "corpus" / "store" / "report.json").write_text(json.dumps({"kept_files": kept}))
    script = REPO / "experiments" / "gallery" / "make_gallery.py"
    gallery = tmp_path / "gallery"
    args = [sys.executable, str(script), "--model", str(SHIPPED), "--data-dir", str(data), "--data-name", "corpus"]
    out = subprocess.run([*args, "--out", str(gallery), "--no-train"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    items = json.loads((gallery / "gallery.json").read_text())["items"]
    assert [i["id"] for i in items] == ["infill_soprano", "infill_bass", "new_track", "from_scratch"]
    for item in items:
        assert all((gallery / m["file"]).stat().st_size > 0 for m in item["media"])
