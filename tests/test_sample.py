"""`python -m mmm.sample` (`mmm.sample.sample`) and the piano roll (`mmm.render.pianoroll`).

Proves: the real configs/sample.yaml composes and runs every task on a saved random-weight
checkpoint, writing one MIDI + one piano-roll PNG (original and generated notes in their two
colours) per variation and a JSON summary (request, seed, timings, tokens/s, outputs, and a
warning, also logged by `MMM.run`, when the model's bar grid differs from the file's); bad
requests and bad input files are rejected with a clear message before the model is loaded
(the loader is replaced by one that fails the test); the Hydra entry point runs as a command
and exits with status 2 and an `error:` line on a bad request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config, synthetic_score, tiny_model, write_synthetic_midi
from symusic import Score, TimeSignature

from mmm import sample as sample_module
from mmm.model.pretrained import save_pretrained
from mmm.render.pianoroll import GENERATED_COLOR, ORIGINAL_COLOR, plot_pianoroll
from mmm.sample import sample


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, bpe_tokenizer, bpe_vocab) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    save_pretrained(tiny_model(bpe_vocab.size), bpe_tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def midi(tmp_path_factory) -> Path:
    return write_synthetic_midi(tmp_path_factory.mktemp("midi") / "song.mid", seed=0, num_bars=12)


def config(*overrides: str):
    """configs/sample.yaml composed with 1 thread, 16 tokens per bar and `overrides`."""
    return compose_config("sample", ["num_threads=1", "max_bar_tokens=16", *overrides])


def _colour_fraction(png: Path, colour: str) -> float:
    import matplotlib.image
    from matplotlib.colors import to_rgb

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return float((np.abs(pixels - np.array(to_rgb(colour))).sum(-1) < 0.05).mean())


@pytest.mark.slow
def test_infill_writes_midi_png_and_json(ckpt, midi, tmp_path):
    out_dir = tmp_path / "out"
    summary = sample(
        config(
            f"ckpt={ckpt}",
            f"input={midi}",
            "task=infill",
            "track=1",
            "bars=[2,5]",
            "num_variations=2",
            "seed=3",
            f"out_dir={out_dir}",
            "controls={note_density:4}",
        )
    )
    files = json.loads((out_dir / "summary.json").read_text())
    assert (
        files["seed"] == 3
        and files["request"]["bars"] == [2, 5]
        and files["request"]["controls"] == {"note_density": 4}
    )
    assert files["tokens_per_s"] > 0 and files["timings"]["decode_s"] > 0 and files["timings"]["new_tokens"] > 0
    assert {"prefill_s", "load_s", "total_s"} <= set(files["timings"])
    assert files["bar_grid_warning"] is None  # the file's bars are the model's
    assert len(files["outputs"]) == 2 and files["outputs"] == summary["outputs"]
    original = Score(str(midi))
    for output in files["outputs"]:
        out = Score(output["midi"])
        assert len(out.tracks) == len(original.tracks)
        assert output["generated_regions"][0][0] == 1
        png = Path(output["png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _colour_fraction(png, ORIGINAL_COLOR) > 0.001
    generated_any = any(_colour_fraction(Path(o["png"]), GENERATED_COLOR) > 0 for o in files["outputs"])
    assert generated_any or all(not Score(o["midi"]).tracks[1].notes for o in files["outputs"])
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "song_infill_0.mid",
        "song_infill_0.png",
        "song_infill_1.mid",
        "song_infill_1.png",
        "summary.json",
    ]


@pytest.mark.slow
def test_add_track_and_generate(ckpt, midi, tmp_path):
    summary = sample(
        config(f"ckpt={ckpt}", f"input={midi}", "task=add_track", "program=-1", f"out_dir={tmp_path / 'a'}")
    )
    out = Score(summary["outputs"][0]["midi"])
    assert len(out.tracks) == len(Score(str(midi)).tracks) + 1 and out.tracks[-1].is_drum
    summary = sample(
        config(
            f"ckpt={ckpt}",
            "task=generate",
            "programs=[0,33]",
            "num_bars=4",
            "time_signature=3/4",
            f"out_dir={tmp_path / 'g'}",
        )
    )
    out = Score(summary["outputs"][0]["midi"])
    assert [t.program for t in out.tracks] == [0, 33]
    assert (out.time_signatures[0].numerator, out.time_signatures[0].denominator) == (3, 4)
    assert Path(summary["outputs"][0]["png"]).is_file() and Path(summary["summary_path"]).is_file()


def test_summary_warns_when_the_bar_grid_differs_from_the_file(ckpt, bpe_tokenizer, tmp_path, caplog):
    known = {t.split("_", 1)[1] for t in bpe_tokenizer.vocab if t.startswith("TimeSig_")}
    num, den = next((n, d) for n, d in ((11, 8), (13, 16), (7, 16), (15, 8)) if f"{n}/{d}" not in known)
    score = synthetic_score(seed=0, num_bars=8)
    score.time_signatures.append(TimeSignature(0, num, den))  # the later event at tick 0 rules the file's bars
    midi = tmp_path / "odd.mid"
    score.dump_midi(str(midi))
    with caplog.at_level("WARNING", logger="mmm.generation.api"):
        summary = sample(
            config(
                f"ckpt={ckpt}", f"input={midi}", "task=infill", "track=1", "bars=[1,2]", f"out_dir={tmp_path / 'out'}"
            )
        )
    written = json.loads(Path(summary["summary_path"]).read_text())["bar_grid_warning"]
    assert f"{num}/{den}" in written and "bar 0" in written  # the model counts 4/4 bars from the start
    assert any(r.name == "mmm.generation.api" and written in r.getMessage() for r in caplog.records)


def _empty_midi(path: Path) -> Path:
    Score(480).dump_midi(str(path))
    return path


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["input={tmp}/missing.mid"], FileNotFoundError, "input file not found"),
        (["input={tmp}/corrupt.mid"], ValueError, "cannot read"),
        (["input={tmp}/empty.mid"], ValueError, "no notes"),
        (["bars=[10,40]"], ValueError, r"bars \(10, 40\) out of range: the piece has 12 bars"),
        (["bars=[[0,4],[2,6]]"], ValueError, "overlap"),
        (["track=9"], ValueError, "unknown track 9: the score has 6 track"),
        (["task=remix"], ValueError, "task='remix': expected one of infill, add_track, generate"),
        (["controls={density:3}"], ValueError, "unknown control 'density'"),
        (["track_controls={repetition:3}"], ValueError, "repetition"),
        (["task=add_track", "program=200"], ValueError, "program 200"),
        (["task=generate", "programs=[0,130]"], ValueError, "program 130"),
        (["task=generate", "num_bars=0"], ValueError, "num_bars"),
        (["input=null"], ValueError, "needs input"),
        (["ckpt={tmp}/no_model"], FileNotFoundError, "no such checkpoint"),
        (["+temprature=0.5"], ValueError, "unknown config key.*temprature"),
        (["num_variations=0"], ValueError, "num_variations"),
    ],
)
def test_bad_requests_fail_before_the_model_loads(ckpt, midi, tmp_path, monkeypatch, overrides, error, message):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a bad request")

    monkeypatch.setattr(sample_module.MMM, "from_pretrained", no_load)
    (tmp_path / "corrupt.mid").write_bytes(b"MThd\x00\x00\x00\x06garbage")
    _empty_midi(tmp_path / "empty.mid")
    base = [f"ckpt={ckpt}", f"input={midi}", "task=infill", "track=1", "bars=[2,5]", f"out_dir={tmp_path / 'out'}"]
    with pytest.raises(error, match=message):
        sample(config(*base, *(o.replace("{tmp}", str(tmp_path)) for o in overrides)))
    assert not (tmp_path / "out").exists()


def test_good_request_does_load(ckpt, midi, tmp_path, monkeypatch):
    """The check above is meaningful: the same setup with a valid request reaches the loader."""

    def no_load(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(sample_module.MMM, "from_pretrained", no_load)
    with pytest.raises(AssertionError, match="loaded"):
        sample(config(f"ckpt={ckpt}", f"input={midi}", "task=infill", "track=1", "bars=[2,5]", f"out_dir={tmp_path}"))


@pytest.mark.subprocess
def test_command_line(ckpt, midi, tmp_path):
    out_dir = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "mmm.sample",
        f"ckpt={ckpt}",
        f"input={midi}",
        "task=infill",
        "track=0",
        "bars=[1,3]",
        f"out_dir={out_dir}",
        "num_threads=1",
        "max_bar_tokens=16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out_dir / "summary.json").is_file() and (out_dir / "song_infill_0.mid").is_file()
    bad = subprocess.run(
        [*cmd[:-5], "track=42", f"out_dir={tmp_path / 'bad'}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "error: unknown track 42" in bad.stderr and "Traceback" not in bad.stderr


def test_pianoroll_colours(tmp_path):
    score = synthetic_score(0, 4)
    png = plot_pianoroll(score, tmp_path / "roll.png", regions=[(0, 0, 2 * 4 * score.tpq)], title="t")
    assert _colour_fraction(png, GENERATED_COLOR) > 0.0005 and _colour_fraction(png, ORIGINAL_COLOR) > 0.0005
    plain = plot_pianoroll(score, tmp_path / "plain.png")  # only the legend swatch is orange
    assert _colour_fraction(plain, GENERATED_COLOR) * 3 < _colour_fraction(png, GENERATED_COLOR)


def test_default_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MMM_RUNS_DIR", str(tmp_path))
    from mmm.config import plain

    cfg = plain(config("ckpt=somewhere"))
    assert cfg["out_dir"].startswith(f"{tmp_path}/samples/")  # under the (git-ignored) runs folder
    assert (cfg["task"], cfg["bars"], cfg["num_variations"], cfg["top_p"]) == ("infill", [0, 4], 1, 0.95)
    with pytest.raises(FileNotFoundError, match="somewhere: no such checkpoint folder or file"):
        sample(cfg)


@pytest.mark.parametrize(
    "name, error, message",
    [
        ("ValueError_Control168.mid", ValueError, "cannot read"),
        ("empty.mid", ValueError, "no notes"),
    ],
)
def test_real_invalid_files_rejected_before_load(midi_dir, ckpt, tmp_path, monkeypatch, name, error, message):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a bad input")

    monkeypatch.setattr(sample_module.MMM, "from_pretrained", no_load)
    with pytest.raises(error, match=message):
        sample(config(f"ckpt={ckpt}", f"input={midi_dir / 'invalid' / name}", "task=add_track", f"out_dir={tmp_path}"))


def test_render_writes_a_wav_per_output(ckpt, midi, tmp_path):
    import shutil

    if shutil.which("fluidsynth") is None:
        pytest.skip("fluidsynth is not installed (make audio-deps)")
    from mmm.render.audio import find_soundfont

    try:
        find_soundfont()
    except RuntimeError as err:
        pytest.skip(str(err))
    summary = sample(
        config(
            f"ckpt={ckpt}",
            f"input={midi}",
            "task=infill",
            "track=0",
            "bars=[1,3]",
            "render=true",
            f"out_dir={tmp_path}",
        )
    )
    wav = Path(summary["outputs"][0]["wav"])
    assert wav.read_bytes()[:4] == b"RIFF" and wav.stat().st_size > 10_000


def test_render_without_fluidsynth_fails_before_loading(ckpt, midi, tmp_path, monkeypatch):
    from mmm.render.audio import AudioDependencyError

    monkeypatch.setenv("PATH", str(tmp_path))  # no fluidsynth on PATH
    monkeypatch.setattr(sample_module.MMM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(AudioDependencyError, match="fluidsynth"):
        sample(
            config(
                f"ckpt={ckpt}",
                f"input={midi}",
                "task=infill",
                "track=0",
                "bars=[1,3]",
                "render=true",
                f"out_dir={tmp_path}",
            )
        )


@pytest.mark.parametrize("config", ["sample", "evaluate"])
def test_sampling_defaults_of_the_configs_are_the_libraries(config):
    """`configs/sampling/default.yaml` (used by `mmm.sample` and `mmm.evaluate`) says what
    `SamplingConfig` says: one set of defaults, whichever way a request comes in."""
    from dataclasses import asdict

    from mmm.generation.request import SamplingConfig

    cfg = compose_config(config, ["ckpt=x"])
    section = cfg if config == "sample" else cfg.sampling
    assert {k: section[k] for k in asdict(SamplingConfig())} == asdict(SamplingConfig())
