"""What the server process decides alone, before any worker process is involved, so these run in
the fast tier: the Host and Origin guard, the form checks that need no model, and the OpenAPI
schema (the bearer scheme with a token, the decoding constraints' fields). The app runs without
its lifespan, so no worker starts; a request that passes the guard shows it by reaching the
form check (422) or /v1/health (answered by the server process itself). tests/test_serve.py
runs the same rules against served requests."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from fastapi.testclient import TestClient  # noqa: E402
from serve_helpers import error_of  # noqa: E402

from mmm.generation.request import Request as MusicRequest  # noqa: E402
from mmm.serve.app import Settings, create_app  # noqa: E402

# Passes the guard, then is refused by the server process's own form check (no worker needed).
NO_BARS = {"files": {"file": ("song.mid", b"MThd")}, "data": {"track": "0"}}


@pytest.fixture
def make():
    """`make(**settings)`: a client of an app whose workers never start; closed after the test."""
    apps = []

    def client(**settings) -> TestClient:
        apps.append(create_app(None, Settings(**settings)))
        return TestClient(apps[-1], base_url="http://127.0.0.1")

    yield client
    for app in apps:
        app.state.server.close()


def test_a_rebinding_host_is_refused(make):
    c = make()
    for host in ("attacker.example:8765", "127.0.0.1.attacker.example", "localhost:80@evil", ""):
        for method, path in (("GET", "/v1/health"), ("GET", "/"), ("POST", "/v1/infill")):
            r = c.request(method, path, headers={"Host": host})
            assert r.status_code == 403 and error_of(r)["code"] == "host_not_allowed", (host, path, r.text)
    for host in ("127.0.0.1:8765", "localhost", "[::1]:8765"):
        assert c.get("/v1/health", headers={"Host": host}).status_code == 200, host
    c = make(allowed_hosts=["studio.lan"])
    assert c.get("/v1/health", headers={"Host": "studio.lan:8765"}).status_code == 200
    assert c.get("/v1/health", headers={"Host": "other.lan"}).status_code == 403


def test_a_cross_origin_form_post_is_refused_unless_allowed(make):
    c = make(cors_origins=["http://daw.example"])
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999"):
        r = c.post("/v1/infill", headers={"Origin": origin}, **NO_BARS)
        assert r.status_code == 403 and error_of(r)["code"] == "origin_not_allowed", (origin, r.text)
    for origin in ("http://daw.example", "http://127.0.0.1", None):  # allowed, the studio's own, curl
        headers = {"Origin": origin} if origin else {}
        r = c.post("/v1/infill", headers=headers, **NO_BARS)
        assert r.status_code == 422 and error_of(r)["field"] == "bars", (origin, r.text)
    assert (
        c.post("/v1/infill", headers={"Origin": "http://daw.example"}, **NO_BARS).headers["access-control-allow-origin"]
        == "http://daw.example"
    )


def test_with_a_token_the_schema_declares_the_bearer_scheme(make):
    assert "securitySchemes" not in make().get("/openapi.json").json().get("components", {})
    schema = make(token="s3cret").get("/openapi.json").json()
    (name, scheme), *_ = schema["components"]["securitySchemes"].items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert schema["paths"]["/v1/infill"]["post"]["security"] == [{name: []}]
    assert "security" not in schema["paths"]["/v1/health"]["get"]


def test_the_decoding_constraints_are_form_fields(make):
    c = make()
    paths = c.get("/openapi.json").json()["paths"]
    for path in ("/v1/infill", "/v1/add_track", "/v1/generate"):
        props = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert props["monophonic"]["type"] == ["boolean", "null"]
        assert props["monophonic"]["examples"] == [MusicRequest.monophonic]
        boolean, pair = props["pitch_range"]["anyOf"]
        assert boolean == {"type": "boolean", "examples": [MusicRequest.pitch_range]}
        assert re.fullmatch(pair["pattern"], "[48, 72]") and not re.fullmatch(pair["pattern"], "[48,128]")
    r = c.post("/v1/infill", data={"track": "0", "bars": "[0,1]", "monophonic": "yes"}, files=NO_BARS["files"])
    assert r.status_code == 422 and error_of(r)["field"] == "monophonic" and "not a JSON value" in r.text
