"""The HTTP API (`/v1/...`) and the studio page, as a FastAPI app around one loaded `MMM`.

`create_app(mmm, settings)` builds it; `python -m mmm.serve` loads a checkpoint and runs it
with uvicorn. Every request that reaches the model goes through `Jobs` (one worker, bounded
queue): the synchronous endpoints (`/v1/infill`, ...) submit a job and wait for it, `/v1/jobs`
returns its id at once. Requests are checked before they are queued, in a worker thread, so a
bad file or a bar out of range is answered at once with a 4xx and a reason, even when the
queue is full. Errors always have the shape ``{"error": {"status", "code", "message", "field"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from miditok.constants import MIDI_INSTRUMENTS
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from mmm.generation.api import MMM
from mmm.generation.request import Request as MusicRequest  # FastAPI's Request is the HTTP one
from mmm.generation.request import SamplingConfig
from mmm.serve.jobs import TERMINAL, Job, Jobs, QueueFull
from mmm.serve.music import (
    EXAMPLES,
    BadUpload,
    Measure,
    analyze,
    example_midi,
    json_keys_to_bars,
    measured_output,
    read_midi,
)
from mmm.serve.settings import Settings

log = logging.getLogger("mmm.serve")

STATIC = Path(__file__).parent / "static"
# Swagger UI for /docs, served from the package (FastAPI's default page loads it from a CDN):
# swagger-ui-dist's files, committed; docs/serve.rst says which version and how to update it.
SWAGGER = "/static/swagger"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def _error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message, "field": field}},
        status_code=status,
        headers=dict(headers or {}),
    )


# --- request fields ---------------------------------------------------------------------------------
SAMPLING_FIELDS = {
    "num_variations": "number of candidates (each generated alone with its own seed: seed, seed+1, ...)",
    "seed": "integer, or null for a random one (the answer says which seed made each candidate)",
    "temperature": f"sampling temperature, 0 = greedy (default {SamplingConfig.temperature})",
    "top_k": f"keep the k most likely tokens, or null (default {SamplingConfig.top_k})",
    "top_p": f"nucleus sampling mass in (0, 1], or null (default {SamplingConfig.top_p})",
}
TASK_FIELDS = {
    "infill": {
        "track": "track index (0-based, as in /v1/analyze), or a list of them",
        "bars": "[start, end] bars on the model's grid (end excluded), or a list of spans [[0,4],[8,12]]",
        "controls": 'bar-level controls for every generated bar, e.g. {"note_density": 6}, or {"<bar>": {...}}',
        "track_controls": 'track-level controls, e.g. {"polyphony_max": 1}',
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
REQUEST_FIELDS = sorted({name for fields in TASK_FIELDS.values() for name in fields})  # -> MusicRequest
REQUIRED = {"infill": ("track", "bars"), "add_track": ("program",), "generate": ("programs", "num_bars")}
STRING_FIELDS = {"time_signature"}  # accepted bare (4/4) as well as JSON ("4/4")


def _form_schema(task: str | None) -> dict:
    tasks = [task] if task else list(TASK_FIELDS)
    props: dict[str, Any] = {}
    if task is None:
        props["task"] = {"type": "string", "enum": list(TASK_FIELDS), "description": "what to do"}
    props["file"] = {
        "type": "string",
        "format": "binary",
        "description": "the MIDI file (infill, add_track; not for generate)",
    }
    for t in tasks:
        for name, text in {**TASK_FIELDS[t], **SAMPLING_FIELDS}.items():
            props.setdefault(name, {"type": "string", "description": f"JSON value: {text}"})
    required = ["task"] if task is None else list(REQUIRED[task]) + ([] if task == "generate" else ["file"])
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": props, "required": required}}
            },
        }
    }


@dataclass
class Prepared:
    """A checked request, ready for the worker."""

    task: str
    values: dict[str, Any]  # decoded fields (file excluded)
    request: MusicRequest  # checked; run once per variation with its seed
    score: Any  # symusic.Score, None for generate
    num_bars: int
    tracks: list[int]  # the tracks that get new notes (output indices)
    bars: list[int] | None  # the generated bars (None: all)
    bars_per_variation: int


# --- the app ----------------------------------------------------------------------------------------
class Server:
    """State shared by the endpoints: the model, the jobs, the settings."""

    def __init__(self, mmm: MMM, settings: Settings, card: Mapping[str, Any] | None = None) -> None:
        settings.check()
        self.mmm, self.settings = mmm, settings
        self.card = dict(card or {})
        self.measure = Measure(mmm)
        self.jobs = Jobs(settings.queue_size, settings.keep_jobs)

    # -- checks before queueing (run in a thread: tokenizing takes tens of ms) -------------------
    def prepare(self, task: str, fields: Mapping[str, str], upload: bytes | None, filename: str) -> Prepared:
        if task not in TASK_FIELDS:
            raise ApiError(422, "unknown_task", f"task {task!r}: expected one of {', '.join(TASK_FIELDS)}", "task")
        allowed = {**TASK_FIELDS[task], **SAMPLING_FIELDS}
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
                values[name] = json.loads(text)
            except json.JSONDecodeError:
                if name not in STRING_FIELDS:
                    raise ApiError(
                        422,
                        "bad_json",
                        f'{name}: {text!r} is not a JSON value (e.g. bars=[8,12], controls={{"note_density":6}})',
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
        for key in ("controls", "track_controls"):
            if key in values:
                values[key] = json_keys_to_bars(values[key])
        n = values.get("num_variations", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.settings.max_variations:
            raise ApiError(
                422,
                "invalid_field",
                f"num_variations={n!r}: expected an integer 1..{self.settings.max_variations}",
                "num_variations",
            )
        seed = values.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - 64):
            raise ApiError(422, "invalid_field", f"seed={seed!r}: expected a non-negative integer or null", "seed")
        request = MusicRequest(
            task,
            **{k: values[k] for k in REQUEST_FIELDS if k in values},
            sampling=SamplingConfig(
                values.get("temperature", SamplingConfig.temperature),
                values.get("top_k", SamplingConfig.top_k),
                values.get("top_p", SamplingConfig.top_p),
            ),
        )
        score = None
        if task == "generate":
            if upload is not None:
                raise ApiError(
                    422,
                    "unexpected_file",
                    "generate writes a piece from scratch: send no file (infill or add_track work on an uploaded one)",
                    "file",
                )
            num_bars = values["num_bars"]  # this server's limits; the request check does the rest
            if isinstance(num_bars, int) and not isinstance(num_bars, bool) and num_bars > self.settings.max_new_bars:
                raise ApiError(
                    422,
                    "invalid_field",
                    f"num_bars={num_bars!r}: expected an integer 1..{self.settings.max_new_bars}",
                    "num_bars",
                )
            tempo = values.get("tempo", 120.0)
            if isinstance(tempo, (int, float)) and not isinstance(tempo, bool) and tempo > 1000:
                raise ApiError(
                    422, "invalid_field", f"tempo={tempo!r}: expected quarter notes per minute in (0, 1000]", "tempo"
                )
        else:
            if upload is None:
                raise ApiError(400, "missing_file", f"{task} needs the MIDI file in the multipart field 'file'", "file")
            try:
                score = read_midi(upload, filename)
            except BadUpload as err:
                raise ApiError(400, "bad_midi", str(err), "file") from None
        plan, score, _ = self._check(lambda: self.mmm.check(request, score), "file")
        if task == "infill":
            tracks, bars = plan.tracks, sorted(b for a, e in plan.spans for b in range(a, e))
        else:
            tracks, bars = [len(score.tracks)] if task == "add_track" else list(range(len(plan.programs))), None
        return Prepared(task, values, request, score, plan.num_bars, tracks, bars, plan.generated_bars)

    @staticmethod
    def _check(fn, name: str):
        try:
            return fn()
        except (ValueError, TypeError) as err:
            raise ApiError(422, "invalid_field", str(err), getattr(err, "field", name)) from None

    # -- the work, in the worker thread --------------------------------------------------------------
    def run(self, prep: Prepared, job: Job) -> dict[str, Any]:
        v = prep.values
        n = v.get("num_variations", 1)
        base_seed = v.get("seed")
        if base_seed is None:
            base_seed = secrets.randbelow(2**31)
        variations, grid_warning = [], None
        on_step = job.progress_hook()
        for k in range(n):
            seed = base_seed + k
            generation = self.mmm.run(dataclasses.replace(prep.request, seed=seed), prep.score, on_step)
            out, report = generation.scores[0], generation.report
            grid_warning = report.bar_grid_warning  # MMM.run also logged it
            variations.append(
                {
                    "seed": seed,
                    "midi": base64.b64encode(out.dumps_midi()).decode("ascii"),
                    "regions": [list(r) for r in report.regions[0]],  # (track, start tick, end tick) rewritten
                    "controls": {
                        "requested": {"controls": v.get("controls"), "track_controls": v.get("track_controls")},
                        "measured": measured_output(self.measure, out, prep.num_bars, prep.tracks, prep.bars),
                    },
                    "timings": report.summary(),
                }
            )
        return {
            "task": prep.task,
            "num_bars": prep.num_bars,
            "bar_grid_warning": grid_warning,
            "request": prep.values,
            "variations": variations,
        }

    def submit(self, prep: Prepared) -> Job:
        job = Job(
            prep.task, lambda j: self.run(prep, j), prep.bars_per_variation * prep.values.get("num_variations", 1)
        )
        try:
            return self.jobs.submit(job)
        except QueueFull as err:
            raise ApiError(
                503,
                "queue_full",
                f"the server is busy ({self.settings.queue_size} requests queued); retry in {err.retry_after_s} s",
                headers={"Retry-After": str(err.retry_after_s)},
            ) from None

    # -- info ----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        mmm = self.mmm
        config = mmm.model.config
        tok = mmm.tokenizer

        def control(ctl) -> dict:
            values = list(ctl.values) if ctl.kind == "durations" else sorted(ctl.values)
            return {"kind": ctl.kind, "values": values, "at_least": ctl.at_least, "describe": ctl.describe()}

        programs = [
            {"program": p, "name": "Drums" if p < 0 else MIDI_INSTRUMENTS[p]["name"]} for p in tok.config.programs
        ]
        return {
            "model": {
                "parameters": sum(p.numel() for p in mmm.model.parameters()),
                "context": config.max_seq_len,
                "hidden_size": config.hidden_size,
                "layers": config.num_layers,
                "vocab_size": config.vocab_size,
                **self.card,
                "license": self.settings.license or self.card.get("license") or "unknown",
            },
            "tokenizer": {
                "vocab_size": len(tok),
                "bpe": tok.is_trained,
                "max_bar_tokens": mmm.max_bar_tokens,
                "time_signatures": sorted(
                    (t.split("_", 1)[1] for t in tok.vocab if t.startswith("TimeSig_")),
                    key=lambda s: tuple(int(x) for x in s.split("/"))[::-1],
                ),
                "pitch_range": list(tok.config.pitch_range),
            },
            "controls": {
                "bar": {k: control(c) for k, c in mmm.controls.bar.items()},
                "track": {k: control(c) for k, c in mmm.controls.track.items()},
            },
            "programs": programs,
            "tasks": {t: {**f, **SAMPLING_FIELDS} for t, f in TASK_FIELDS.items()},
            "limits": {
                "max_upload_bytes": self.settings.max_upload_bytes,
                "max_variations": self.settings.max_variations,
                "max_new_bars": self.settings.max_new_bars,
                "queue_size": self.settings.queue_size,
            },
            "examples": {name: text for name, (text, _) in EXAMPLES.items()},
            "auth": bool(self.settings.token),
        }


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, by its Content-Length or while
    it streams in (chunked uploads), before the form parser sees it."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send, size: str) -> None:
        response = _error_response(
            413,
            "too_large",
            f"the upload is {size}; the limit is {self.limit} bytes (max_upload_mb on the server)",
            "file",
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send, f"{int(length)} bytes")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyLimit.TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyLimit.TooLarge:
            if not started:
                await self._refuse(send, f"over {self.limit} bytes")


class CatchAll:
    """ASGI middleware: an unforeseen error (a bug) answers 500 in the API's JSON error shape and
    is logged once with its traceback; the server keeps serving. (Starlette's handler for
    `Exception` re-raises to uvicorn, which logs the traceback a second time and drops the
    connection.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started |= message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:
            log.exception("%s %s: unexpected error", scope["method"], scope["path"])
            if started:  # half an answer is out: only the server can end it (by closing the connection)
                raise
            response = _error_response(
                500,
                "internal_error",
                f"internal error: {type(err).__name__}: {err} (a bug: the server log has the details)",
            )
            await response(scope, receive, send)


def create_app(mmm: MMM, settings: Settings | None = None, card: Mapping[str, Any] | None = None) -> FastAPI:
    """The FastAPI app serving `mmm` (see the module docstring); `card`: extra model-card fields."""
    settings = settings or Settings()
    server = Server(mmm, settings, card)
    # Uploads stay in memory up to the limit (the parser would spool bigger parts to the
    # system's temp folder): the server writes nothing to disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes + 1)
    app = FastAPI(
        title="MMM studio API",
        version="1",
        description=__doc__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )  # /docs: below, offline
    app.state.server = server
    # Reading and checking uploads (tokenizing: tens of ms each) runs in threads, a few at a
    # time, so a burst of uploads cannot take every core from the model.
    checks = anyio.CapacityLimiter(4)
    app.router.add_event_handler("shutdown", server.jobs.close)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024)  # room for the form fields
    # Outside BodyLimit (whose own exception means 413, not a bug), inside CORS (a 500 keeps
    # the CORS headers, so a page on an allowed origin can read the error).
    app.add_middleware(CatchAll)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.status, err.code, err.message, err.field, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error_response(err.status_code, code, str(err.detail), None, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(422, "invalid_request", "; ".join(str(e.get("msg")) for e in err.errors()))

    def authorize(request: Request) -> None:
        if not settings.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "send the server's token as 'Authorization: Bearer <token>' (the studio asks for it)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def read_form(request: Request) -> tuple[dict[str, str], bytes | None, str]:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(
                415,
                "bad_content_type",
                "send the request as multipart/form-data: the MIDI in the field "
                "'file', the other fields as JSON values",
            )
        try:
            form = await request.form(max_part_size=settings.max_upload_bytes)
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
                        "'file' must be a file upload (multipart), not a text field "
                        "(no request may name a file on the server)",
                        "file",
                    )
                upload, filename = await value.read(), Path(value.filename or "upload").name
            elif isinstance(value, str):
                if key in fields:
                    raise ApiError(422, "duplicate_field", f"field {key!r} given twice", key)
                fields[key] = value
            else:
                raise ApiError(422, "unexpected_file", f"field {key!r}: only 'file' may be a file", key)
        return fields, upload, filename

    async def prepare(request: Request, task: str | None) -> Prepared:
        authorize(request)
        fields, upload, filename = await read_form(request)
        if task is None:
            task = fields.pop("task", None)
            if task is None:
                raise ApiError(
                    422, "missing_field", f"POST /v1/jobs needs the field task ({', '.join(TASK_FIELDS)})", "task"
                )
        return await anyio.to_thread.run_sync(server.prepare, task, fields, upload, filename, limiter=checks)

    def midi_response(result: dict) -> Response:
        first = result["variations"][0]
        return Response(
            base64.b64decode(first["midi"]),
            media_type="audio/midi",
            headers={
                "Content-Disposition": f'attachment; filename="mmm_{result["task"]}.mid"',
                "X-MMM-Seed": str(first["seed"]),
                **({"X-MMM-Bar-Grid-Warning": result["bar_grid_warning"]} if result["bar_grid_warning"] else {}),
            },
        )

    async def run_now(request: Request, task: str) -> Response:
        job = server.submit(await prepare(request, task))
        while not job.finished_event.is_set():
            if await request.is_disconnected():  # nobody waits for it any more
                server.jobs.cancel(job)
                return Response(status_code=499)
            await asyncio.sleep(0.05)
        if job.state == "failed":
            status = 500 if job.error_code == "internal_error" else 422
            raise ApiError(status, job.error_code or "failed", job.error or "failed")
        if job.state == "cancelled":
            raise ApiError(409, "cancelled", "the request was cancelled")
        if "audio/midi" in request.headers.get("accept", ""):
            return midi_response(job.result)
        return JSONResponse(job.result)

    def get_job(request: Request, job_id: str) -> Job:
        authorize(request)
        job = server.jobs.get(job_id)
        if job is None:
            raise ApiError(
                404,
                "unknown_job",
                f"no job {job_id!r} (finished jobs are kept for the last {settings.keep_jobs} requests)",
            )
        return job

    # -- routes ------------------------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks
    async def studio() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Open without a token, like the studio page and /openapi.json: the token guards the model
    # and the data, and "Try it out" on a protected endpoint answers 401 without one.
    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - docs",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )  # None: Swagger UI sends the spec to no validator site

    @app.get("/v1/health", summary="Liveness and queue state (no token needed)")
    async def health() -> dict:
        return {"status": "ok", "worker_alive": server.jobs.worker.is_alive(), **server.jobs.stats()}

    @app.get("/v1/info", summary="Model card, controls and their values, programs, limits")
    async def info(request: Request) -> dict:
        authorize(request)
        return server.info()

    @app.get(
        "/v1/examples/{name}",
        summary="A bundled example piece (MIDI)",
        responses={200: {"content": {"audio/midi": {}}}},
    )
    async def example(request: Request, name: str) -> Response:
        authorize(request)
        if name not in EXAMPLES:
            raise ApiError(404, "unknown_example", f"no example {name!r}; examples: {', '.join(EXAMPLES)}")
        return Response(
            example_midi(name),
            media_type="audio/midi",
            headers={"Content-Disposition": f'attachment; filename="{name}.mid"'},
        )

    @app.post(
        "/v1/analyze",
        summary="Tracks, notes, the model's bar grid and measured controls of a MIDI upload",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def analyze_upload(request: Request) -> dict:
        authorize(request)
        fields, upload, filename = await read_form(request)
        if fields:
            raise ApiError(
                422, "unknown_field", f"analyze takes only 'file', got {', '.join(sorted(fields))}", next(iter(fields))
            )
        if upload is None:
            raise ApiError(400, "missing_file", "analyze needs the MIDI file in the multipart field 'file'", "file")

        def work() -> dict:
            try:
                score = read_midi(upload, filename)
                return analyze(server.mmm, score, server.measure)
            except BadUpload as err:
                raise ApiError(400, "bad_midi", str(err), "file") from None
            except ValueError as err:  # e.g. no note the tokenizer can represent
                raise ApiError(422, "unusable_midi", f"{filename}: {err}", "file") from None

        return await anyio.to_thread.run_sync(work, limiter=checks)

    def task_endpoint(task: str):
        async def endpoint(request: Request) -> Response:
            return await run_now(request, task)

        return endpoint

    for task in TASK_FIELDS:
        app.add_api_route(
            f"/v1/{task}",
            task_endpoint(task),
            methods=["POST"],
            summary=f"{task}: wait for the result (JSON; with 'Accept: audio/midi' the first candidate's MIDI)",
            openapi_extra=_form_schema(task),
            name=task,
        )

    @app.post(
        "/v1/jobs",
        status_code=202,
        summary="Queue a request (field 'task'), answer its id at once",
        openapi_extra=_form_schema(None),
    )
    async def create_job(request: Request) -> JSONResponse:
        job = server.submit(await prepare(request, None))
        return JSONResponse(job.snapshot(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs/{job_id}", summary="State, progress in bars and, once done, the result")
    async def job_state(request: Request, job_id: str) -> dict:
        return get_job(request, job_id).snapshot()

    @app.delete("/v1/jobs/{job_id}", summary="Cancel: a queued job is dropped, a running one stops sampling")
    async def cancel_job(request: Request, job_id: str) -> dict:
        job = get_job(request, job_id)
        server.jobs.cancel(job)
        for _ in range(100):  # a running job stops within a token: wait briefly to report it
            if job.state in TERMINAL:
                break
            await asyncio.sleep(0.02)
        return job.snapshot(with_result=False)

    @app.get(
        "/v1/jobs/{job_id}/events",
        summary="Server-sent events: 'progress' while it runs, then 'end'",
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(request: Request, job_id: str) -> StreamingResponse:
        job = get_job(request, job_id)

        async def stream():
            last, idle = None, 0.0
            while True:
                snap = job.snapshot(with_result=False)
                key = (snap["state"], snap["progress"]["bars_done"])
                if job.state in TERMINAL:
                    yield f"event: end\ndata: {json.dumps(job.snapshot())}\n\n"
                    return
                if key != last:
                    last, idle = key, 0.0
                    yield f"event: progress\ndata: {json.dumps(snap)}\n\n"
                elif idle > 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.1)
                idle += 0.1

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1"):
    """Run `app` with uvicorn in a background thread on a free loopback port; yields its base URL
    (what the browser test and the load test talk to), and stops the server on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the server did not start within 5 s")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
