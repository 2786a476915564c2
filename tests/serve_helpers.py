"""Helpers of the serve tests (tests/test_serve*.py): an app in a TestClient, an app on a real
uvicorn server in a thread, and the check of the API's error shape."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mmm.serve.app import Settings, create_app


def make_client(model, **settings) -> TestClient:
    """A client of `create_app(model, Settings(**settings))`; enter it (`with`) to start the
    workers. It calls the server by a loopback name, as a local browser or curl does."""
    return TestClient(create_app(model, Settings(**settings)), base_url="http://127.0.0.1")


def error_of(response) -> dict:
    """The `error` of a response in the API's error shape (asserting the shape)."""
    body = response.json()
    assert set(body) == {"error"} and body["error"]["status"] == response.status_code, body
    assert body["error"]["message"], body
    return body["error"]


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1"):
    """Run `app` with uvicorn in a background thread on a free loopback port; yields its base URL
    (what the browser, load and fuzz tests talk to), and stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(6000):  # the lifespan starts the worker processes first
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        if not server.started:
            raise RuntimeError("the server did not start within 60 s")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
