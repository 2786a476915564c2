"""The endpoints: plain functions of the HTTP request, registered by `add_routes`. What they share
(settings, workers, jobs) is the app's `Server`, `request.app.state.server`."""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from mmm.serve.errors import ApiError
from mmm.serve.forms import analyze_schema, form_schema
from mmm.serve.jobs import TERMINAL, Job
from mmm.serve.music import EXAMPLES, example_midi
from mmm.serve.schemas import Analysis, ErrorBody, Health, Info, JobState, Result
from mmm.serve.server import Server
from mmm.serve.settings import Settings

STATIC = pathlib.Path(__file__).parent / "static"
# Swagger UI for /docs, served from the package (FastAPI's default page loads it from a CDN):
# swagger-ui-dist's files, committed; docs/serve.rst says which version and how to update it.
SWAGGER = "/static/swagger"
# Declares the bearer scheme in the OpenAPI schema (so "Try it out" in /docs can send the
# token); `authorized` does the check itself, in the API's error shape.
BEARER = HTTPBearer(auto_error=False, description="the token the server was started with (token=...)")
ERRORS = {
    400: "the upload is not a MIDI file the model can read, or the form is malformed",
    401: "the token is missing or wrong",
    403: "refused: a Host the server does not answer to, or a page on another origin",
    404: "no such job or example",
    409: "the request was cancelled",
    413: "the body is over the server's max_upload_mb",
    415: "the body is not multipart/form-data",
    422: "a field is missing, unknown or invalid (the error names it)",
    500: "a bug, or the worker process died (a new one replaces it)",
    503: "the queue is full (see Retry-After), or the model is loading in a new worker",
    504: "reading the upload or the generation ran over the server's time limit",
}
UPLOAD_ERRORS = (400, 413, 415, 422, 503, 504)
# What a client (or a fuzzer) can do with the id POST /v1/jobs answers.
JOB_LINKS = {
    link: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
    for link, operation in (("state", "get_job"), ("cancel", "cancel_job"), ("events", "job_events"))
}


def server_of(request: Request) -> Server:
    return request.app.state.server


async def authorized(request: Request, _: Annotated[Any, Depends(BEARER)]) -> None:
    server_of(request).authorize(request.headers.get("authorization"))


