"""Render MIDI to audio with the FluidSynth command-line synthesizer and a General MIDI soundfont.

    from mmm.render.audio import render_wav
    render_wav("song.mid", "song.wav")                 # or a symusic.Score

FluidSynth is a system program, not a Python package: on Debian/Ubuntu
``sudo apt-get install fluidsynth fluid-soundfont-gm`` (or ``make audio-deps``) installs it
and the FluidR3 GM soundfont. Without them :func:`render_wav` raises
:class:`AudioDependencyError` saying exactly that; nothing else in mmm needs them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from symusic import Score

from mmm.files.atomic import atomic_write

FLUIDSYNTH = "fluidsynth"
# Searched in this order when no soundfont is given (after $MMM_SOUNDFONT).
SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",  # Debian/Ubuntu fluid-soundfont-gm
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",  # Fedora, Arch
    "/usr/share/soundfonts/default.sf2",
)
SOUNDFONT_ENV = "MMM_SOUNDFONT"
INSTALL_HINT = (
    "install them with `sudo apt-get install fluidsynth fluid-soundfont-gm` (Debian/Ubuntu; "
    "`make audio-deps` runs it), or give another General MIDI soundfont with soundfont=... "
    f"or ${SOUNDFONT_ENV}"
)


class AudioDependencyError(RuntimeError):
    """FluidSynth or a General MIDI soundfont is missing; the message says how to install them."""


def find_fluidsynth() -> str:
    """Path of the ``fluidsynth`` program on ``$PATH``."""
    path = shutil.which(FLUIDSYNTH)
    if path is None:
        raise AudioDependencyError(
            f"audio rendering needs the `{FLUIDSYNTH}` program, not found on PATH: {INSTALL_HINT}"
        )
    return path


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    """The soundfont to use: `soundfont`, else ``$MMM_SOUNDFONT``, else the first of
    :data:`SOUNDFONT_CANDIDATES` that exists."""
    if soundfont is not None or os.environ.get(SOUNDFONT_ENV):
        path = Path(soundfont if soundfont is not None else os.environ[SOUNDFONT_ENV]).expanduser()
        if not path.is_file():
            where = "soundfont" if soundfont is not None else f"${SOUNDFONT_ENV}"
            raise AudioDependencyError(f"{where}={str(path)!r}: no such soundfont file; {INSTALL_HINT}")
        return path
    for candidate in SOUNDFONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise AudioDependencyError(
        f"no General MIDI soundfont found (looked for {', '.join(SOUNDFONT_CANDIDATES)}): {INSTALL_HINT}"
    )


def render_wav(
    score_or_midi_path: Score | str | Path,
    wav_path: str | Path,
    soundfont: str | Path | None = None,
    sample_rate: int = 44100,
) -> Path:
    """Render a `symusic.Score` or a MIDI file to a 16-bit stereo WAV file at `wav_path`.

    Runs ``fluidsynth -ni -F wav_path -r sample_rate soundfont midi``. The audio lasts as long
    as the music plus FluidSynth's release and reverb tail (about a second). The WAV is
    written to a temporary name and renamed, so a failed render never leaves a partial file.
    Raises :class:`AudioDependencyError` when FluidSynth or the soundfont is missing,
    `FileNotFoundError` for a missing MIDI file, `RuntimeError` when FluidSynth fails.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 8000 <= sample_rate <= 192000:
        raise ValueError(f"sample_rate must be an integer number of Hz in 8000..192000, got {sample_rate!r}")
    program = find_fluidsynth()
    font = find_soundfont(soundfont)
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmm-audio-") as tmp:
        if isinstance(score_or_midi_path, Score):
            midi = Path(tmp) / "input.mid"
            score_or_midi_path.dump_midi(str(midi))
        elif isinstance(score_or_midi_path, (str, Path)):
            midi = Path(score_or_midi_path)
            if not midi.is_file():
                raise FileNotFoundError(f"MIDI file not found: {midi}")
        else:
            raise TypeError(f"expected a symusic.Score or a MIDI path, got {type(score_or_midi_path).__name__}")

        def render(partial: Path) -> None:
            # -ni: no shell, no MIDI input; -F: render to the file as fast as possible (-T: as WAV,
            # whatever the temporary file's name).
            command = [
                program,
                "-ni",
                "-q",
                "-T",
                "wav",
                "-F",
                str(partial),
                "-r",
                str(sample_rate),
                str(font),
                str(midi),
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            if result.returncode != 0 or not partial.is_file() or partial.stat().st_size <= 44:
                raise RuntimeError(
                    f"fluidsynth failed to render {midi} (exit {result.returncode}): "
                    f"{(result.stderr or result.stdout).strip()[-2000:] or 'no output file'}"
                )

        atomic_write(wav_path, render)
    return wav_path
