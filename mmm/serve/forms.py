"""The request forms: which fields each task takes, what they mean (shown in `/v1/info` and in the
OpenAPI schema), reading a multipart form, and the checks that need no model.

A request is ``multipart/form-data``: the MIDI in the field ``file``, every other field a JSON
value (``bars=[8,12]``, ``controls={"note_density":6}``, ``track=1``). The checks here run in the
server process on the decoded fields; everything that needs the upload or the model runs in a
worker process (`mmm.serve.work`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmm.generation.request import RANGE_MARGIN, SamplingConfig
from mmm.generation.request import Request as MusicRequest
from mmm.serve.errors import ApiError
from mmm.serve.settings import Settings

SAMPLING_FIELDS = {
    "num_variations": "number of candidates (each generated alone with its own seed: seed, seed+1, ...)",
    "seed": "integer, or null for a random one (the answer says which seed made each candidate)",
    "temperature": f"sampling temperature, 0 = greedy (default {SamplingConfig.temperature})",
    "top_k": f"keep the k most likely tokens, or null (default {SamplingConfig.top_k})",
    "top_p": f"nucleus sampling mass in (0, 1], or null (default {SamplingConfig.top_p})",
}
# What the grammar keeps of each generated track (`mmm.generation.request.character`); every task
# takes them. /v1/info gives their defaults, `Request`'s, which the studio starts from.
DECODING_FIELDS = {
    "pitch_range": f"true: keep the track's own pitch range, {RANGE_MARGIN} semitones wider (a new track: its "
    "instrument's); false: any pitch; or [low, high] MIDI pitches (default true)",
    "monophonic": "null: as the track is (one note at a time if it plays so in the piece; a new track: free); "
    "true: one note at a time; false: chords allowed (default null)",
}
DECODING_DEFAULTS = {name: getattr(MusicRequest, name) for name in DECODING_FIELDS}
TASK_FIELDS = {
    "infill": {
        "track": "track index (0-based, as in /v1/analyze), or a list of them",
        "bars": "[start, end] bars on the model's grid (end excluded), or a list of spans [[0,4],[8,12]]",
        "controls": 'bar-level controls for every generated bar, e.g. {"note_density": 6}, or {"<bar>": {...}}; '
        "a list with one per track",
        "track_controls": 'track-level controls, e.g. {"polyphony_max": 1}; a list with one per track',
        "bars_before": "context bars kept before the span when the prompt must shrink (null: as many as fit)",
        "bars_after": "context bars kept after the span (null: as many as fit)",
    },
    "add_track": {
        "program": "General MIDI program 0..127 of the new track, -1 = drums",
        "controls": "bar-level controls for every bar of the new track",
        "track_controls": "track-level controls of the new track",
    },
    "generate": {
        "programs": "one track per program, generated in order, e.g. [0, 33, -1]",
        "num_bars": "number of bars",
        "time_signature": '"4/4" (must be in the tokenizer\'s vocabulary, see /v1/info)',
        "tempo": "quarter notes per minute (default 120)",
        "controls": "bar-level controls (one mapping, or a list with one per program)",
        "track_controls": "track-level controls (one mapping, or a list with one per program)",
    },
}
REQUEST_FIELDS = sorted({name for fields in TASK_FIELDS.values() for name in fields} | set(DECODING_FIELDS))
REQUIRED = {"infill": ("track", "bars"), "add_track": ("program",), "generate": ("programs", "num_bars")}
STRING_FIELDS = {"time_signature"}  # accepted bare (4/4) as well as JSON ("4/4")
MAX_TEMPO = 1000.0
# Temperatures outside these are greedy (below) or uniform (above) sampling in effect, and make
# NaN probabilities: logits divided by them overflow float32, or the temperature itself does.
# 0 asks for greedy sampling.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_SEED = 2**63 - 65  # seed + variation index stays a valid torch seed


def fields_of(task: str) -> dict[str, str]:
    """The fields a `task` request takes besides the file, with what they mean."""
    return {**TASK_FIELDS[task], **DECODING_FIELDS, **SAMPLING_FIELDS}


# --- the OpenAPI description of the forms -------------------------------------------------------------
# JSON lists travel as JSON text in one part (a form would split a bare list into several parts);
# their patterns state the syntax, the server checks the values.
_W = r"[ \t\n\r]*"  # JSON's whitespace
_INT = f"{_W}(0|[1-9][0-9]*){_W}"
_PROGRAM = f"{_W}(-1|[0-9]|[1-9][0-9]|1[01][0-9]|12[0-7]){_W}"
_SPAN = rf"{_W}\[{_INT},{_INT}\]{_W}"
_PITCH = f"{_W}([0-9]|[1-9][0-9]|1[01][0-9]|12[0-7]){_W}"


def _list(item: str) -> str:
    return rf"{_W}\[{item}(,{item})*\]{_W}"


def _json_text(what: str, pattern: str, example: str) -> dict:
    return {
        "type": "string",
        "contentMediaType": "application/json",
        "pattern": f"^{pattern}$",
        "description": f"JSON {what}",
        "examples": [example],
    }


def _field_schema(name: str, task: str, settings: Settings) -> dict:
    """The JSON Schema of a field as it travels (a part's text), so that clients, /docs and
    fuzzers know what is valid; `examples` make a request that runs."""
    what = "program" if task == "generate" else "track"
    mapping = {"type": ["object", "null"], "description": "JSON object (null: none)", "examples": [{}]}
    controls = {"anyOf": [mapping, _json_text(f"list with one mapping per {what}", rf"{_W}\[.*\]{_W}", "[{}]")]}
    sampling = SamplingConfig()
    schemas = {
        "track": {
            "anyOf": [
                {"type": "integer", "minimum": 0, "examples": [0]},
                _json_text("list of track indices", _list(_INT), "[0]"),
            ]
        },
        "bars": _json_text("[start, end] or list of spans", f"({_SPAN}|{_list(_SPAN)})", "[0,1]"),
        "controls": controls,
        "track_controls": controls,
        "bars_before": {"type": ["integer", "null"], "minimum": 0},
        "bars_after": {"type": ["integer", "null"], "minimum": 0},
        "program": {"type": "integer", "minimum": -1, "maximum": 127, "examples": [33]},
        "programs": _json_text("list of programs", _list(_PROGRAM), "[0,33]"),
        "num_bars": {"type": "integer", "minimum": 1, "maximum": settings.max_new_bars, "examples": [1]},
        "time_signature": {
            "type": "string",
            "pattern": f'^([0-9]+/[0-9]+|{_W}"[0-9]+/[0-9]+"{_W})$',
            "examples": ["4/4"],
        },
        "tempo": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TEMPO, "examples": [120]},
        "num_variations": {"type": "integer", "minimum": 1, "maximum": settings.max_variations, "examples": [1]},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED, "examples": [0]},
        "temperature": {
            "type": "number",
            "anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE}],
            "examples": [sampling.temperature],
        },
        "top_k": {"type": ["integer", "null"], "minimum": 1, "examples": [sampling.top_k]},
        "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1, "examples": [sampling.top_p]},
        "pitch_range": {
            "anyOf": [
                {"type": "boolean", "examples": [DECODING_DEFAULTS["pitch_range"]]},
                _json_text("[low, high] MIDI pitches", rf"{_W}\[{_PITCH},{_PITCH}\]{_W}", "[48,72]"),
            ]
        },
        "monophonic": {"type": ["boolean", "null"], "examples": [DECODING_DEFAULTS["monophonic"]]},
    }
    text = fields_of(task)[name]
    return {**schemas[name], "description": f"{schemas[name].get('description', 'JSON value')}: {text}"}


def _form(task: str, settings: Settings) -> dict:
    props: dict[str, Any] = {}
    if task != "generate":
        props["file"] = {"type": "string", "format": "binary", "description": "the MIDI file"}
    props.update({name: _field_schema(name, task, settings) for name in fields_of(task)})
    required = [*REQUIRED[task], *([] if task == "generate" else ["file"])]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def form_schema(task: str | None, settings: Settings) -> dict:
    """`openapi_extra` of the endpoint of `task`; None: POST /v1/jobs, whose field `task` says
    which of the three forms it is."""
    if task is not None:
        form = _form(task, settings)
    else:
        form = {"oneOf": []}
        for name in TASK_FIELDS:
            variant = _form(name, settings)
            variant["properties"] = {"task": {"type": "string", "const": name}, **variant["properties"]}
            variant["required"].insert(0, "task")
            form["oneOf"].append(variant)
    content = {"schema": form, "encoding": {"file": {"contentType": "audio/midi, application/octet-stream"}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": content}}}


def analyze_schema() -> dict:
    form = {
        "type": "object",
        "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": "the MIDI file"}},
        "additionalProperties": False,
    }
    content = {"schema": form, "encoding": {"file": {"contentType": "audio/midi, application/octet-stream"}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": content}}}


# --- reading and checking a form ---------------------------------------------------------------------
async def read_form(request: Request, max_bytes: int) -> tuple[dict[str, str], bytes | None, str]:
    """The text fields, the upload (None without one) and its file name (never a path)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(
            415,
            "bad_content_type",
            "send the request as multipart/form-data: the MIDI in the field 'file', the other fields as JSON values",
        )
    try:
        form = await request.form(max_part_size=max_bytes)
    except StarletteHTTPException as err:  # a malformed multipart body
        raise ApiError(400, "bad_form", f"cannot read the form: {err.detail}") from None
    fields: dict[str, str] = {}
    upload, filename = None, "upload"
    for key, value in form.multi_items():
        if key == "file":
            if isinstance(value, str):
                raise ApiError(
                    400,
                    "missing_file",
                    "'file' must be a file upload (multipart), not a text field (no request may name a file on the "
                    "server)",
                    "file",
                )
            if upload is not None:
                raise ApiError(422, "duplicate_field", "field 'file' given twice: send one MIDI file", "file")
            upload, filename = await value.read(), Path(value.filename or "upload").name or "upload"
        elif isinstance(value, str):
            if key in fields:
                raise ApiError(422, "duplicate_field", f"field {key!r} given twice", key)
            fields[key] = value
        else:
            raise ApiError(422, "unexpected_file", f"field {key!r}: only 'file' may be a file", key)
    return fields, upload, filename


def _finite(text: str) -> Any:
    raise ValueError(f"{text} is not a number JSON allows")


def decode_fields(task: str, fields: dict[str, str], upload: bytes | None, settings: Settings) -> dict[str, Any]:
    """The fields of a `task` request as JSON values, with the checks that need neither the upload
    nor the model (unknown, missing, malformed fields; this server's limits)."""
    if task not in TASK_FIELDS:
        raise ApiError(422, "unknown_task", f"task {task!r}: expected one of {', '.join(TASK_FIELDS)}", "task")
    allowed = fields_of(task)
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ApiError(
            422,
            "unknown_field",
            f"unknown field(s) {', '.join(unknown)} for {task}; valid fields: file, {', '.join(allowed)}",
            unknown[0],
        )
    values: dict[str, Any] = {}
    for name, text in fields.items():
        try:
            values[name] = json.loads(text, parse_constant=_finite)
        except (ValueError, RecursionError):  # also: NaN, ints over Python's digit limit, deep nesting
            if name not in STRING_FIELDS:
                raise ApiError(
                    422,
                    "bad_json",
                    f'{name}: {text[:80]!r} is not a JSON value (e.g. bars=[8,12], controls={{"note_density":6}})',
                    name,
                ) from None
            values[name] = text
    missing = [k for k in REQUIRED[task] if k not in values]
    if missing:
        raise ApiError(
            422,
            "missing_field",
            f"{task} needs the field(s) {', '.join(missing)}: " + "; ".join(f"{k}: {allowed[k]}" for k in missing),
            missing[0],
        )
    for name in ("controls", "track_controls"):  # the model reads anything else as no controls
        if not isinstance(values.get(name), (dict, list, type(None))):
            raise ApiError(
                422,
                "invalid_field",
                f'{name}={values[name]!r}: expected a JSON object such as {{"note_density": 6}}, a list with one '
                "per track (per program for generate), or null",
                name,
            )
    _check_int("num_variations", values.get("num_variations", 1), 1, settings.max_variations)
    if values.get("seed") is not None:
        _check_int("seed", values["seed"], 0, MAX_SEED, "or null")
    temperature = values.get("temperature")
    if _is_number(temperature) and temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ApiError(
            422,
            "invalid_field",
            f"temperature={temperature!r}: expected 0 (greedy) or {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}",
            "temperature",
        )
    if task == "generate":
        if upload is not None:
            raise ApiError(
                422,
                "unexpected_file",
                "generate writes a piece from scratch: send no file (infill or add_track work on an uploaded one)",
                "file",
            )
        num_bars = values["num_bars"]  # this server's limit; the request check does the rest
        if _is_number(num_bars) and num_bars > settings.max_new_bars:
            _check_int("num_bars", num_bars, 1, settings.max_new_bars)
        tempo = values.get("tempo", 120.0)
        if _is_number(tempo) and not 0 < tempo <= MAX_TEMPO:
            raise ApiError(
                422,
                "invalid_field",
                f"tempo={tempo!r}: expected quarter notes per minute in (0, {MAX_TEMPO:g}]",
                "tempo",
            )
    elif upload is None:
        raise ApiError(400, "missing_file", f"{task} needs the MIDI file in the multipart field 'file'", "file")
    return values


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: Any, low: int, high: int, alternative: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(
            422, "invalid_field", f"{name}={value!r}: expected an integer {low}..{high} {alternative}".strip(), name
        )
