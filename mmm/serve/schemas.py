"""The shapes of the API's answers, for its OpenAPI schema: what a client may rely on, and what
the fuzz test (tests/test_serve_fuzz.py) checks every answer against. The endpoints return
plain dicts; these models only describe them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="what went wrong, for programs: bad_midi, invalid_field, queue_full, timeout, ...")
    message: str = Field(description="what went wrong and what to do, for people")
    field: str | None = Field(description="the request field at fault, if one is")


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    worker_alive: bool
    queued: int
    queue_size: int
    running: str | None
    worker_restarts: int = Field(description="worker processes replaced since the start (hung, crashed)")


class Program(BaseModel):
    program: int
    name: str


class Control(BaseModel):
    kind: str
    values: list[Any]
    at_least: bool
    describe: str


class Sampling(BaseModel):
    temperature: float
    top_k: int | None
    top_p: float | None


class Decoding(BaseModel):
    pitch_range: bool | list[int]
    monophonic: bool | None


class Info(BaseModel):
    model: dict[str, Any]
    tokenizer: dict[str, Any]
    controls: dict[str, dict[str, Control]]
    programs: list[Program]
    tasks: dict[str, dict[str, str]]
    sampling: Sampling = Field(description="the defaults of temperature, top_k and top_p")
    decoding: Decoding = Field(description="the defaults of pitch_range and monophonic")
    limits: dict[str, float]
    examples: dict[str, str]
    auth: bool


class Variation(BaseModel):
    seed: int
    midi: str = Field(description="the MIDI file, base64")
    regions: list[list[int]] = Field(description="[track, start tick, end tick] of each region rewritten")
    controls: dict[str, Any] = Field(description="the controls requested, and those measured on the output")
    timings: dict[str, Any]


class Result(BaseModel):
    task: str
    num_bars: int
    bar_grid_warning: str | None
    request: dict[str, Any]
    variations: list[Variation]


class Progress(BaseModel):
    bars_done: int
    bars_total: int


class JobError(BaseModel):
    code: str | None
    message: str


class JobState(BaseModel):
    id: str
    task: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: Progress
    created: float
    started: float | None
    finished: float | None
    error: JobError | None = None
    result: Result | None = None


class Grid(BaseModel):
    starts: list[int]
    starts_s: list[float]
    time_signatures: list[list[int]]
    file_starts: list[int]
    file_time_signatures: list[list[int]]
    first_difference: int | None
    difference: str | None


class AnalysedTrack(BaseModel):
    index: int
    name: str
    program: int
    is_drum: bool
    num_notes: int
    notes: list[list[float]] = Field(description="[tick, duration ticks, pitch, velocity, start s, end s]")
    controls: dict[str, Any]


class Analysis(BaseModel):
    tpq: int
    num_bars: int
    duration_s: float
    grid: Grid
    tempos: list[list[float]]
    tracks: list[AnalysedTrack]
