"""The HTTP API (`/v1/...`) and the studio page, as a FastAPI app around one model.

`create_app(model, settings)` builds it; `python -m mmm.serve` loads a checkpoint and runs it
with uvicorn. The server process never parses an upload nor runs the model: worker processes
do (`mmm.serve.workers`), so a file that hangs or crashes the MIDI parser, or anything native
under a generation, costs one worker (ended at its deadline, or dead; replaced), never the
server. A request is checked in the server (the token, Host and Origin, the form's fields),
then its upload in a checking worker, so a bad file or a bar out of range is answered at once
with a 4xx and a reason, even when the queue is full; then it waits in a bounded queue for the
generation worker (`/v1/infill`, ... wait for it; `/v1/jobs` answers its id at once). Errors
always have the shape ``{"error": {"status", "code", "message", "field"}}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.formparsers import MultiPartParser

from mmm.serve.errors import CatchAll, add_error_handlers
from mmm.serve.guard import BodyLimit, HostOriginGuard
from mmm.serve.routes import add_routes
from mmm.serve.server import Server
from mmm.serve.settings import Settings

__all__ = ["Settings", "create_app"]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """The worker processes live as long as the app: started (the model loaded in each) before
    the first request, ended at shutdown."""
    server: Server = app.state.server
    await anyio.to_thread.run_sync(server.start)
    try:
        yield
    finally:
        await anyio.to_thread.run_sync(server.close)


def create_app(
    model: Any, settings: Settings | None = None, card: Mapping[str, Any] | None = None, checks_model: Any = None
) -> FastAPI:
    """The FastAPI app serving `model` (see the module docstring): an `MMM`, or a picklable function
    that returns one, which each worker process calls once (`functools.partial(MMM.from_pretrained,
    folder)`). `card`: extra model-card fields for /v1/info. `checks_model`: what the workers that
    read and check uploads load, when it should differ (e.g. on the CPU while `model` is on a GPU).
    The settings are checked here, before any worker starts."""
    settings = settings or Settings()
    server = Server(model, settings, card, checks_model)
    # Uploads stay in memory up to the limit (the parser would spool bigger parts to the
    # system's temp folder): the server writes nothing to disk.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes + 1)
    app = FastAPI(
        title="MMM studio API",
        version="1",
        description=__doc__,
        docs_url=None,  # /docs: served by the routes, offline
        redoc_url=None,  # it would load from a CDN
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.server = server
    add_error_handlers(app)
    add_routes(app, settings)
    # Middlewares, innermost first. CatchAll outside BodyLimit (whose own exception means 413,
    # not a bug), inside CORS (a 500 keeps the CORS headers, so a page on an allowed origin can
    # read the error); the guard outermost: a refused request reaches nothing.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024)  # room for the form fields
    app.add_middleware(CatchAll)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(HostOriginGuard, settings=settings)
    return app
