"""What the fuzzing of the HTTP API (tests/test_serve_fuzz.py, experiments/serve/fuzz.py) adds
to Schemathesis: real MIDI files for the uploads the schema declares as audio/midi, and infill
requests that reach the model (a random track and span rarely exist in the uploaded piece)."""

from __future__ import annotations

import dataclasses
import re

import schemathesis
from hypothesis import strategies as st
from schemathesis.transport.serialization import Binary

from mmm.serve.forms import form_schema
from mmm.serve.settings import Settings

INFILL = form_schema("infill", Settings())["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def _respan(body):
    """Half of the infill bodies whose track and bars are valid by the schema (so the case stays
    as valid, or as invalid, as it was) and whose file is MIDI: track 0, bar 0, which every file
    the fuzzing uploads has. (A form with per-part content types comes wrapped, its fields in
    `body.body`.)"""
    form = getattr(body, "body", body)
    if not isinstance(form, dict):
        return st.just(body)
    file, track, bars = form.get("file"), form.get("track"), form.get("bars")
    data = file.data if isinstance(file, Binary) else file
    valid_track = isinstance(track, int) and not isinstance(track, bool) and track >= 0
    valid_bars = isinstance(bars, str) and re.search(INFILL["bars"]["pattern"], bars) is not None
    if not (valid_track and valid_bars and isinstance(data, bytes) and data.startswith(b"MThd")):
        return st.just(body)
    spanned = {**form, "track": 0, "bars": "[0,1]"}
    if form is not body:
        spanned = dataclasses.replace(body, body=spanned)
    return st.sampled_from([body, spanned])


def before_generate_body(context, strategy):
    return strategy.flatmap(_respan) if context.operation.path == "/v1/infill" else strategy


def register(midi: list[bytes]) -> None:
    """For this process's Schemathesis runs (once per process)."""
    schemathesis.openapi.media_type("audio/midi", st.sampled_from(midi))
    schemathesis.hook(before_generate_body)
