"""The API's errors: one JSON shape, ``{"error": {"status", "code", "message", "field"}}``, for
every refusal, whether it is raised by an endpoint, a worker process, Starlette (404, 405) or a
middleware, and for a bug (500, logged with its traceback; the server keeps serving)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("mmm.serve")


class ApiError(Exception):
    """A request answered with an error: `status`, a `code` a program can test, a `message` a
    person can act on, and the request `field` at fault (None when it is not one field)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message, "field": self.field}

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ApiError:
        return cls(body["status"], body["code"], body["message"], body["field"])


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message, "field": field}},
        status_code=status,
        headers=dict(headers or {}),
    )


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.code, err.message, err.field, err.headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    headers = dict(getattr(err, "headers", None) or {})
    if err.status_code == 405:  # Starlette names the methods of the first route on the path only
        headers["Allow"] = ", ".join(sorted(allowed_methods(request)))
    return error_response(err.status_code, code, str(err.detail), None, headers)


def allowed_methods(request: Request) -> set[str]:
    """The methods of every route on the request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return methods


async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", "; ".join(str(e.get("msg")) for e in err.errors()))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class TrackedSend:
    """An ASGI `send` that remembers whether the response has started: once it has, an error
    can no longer be answered with a response of its own."""

    def __init__(self, send) -> None:
        self.send, self.started = send, False

    async def __call__(self, message) -> None:
        self.started |= message["type"] == "http.response.start"
        await self.send(message)


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
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            log.exception("%s %s: unexpected error", scope["method"], scope["path"])
            if tracked.started:  # half an answer is out: only the server can end it (by closing the connection)
                raise
            response = error_response(
                500,
                "internal_error",
                f"internal error: {type(err).__name__}: {err} (a bug: the server log has the details)",
            )
            await response(scope, receive, send)
