"""mmm.render.audio: real FluidSynth renders (skipped without it) and the missing-dependency errors."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from symusic import Note, Score, Tempo, Track

from mmm.render.audio import SOUNDFONT_ENV, AudioDependencyError, find_soundfont, render_wav

TPQ = 480
TEMPO = 120.0
# FluidSynth renders the music, then the voices' release and ~2 s of silence before it stops.
MAX_TAIL_S = 4.0


def _have_fluidsynth() -> bool:
    if shutil.which("fluidsynth") is None:
        return False
    try:
        find_soundfont()
    except AudioDependencyError:
        return False
    return True


needs_fluidsynth = pytest.mark.skipif(
    not _have_fluidsynth(),
    reason="FluidSynth or a GM soundfont is missing: `sudo apt-get install fluidsynth fluid-soundfont-gm` "
    "(or `make audio-deps`) to run the audio rendering tests",
)


def two_track_score() -> Score:
    """Two bars at 120 qpm (4 s of music): a piano melody over a bass line."""
    score = Score(TPQ)
    score.tempos.append(Tempo(0, TEMPO))
    piano, bass = Track("piano", 0, False), Track("bass", 33, False)
    for i, pitch in enumerate([60, 62, 64, 65, 67, 65, 64, 62]):
        piano.notes.append(Note(i * TPQ, TPQ - 40, pitch, 90))
    for i, pitch in enumerate([36, 43]):
        bass.notes.append(Note(i * 4 * TPQ, 4 * TPQ - 40, pitch, 100))
    score.tracks.extend([piano, bass])
    return score


def read_wav(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path)) as w:
        params = w.getparams()
        frames = w.readframes(params.nframes)
    assert params.sampwidth == 2, "FluidSynth writes 16-bit PCM by default"
    return params, np.frombuffer(frames, dtype="<i2").reshape(-1, params.nchannels)


@needs_fluidsynth
@pytest.mark.parametrize("as_path", [False, True], ids=["score", "midi-path"])
def test_render_wav_is_a_real_recording(tmp_path: Path, as_path: bool) -> None:
    score = two_track_score()
    source: Score | Path = score
    if as_path:
        source = tmp_path / "in.mid"
        score.dump_midi(str(source))
    out = render_wav(source, tmp_path / "sub" / "out.wav", sample_rate=22050)
    assert out == tmp_path / "sub" / "out.wav"
    assert out.read_bytes()[:4] == b"RIFF" and out.read_bytes()[8:12] == b"WAVE"
    params, samples = read_wav(out)
    assert params.framerate == 22050 and params.nchannels == 2
    music_s = score.end() / TPQ * 60 / TEMPO
    duration = params.nframes / params.framerate
    assert music_s - 0.1 <= duration <= music_s + MAX_TAIL_S, (duration, music_s)
    music = samples[: int(music_s * params.framerate)].astype(np.float64) / 32768
    rms = float(np.sqrt(np.mean(music**2)))
    assert rms > 0.005, f"rendered audio is (almost) silent: RMS {rms:.5f}"
    assert not list(tmp_path.glob("sub/.*")), "no temporary file is left behind"


@needs_fluidsynth
def test_render_wav_default_rate_and_explicit_soundfont(tmp_path: Path) -> None:
    out = render_wav(two_track_score(), tmp_path / "out.wav", soundfont=find_soundfont())
    params, _ = read_wav(out)
    assert params.framerate == 44100


def test_missing_fluidsynth_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no fluidsynth on PATH
    with pytest.raises(AudioDependencyError) as err:
        render_wav(two_track_score(), tmp_path / "out.wav")
    message = str(err.value)
    assert "fluidsynth" in message and "sudo apt-get install fluidsynth fluid-soundfont-gm" in message
    assert "make audio-deps" in message
    assert not (tmp_path / "out.wav").exists()


def test_missing_soundfont_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AudioDependencyError, match="sudo apt-get install fluidsynth fluid-soundfont-gm"):
        find_soundfont(tmp_path / "nope.sf2")
    monkeypatch.setenv(SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
    with pytest.raises(AudioDependencyError, match=r"\$MMM_SOUNDFONT"):
        find_soundfont()
    monkeypatch.delenv(SOUNDFONT_ENV)
    monkeypatch.setattr("mmm.render.audio.SOUNDFONT_CANDIDATES", (str(tmp_path / "none.sf2"),))
    with pytest.raises(AudioDependencyError, match="no General MIDI soundfont found"):
        find_soundfont()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        render_wav(two_track_score(), tmp_path / "out.wav", sample_rate=100)
    if _have_fluidsynth():
        with pytest.raises(FileNotFoundError, match="MIDI file not found"):
            render_wav(tmp_path / "missing.mid", tmp_path / "out.wav")
        (tmp_path / "bad.mid").write_bytes(b"not a MIDI file")
        with pytest.raises(RuntimeError, match="fluidsynth failed"):
            render_wav(tmp_path / "bad.mid", tmp_path / "out.wav")
        assert not (tmp_path / "out.wav").exists()
