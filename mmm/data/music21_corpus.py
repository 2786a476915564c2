"""The music21 corpus as multi-track MIDI: which works (`corpus_works`), and one score converted
to MIDI with a General MIDI program per part (`convert_to_midi`). `EmbeddedSource`
(`mmm.data.sources`) caches the converted files."""

import re
import statistics
from pathlib import Path
from typing import Any

import symusic

from mmm.files.atomic import atomic_write_bytes

EMBEDDED_CORPORA = ("bach", "all")
# Multi-part art music in music21's corpus. Folk-tune collections (essenFolksong,
# ryansMammoth, oneills1850, ...) are left out: they are single melodies.
_ALL_COMPOSERS = (
    "bach",
    "beach",
    "beethoven",
    "chopin",
    "ciconia",
    "corelli",
    "cpebach",
    "handel",
    "haydn",
    "johnson_j_r",
    "joplin",
    "josquin",
    "liliuokalani",
    "luca",
    "lusitano",
    "monteverdi",
    "mozart",
    "palestrina",
    "schoenberg",
    "schubert",
    "schumann_clara",
    "schumann_robert",
    "trecento",
    "verdi",
    "weber",
    "webern",
)
# Preference when one work is stored in several formats (a few Bach chorales are):
# MusicXML carries the most detail (part names, tempo), humdrum and ABC less.
_SCORE_EXTS = (".mxl", ".musicxml", ".xml", ".krn", ".abc")

# Vocal parts get string programs, one per voice range, instead of GM "Voice Oohs" (53,
# music21's default for every singer) or "Choir Aahs" (52): with the same program on all
# four tracks an MMM model could not tell from the instrument token which voice a track
# is, while violin/viola/cello/contrabass cover the S/A/T/B ranges and are how these
# chorales were doubled in performance (colla parte strings).
_VOICE_PROGRAMS = {
    "soprano": 40,
    "cantus": 40,
    "canto": 40,
    "superius": 40,
    "discantus": 40,
    "treble": 40,
    "alto": 41,
    "altus": 41,
    "contratenor": 41,
    "countertenor": 41,
    "tenor": 42,
    "tenore": 42,
    "baritone": 42,
    "bass": 43,
    "bassus": 43,
    "basso": 43,
}
# Voices whose name tells no range ("Quinto" in Monteverdi, "Quintus" in Renaissance
# prints): their program follows their register.
_REGISTER_VOICES = {"quinto", "quintus", "sexto", "sextus", "septimus", "vox", "voice", "voce", "coro", "choir"}


def _register_program(part: Any) -> int:
    pitches = [p.midi for n in part.recurse().notes for p in n.pitches]
    median = statistics.median(pitches) if pitches else 60
    for floor, program in ((66, 40), (59, 41), (50, 42)):
        if median >= floor:
            return program
    return 43


def _program_for_part(part: Any) -> int:
    """General MIDI program for a music21 part (never a drum kit)."""
    from music21 import instrument

    name = (part.partName or "").strip()
    words = re.findall(r"[a-z]+", name.lower())
    try:
        named = instrument.fromString(name) if name else None
    except instrument.InstrumentException:
        named = None
    # The part name wins over the encoded instrument: these files often carry placeholder
    # MIDI programs (Monteverdi singers as "Piano", every Haydn quartet part as "String
    # Ensemble 1") while names like "Violin I" or "Horn 2" are accurate.
    if (
        named is not None
        and not isinstance(named, (instrument.Vocalist, instrument.UnpitchedPercussion))
        and named.midiProgram is not None
    ):
        return named.midiProgram
    for w in words:
        if w in _VOICE_PROGRAMS:
            return _VOICE_PROGRAMS[w]
    if isinstance(named, instrument.Vocalist) or any(w in _REGISTER_VOICES for w in words):
        return _register_program(part)
    own = part.getInstrument(returnDefault=False)
    if own is not None and not isinstance(own, (instrument.Vocalist, instrument.UnpitchedPercussion)):
        if own.midiProgram is not None:
            return own.midiProgram
        if isinstance(own, instrument.KeyboardInstrument):
            return 0
    return _register_program(part)


def convert_to_midi(path: str | Path) -> bytes:
    """Convert one music21-readable score to multi-track MIDI bytes, one track per part.

    The score is converted as written (repeats are not written out). Raises
    ``ValueError`` when the result has fewer than two parts with notes.
    """
    from music21 import converter, instrument, midi, stream

    # forceSource: do not read or write music21's pickle cache in the temp folder.
    score = converter.parse(path, forceSource=True)
    if isinstance(score, stream.Opus):
        titles = {s.metadata.title if s.metadata else None for s in score.scores}
        if len(titles) != 1:
            raise ValueError(f"is a collection of {len(score.scores)} pieces, not one work")
        # ABC files such as Josquin's hold one tune per voice, all with the work's title.
        score = score.mergeScores()
    parts = []
    for part in score.parts:
        program = _program_for_part(part)
        # Measure-less parts make music21 convert the score as written: writing repeats
        # out (expandRepeats) takes minutes on a whole Beethoven quartet and fails on
        # malformed repeat marks, for no gain in training material.
        flat = part.flatten()
        for old in list(flat.getElementsByClass(instrument.Instrument)):
            flat.remove(old)
        new = instrument.Instrument()
        new.midiProgram = program
        new.partName = part.partName
        flat.insert(0, new)
        parts.append(flat)

    result = symusic.Score.from_midi(midi.translate.streamToMidiFile(stream.Score(parts)).writestr())
    # music21 writes extra note-less tracks (e.g. for a part's lyrics/voices): drop them.
    result.tracks = [t for t in result.tracks if len(t.notes) > 0]
    if len(result.tracks) < 2:
        raise ValueError(f"has {len(result.tracks)} part(s) with notes, need at least 2")
    for t in result.tracks:
        t.is_drum = False
    # A MIDI file without these meta events means 120 bpm in 4/4; write them explicitly
    # so every consumer sees the same thing.
    if len(result.tempos) == 0:
        result.tempos.append(symusic.Tempo(0, qpm=120.0))
    if len(result.time_signatures) == 0:
        result.time_signatures.append(symusic.TimeSignature(0, 4, 4))
    return result.dumps_midi()


def convert_job(job: tuple[str, str]) -> tuple[str, str | None]:
    """Worker: convert ``src`` into ``out``; a failure is recorded in ``out + '.failed'``."""
    src, out = job
    try:
        data = convert_to_midi(src)
    except Exception as e:  # music21 raises many types on odd scores; one bad work must not stop the rest
        reason = f"{type(e).__name__}: {e}"
        atomic_write_bytes(out + ".failed", reason.encode())
        return out, reason
    atomic_write_bytes(out, data)  # outside the try: a full disk stops the run, it never marks a work failed
    return out, None


def corpus_works(corpus: str) -> list[tuple[str, Path]]:
    """(cache name, score path) of the corpus' works, sorted by name, one per work."""
    from music21 import common

    root = common.getCorpusFilePath()
    composers = ("bach",) if corpus == "bach" else _ALL_COMPOSERS
    chosen: dict[str, Path] = {}
    for composer in composers:
        for p in (root / composer).rglob("*"):
            ext = p.suffix.lower()
            if ext not in _SCORE_EXTS or not p.is_file():
                continue
            name = p.relative_to(root).with_suffix(".mid").as_posix()
            if name not in chosen or _SCORE_EXTS.index(ext) < _SCORE_EXTS.index(chosen[name].suffix.lower()):
                chosen[name] = p
    return sorted(chosen.items())