# --- pages ----------------------------------------------------------------------------------------------
async def studio() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def docs(request: Request) -> HTMLResponse:
    """Open without a token, like the studio page and /openapi.json: the token guards the model and
    the data."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url,
        title=f"{request.app.title} - docs",
        swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # None: Swagger UI sends the spec to no validator site
    )


# --- the API --------------------------------------------------------------------------------------------
async def health(request: Request) -> JSONResponse:
    return JSONResponse(server_of(request).health())


async def info(request: Request) -> JSONResponse:
    return JSONResponse(server_of(request).info())


async def example(name: Annotated[str, Path(json_schema_extra={"enum": list(EXAMPLES)})]) -> Response:
    if name not in EXAMPLES:
        raise ApiError(404, "unknown_example", f"no example {name!r}; examples: {', '.join(EXAMPLES)}")
    headers = {"Content-Disposition": f'attachment; filename="{name}.mid"'}
    return Response(example_midi(name), media_type="audio/midi", headers=headers)


async def analyze(request: Request) -> JSONResponse:
    return JSONResponse(await server_of(request).analyze(request))


async def infill(request: Request) -> Response:
    return await run_now(request, "infill")


async def add_track(request: Request) -> Response:
    return await run_now(request, "add_track")


async def generate(request: Request) -> Response:
    return await run_now(request, "generate")


async def run_now(request: Request, task: str) -> Response:
    server = server_of(request)
    job = await server.checked(request, task)
    while not job.finished_event.is_set():
        if await request.is_disconnected():  # nobody waits for it any more
            server.jobs.cancel(job)
            return Response(status_code=499)
        await asyncio.sleep(0.05)
    if job.state == "failed":
        raise ApiError(job.error_status or 500, job.error_code or "failed", job.error or "failed")
    if job.state == "cancelled":
        raise ApiError(409, "cancelled", "the request was cancelled")
    if "audio/midi" in request.headers.get("accept", ""):
        return midi_response(job.result)
    return JSONResponse(job.result)


def midi_response(result: dict) -> Response:
    first = result["variations"][0]
    headers = {
        "Content-Disposition": f'attachment; filename="mmm_{result["task"]}.mid"',
        "X-MMM-Seed": str(first["seed"]),
    }
    if result["bar_grid_warning"]:
        headers["X-MMM-Bar-Grid-Warning"] = result["bar_grid_warning"]
    return Response(base64.b64decode(first["midi"]), media_type="audio/midi", headers=headers)


async def create_job(request: Request) -> JSONResponse:
    job = await server_of(request).checked(request, None)
    return JSONResponse(job.snapshot(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def job_of(request: Request, job_id: str) -> Job:
    server = server_of(request)
    job = server.jobs.get(job_id)
    if job is None:
        raise ApiError(
            404,
            "unknown_job",
            f"no job {job_id!r} (finished jobs are kept for the last {server.settings.keep_jobs} requests)",
        )
    return job


async def job_state(request: Request, job_id: str) -> JSONResponse:
    return JSONResponse(job_of(request, job_id).snapshot())


async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    job = job_of(request, job_id)
    server_of(request).jobs.cancel(job)
    for _ in range(100):  # a running job stops within a token: wait briefly to report it
        if job.state in TERMINAL:
            break
        await asyncio.sleep(0.02)
    return JSONResponse(job.snapshot(with_result=False))


async def job_events(request: Request, job_id: str) -> StreamingResponse:
    return StreamingResponse(
        events(job_of(request, job_id)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def events(job: Job) -> AsyncIterator[str]:
    """`progress` whenever the state or the bars written change, then `end` with the final state."""
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


# --- registration ---------------------------------------------------------------------------------------
def answers(
    model: Any, errors: tuple[int, ...], status: int = 200, media: str | None = None, links: dict | None = None
) -> dict:
    """The OpenAPI `responses` of a route: `model` (and/or a `media` type) at `status`, then the
    errors it may answer (any route may answer 403 and 500)."""
    ok: dict[str, Any] = {"model": model} if model else {}
    if media:
        ok["content"] = {media: {}}
    if links:
        ok["links"] = links
    errs = {code: {"model": ErrorBody, "description": ERRORS[code]} for code in sorted({*errors, 403, 500})}
    return {status: ok, **errs}


def add_routes(app: FastAPI, settings: Settings) -> None:
    # Only with a token does the schema declare the bearer scheme and 401.
    auth = {"dependencies": [Depends(authorized)]} if settings.token else {}
    token_errors = (401,) if settings.token else ()
    common = {"response_model": None, **auth}
    app.add_api_route("/", studio, methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/v1/health",
        health,
        operation_id="health",
        methods=["GET"],
        summary="Liveness and queue state (no token needed)",
        responses=answers(Health, ()),
        response_model=None,
    )
    app.add_api_route(
        "/v1/info",
        info,
        operation_id="info",
        methods=["GET"],
        summary="Model card, controls and their values, sampling defaults, programs, limits",
        responses=answers(Info, token_errors),
        **common,
    )
    app.add_api_route(
        "/v1/examples/{name}",
        example,
        operation_id="example",
        methods=["GET"],
        summary="A bundled example piece (MIDI)",
        responses=answers(None, (*token_errors, 404), media="audio/midi"),
        response_class=Response,  # no media type of its own: its errors stay documented as JSON
        **common,
    )
    app.add_api_route(
        "/v1/analyze",
        analyze,
        operation_id="analyze",
        methods=["POST"],
        summary="Tracks, notes, the model's bar grid and measured controls of a MIDI upload",
        responses=answers(Analysis, (*token_errors, *UPLOAD_ERRORS)),
        openapi_extra=analyze_schema(),
        **common,
    )
    for task, endpoint in (("infill", infill), ("add_track", add_track), ("generate", generate)):
        app.add_api_route(
            f"/v1/{task}",
            endpoint,
            methods=["POST"],
            summary=f"{task}: wait for the result (JSON; with 'Accept: audio/midi' the first candidate's MIDI)",
            responses=answers(Result, (*token_errors, 409, *UPLOAD_ERRORS), media="audio/midi"),
            openapi_extra=form_schema(task, settings),
            name=task,
            operation_id=task,
            **common,
        )
    app.add_api_route(
        "/v1/jobs",
        create_job,
        operation_id="create_job",
        methods=["POST"],
        status_code=202,
        summary="Queue a request (field 'task'), answer its id at once",
        responses=answers(JobState, (*token_errors, *UPLOAD_ERRORS), status=202, links=JOB_LINKS),
        openapi_extra=form_schema(None, settings),
        **common,
    )
    app.add_api_route(
        "/v1/jobs/{job_id}",
        job_state,
        operation_id="get_job",
        methods=["GET"],
        summary="State, progress in bars and, once done, the result",
        responses=answers(JobState, (*token_errors, 404)),
        **common,
    )
    app.add_api_route(
        "/v1/jobs/{job_id}",
        cancel_job,
        operation_id="cancel_job",
        methods=["DELETE"],
        summary="Cancel: a queued job is dropped, a running one stops sampling",
        responses=answers(JobState, (*token_errors, 404)),
        **common,
    )
    app.add_api_route(
        "/v1/jobs/{job_id}/events",
        job_events,
        operation_id="job_events",
        methods=["GET"],
        summary="Server-sent events: 'progress' while it runs, then 'end'",
        responses=answers(None, (*token_errors, 404), media="text/event-stream"),
        response_class=Response,
        **common,
    )
