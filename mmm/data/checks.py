"""Checks that turn broken or unsuitable music into a `Rejected(reason)` before tokenization.

Used by preprocessing (the file is skipped and reported) and by sampling (the request is
refused with the same reason). Limits come from `data.preprocess` in the config.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from symusic import Score


class Rejected(Exception):
    """Music that cannot be used (preprocessing skips the file, a request is refused); `reason`
    is a short key for the report."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# What a generation request's music may hold (api, server); preprocessing passes data.preprocess.
REQUEST_LIMITS = {
    "max_notes": 200_000,
    "max_tracks": 64,
    "max_bars": 5000,
    "tempo_limits": (5.0, 1000.0),
    "allow_drums_only": False,
}


def check_midi_header(data: bytes) -> None:
    """Reject what symusic would misread or choke on, from the 14-byte MIDI header."""
    if len(data) < 14:
        raise Rejected("not_midi", f"{len(data)} bytes: too short for a MIDI header")
    if data[:4] == b"RIFF" and data[8:12] == b"RMID":
        return  # RIFF-wrapped MIDI; symusic reads it
    if data[:4] != b"MThd":
        raise Rejected("not_midi", f"starts with {data[:4]!r}, not the MIDI header 'MThd'")
    fmt, _, division = struct.unpack(">HHh", data[8:14])
    if fmt == 2:
        raise Rejected("midi_type_2", "type-2 MIDI (independent sequences) is not supported")
    if fmt > 2:
        raise Rejected("not_midi", f"unknown MIDI format {fmt}")
    if division == 0:
        raise Rejected("bad_ticks_per_quarter", "0 ticks per quarter note")
    if division < 0:
        raise Rejected("bad_ticks_per_quarter", "SMPTE (negative) time division is not supported")


def check_score(score: Score, limits: Mapping[str, Any] | None = None) -> None:
    """Reject scores without usable notes or with absurd timing, before tokenizing them."""
    lim = {**REQUEST_LIMITS, **(limits or {})}
    if score.tpq <= 0:
        raise Rejected("bad_ticks_per_quarter", f"{score.tpq} ticks per quarter note")
    with_notes = [t for t in score.tracks if len(t.notes) > 0]
    if not with_notes:
        raise Rejected("no_notes", "only meta events" if len(score.tracks) or len(score.tempos) else "")
    if all(t.is_drum for t in with_notes) and not lim["allow_drums_only"]:
        raise Rejected("drums_only", "no pitched track (set data.preprocess.allow_drums_only=true to keep such files)")
    num_notes = sum(len(t.notes) for t in with_notes)
    if num_notes > lim["max_notes"]:
        raise Rejected("too_many_notes", f"{num_notes} notes > max_notes={lim['max_notes']}")
    if len(with_notes) > lim["max_tracks"]:
        raise Rejected("too_many_tracks", f"{len(with_notes)} tracks > max_tracks={lim['max_tracks']}")
    low, high = lim["tempo_limits"]
    for tempo in score.tempos:
        if not low <= tempo.qpm <= high:
            raise Rejected("absurd_tempo", f"{tempo.qpm:.3g} qpm at tick {tempo.time}, outside [{low}, {high}]")
    for ts in score.time_signatures:
        if not 1 <= ts.numerator <= 64 or ts.denominator not in (1, 2, 4, 8, 16, 32, 64):
            raise Rejected("absurd_time_signature", f"{ts.numerator}/{ts.denominator} at tick {ts.time}")
    # Tempos and time signatures are tokenized too: one far after the last note (a corrupt delta
    # time) would make the tokenizer write bars up to it.
    events = [e.time for e in score.tempos] + [e.time for e in score.time_signatures]
    quarters = max([t.end() for t in with_notes] + events) / score.tpq
    if quarters > 4 * lim["max_bars"]:
        raise Rejected(
            "too_long",
            f"{quarters:.0f} quarter notes (notes, tempos and time signatures) > 4 x max_bars={lim['max_bars']}",
        )
