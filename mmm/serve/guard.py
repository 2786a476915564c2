"""ASGI middlewares that refuse a request before any endpoint sees it.

`HostOriginGuard`: a server on loopback is still reachable from any page the user's browser
opens. A page on another origin may send "simple" requests (a multipart form POST) without a
CORS preflight, so it could make the server compute; a DNS-rebinding page (a name of its own,
re-pointed at 127.0.0.1) could also read the answers. Requests whose `Host` is not a name this
server answers to are refused, and so are state-changing requests (anything but GET, HEAD,
OPTIONS) whose `Origin` is neither the server's own nor one of `cors_origins`. Clients that
are not browsers (curl, scripts) send no `Origin` and are not affected.

`BodyLimit`: a body over the limit is refused with 413 by its Content-Length, or while it
streams in, before the form parser reads it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from mmm.serve.errors import TrackedSend, error_response
from mmm.serve.settings import Settings

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[^:\[\]@/\s]+))(?::\d{1,5})?")


def host_name(host: str) -> str | None:
    """'Example.org:8765' -> 'example.org', '[::1]:8765' -> '::1'; None if it is no Host header value."""
    match = HOST.fullmatch(host.strip().lower())
    if match is None:
        return None
    return match["ip6"] or match["name"].rstrip(".")


class HostOriginGuard:
    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.hosts = settings.served_hosts()
        self.origins = {o.rstrip("/").lower() for o in settings.cors_origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            response = error_response(
                403,
                "host_not_allowed",
                f"Host {host!r} is not a name this server answers to ({', '.join(sorted(self.hosts))}); open the "
                "studio by one of them, or add the name to allowed_hosts on the server",
            )
            return await response(scope, receive, send)
        origin = headers.get("origin")
        if (
            scope["method"] not in SAFE_METHODS
            and origin is not None
            and urlsplit(origin).netloc.lower() != host.lower()
            and origin.rstrip("/").lower() not in self.origins
        ):
            response = error_response(
                403,
                "origin_not_allowed",
                f"{scope['method']} from a page at {origin!r} refused: only the studio's own pages and the origins "
                "in cors_origins may send requests that make the server work",
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send, size: str) -> None:
        response = error_response(
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
        tracked = TrackedSend(send)
        try:
            await self.app(scope, LimitedReceive(receive, self.limit), tracked)
        except TooLarge:
            if not tracked.started:
                await self._refuse(send, f"over {self.limit} bytes")


class TooLarge(Exception):
    pass


class LimitedReceive:
    """An ASGI `receive` that raises `TooLarge` once the body read so far exceeds `limit`."""

    def __init__(self, receive, limit: int) -> None:
        self.receive, self.limit, self.received = receive, limit, 0

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise TooLarge()
        return message
