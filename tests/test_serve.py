"""`python -m mmm.serve`: the HTTP API through FastAPI's TestClient (its worker processes real),
on a random-weight tiny model.

Proves: every endpoint answers (health, info, examples, analyze, infill, add_track, generate,
jobs, job events, cancel, /docs, HEAD /); /docs works offline (Swagger UI served by the
package, no URL to another host); with a token, the OpenAPI schema declares the bearer scheme
(so "Try it out" can send it); the studio takes its sampling and decoding defaults from
/v1/info; /v1/info shows the licence in the checkpoint's config.json; the decoding constraints
(pitch_range, monophonic) are form fields of every task and hold in the new notes; an
unforeseen error, in the server or in a worker process, is a JSON 500, logged with its
traceback, and the server keeps serving; an infill answer changes only the requested bars of the
requested track and each candidate is reproducible alone from its seed; `Accept: audio/midi`
returns a MIDI file; every bad request (non-MIDI, empty, truncated, note-less upload, bar out
of range, unknown track/control/field, bad JSON, too many variations, a file for generate, a
JSON body, a body over the limit, streamed or not) gets a JSON 4xx with the field at fault and
the server keeps serving; a full queue answers 503 with Retry-After; cancel stops a running
job inside its sampling loop (in the worker process) and drops a queued one; the token and
loopback rules; a foreign Host (DNS rebinding) is refused, and so is a state-changing request
from another origin (a cross-site form POST) unless cors_origins allows it; a 405 names every
method of the path; the schema declares each answer's content type; no CORS by default;
uploads never touch the disk; the model's bar grid is reported and a piece whose grid
differs from the file's gets a warning; the entry point refuses an exposed host without a
token before loading anything, reports a checkpoint its workers cannot load, and serves the
studio when started for real. Hangs and crashes of worker processes: tests/test_serve_isolation.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import REPO, synthetic_score  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serve_faults import BUG, Faulty  # noqa: E402
from serve_helpers import error_of, make_client  # noqa: E402
from symusic import Note, Score, Tempo, TimeSignature, Track  # noqa: E402

from mmm.generation.request import Request as MusicRequest  # noqa: E402
from mmm.generation.request import SamplingConfig  # noqa: E402
from mmm.generation.scores import bar_grid, count_bars  # noqa: E402
from mmm.model.pretrained import save_pretrained  # noqa: E402
from mmm.serve.app import Settings, create_app  # noqa: E402
from mmm.serve.jobs import Job  # noqa: E402

pytestmark = pytest.mark.subprocess  # every app here starts its worker processes


# --- fixtures (`serve_mmm`, the served model, is conftest's: the browser and load tests share it) ---
@pytest.fixture(scope="module")
def client(serve_mmm):
    with make_client(serve_mmm) as c:
        yield c


@pytest.fixture(scope="module")
def song() -> bytes:
    return synthetic_score(seed=0, num_bars=8).dumps_midi()


def notes_by_track(score: Score) -> list[Counter]:
    return [Counter((n.time, n.duration, n.pitch, n.velocity) for n in t.notes) for t in score.tracks]


# --- endpoints ----------------------------------------------------------------------------------
def test_health_info_docs(client, serve_mmm):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["worker_alive"] and health["queue_size"] == 8
    assert health["worker_restarts"] == 0
    info = client.get("/v1/info").json()
    assert info["model"]["parameters"] == sum(p.numel() for p in serve_mmm.model.parameters())
    assert info["model"]["context"] == 1024 and info["model"]["license"] == "unknown"
    assert "4/4" in info["tokenizer"]["time_signatures"] and info["tokenizer"]["max_bar_tokens"] == 24
    density = info["controls"]["bar"]["note_density"]
    assert density["kind"] == "int" and density["values"][0] == 0 and density["at_least"]
    assert "repetition" in info["controls"]["track"]
    assert {"program": -1, "name": "Drums"} in info["programs"] and len(info["programs"]) == 129
    assert info["limits"]["max_variations"] == 8 and set(info["tasks"]) == {"infill", "add_track", "generate"}
    assert info["sampling"] == dataclasses.asdict(SamplingConfig())  # the studio takes its defaults from here
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v1/health",
        "/v1/info",
        "/v1/analyze",
        "/v1/infill",
        "/v1/add_track",
        "/v1/generate",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
    } <= set(paths)
    form = paths["/v1/infill"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "track", "bars", "controls", "num_variations", "seed"} <= set(form["properties"])
    page = client.get("/")
    assert page.status_code == 200 and "studio.js" in page.text
    head = client.head("/")
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and head.content == b""
    assert "class Synth" in client.get("/static/synth.js").text


def test_the_studio_takes_its_sampling_defaults_from_the_server(client):
    assert client.get("/v1/info").json()["sampling"] == dataclasses.asdict(SamplingConfig())
    page = client.get("/").text + client.get("/static/studio.js").text
    assert "0.95" not in page and str(SamplingConfig.top_p) not in page  # no copy of SamplingConfig's default
    assert "studio.info.sampling" in page
    assert "studio.info.decoding" in page  # and those of the decoding constraints


def test_docs_need_no_network(client):
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "://" not in page.text  # nothing from a CDN (FastAPI's default page loads Swagger UI from one)
    assets = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    assert {a.rsplit(".", 1)[-1] for a in assets} == {"js", "css", "png"}, assets
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
        assert r.headers["content-type"].split(";")[0] == kinds["." + asset.rsplit(".", 1)[-1]], (asset, r.headers)
    assert "swagger-ui" in client.get(next(a for a in assets if a.endswith(".css"))).text
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN too


def test_an_unforeseen_error_is_a_json_500_and_the_server_goes_on(serve_mmm, song, monkeypatch, caplog):
    import mmm.serve.server

    with make_client(Faulty(serve_mmm), cors_origins=["http://daw.example"]) as c:
        # a bug in a worker process (its parser raises KeyError on this upload)
        with caplog.at_level("ERROR", logger="mmm.serve"):
            r = c.post("/v1/analyze", files={"file": ("bug.mid", BUG + song)}, headers={"Origin": "http://daw.example"})
        assert r.status_code == 500, r.text
        err = error_of(r)
        assert err["code"] == "internal_error" and "KeyError" in err["message"]
        assert r.headers["access-control-allow-origin"] == "http://daw.example"  # a page there can read the error
        logged = [rec for rec in caplog.records if rec.exc_text and "KeyError" in rec.exc_text]
        assert logged and "Traceback" in logged[0].exc_text  # the worker's traceback, in the server's log
        assert c.post("/v1/analyze", files={"file": ("song.mid", song)}).status_code == 200

        # a bug in the server process
        def broken(*args, **kwargs):
            raise KeyError("a bug")

        monkeypatch.setattr(mmm.serve.server, "decode_fields", broken)
        caplog.clear()
        with caplog.at_level("ERROR", logger="mmm.serve"):
            r = c.post("/v1/infill", files={"file": ("song.mid", song)}, data={"track": "0", "bars": "[0,1]"})
        assert r.status_code == 500 and error_of(r)["code"] == "internal_error" and "KeyError" in r.text
        logged = [rec for rec in caplog.records if rec.exc_info and "/v1/infill" in rec.getMessage()]
        assert logged and logged[0].exc_info[0] is KeyError  # with its traceback
        monkeypatch.undo()
        assert c.post("/v1/infill", files={"file": ("song.mid", song)}, data={"track": "0", "bars": "[0,1]"}).is_success
        assert c.get("/v1/health").json()["status"] == "ok"


def test_examples(client):
    for name in client.get("/v1/info").json()["examples"]:
        r = client.get(f"/v1/examples/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == "audio/midi"
        assert len(Score.from_midi(r.content).tracks) >= 2
    assert error_of(client.get("/v1/examples/..%2Fetc"))["code"] in ("unknown_example", "not_found")


def test_analyze(client, serve_mmm, song):
    a = client.post("/v1/analyze", files={"file": ("song.mid", song)}).json()
    score = Score.from_midi(song)
    assert a["num_bars"] == count_bars(score, serve_mmm.tokenizer) == 8
    grid = a["grid"]
    assert grid["starts"] == [b * 4 * score.tpq for b in range(9)] and grid["time_signatures"] == [[4, 4]] * 8
    assert grid["difference"] is None and grid["starts_s"][1] == pytest.approx(2.0)  # 120 qpm
    assert [t["num_notes"] for t in a["tracks"]] == [len(t.notes) for t in score.tracks]
    assert [len(t["notes"]) for t in a["tracks"]] == [len(t.notes) for t in score.tracks]
    bass = a["tracks"][1]
    assert bass["program"] == 33 and all(bar["note_density"] == 4 for bar in bass["controls"]["bars"])
    assert all(bar["polyphony_max"] == 1 for bar in bass["controls"]["bars"])
    assert a["tracks"][2]["is_drum"] and a["tracks"][2]["program"] == -1


def test_infill_changes_only_the_selection_and_seeds_reproduce(client, song):
    fields = {"track": "1", "bars": "[2,4]", "num_variations": "2", "seed": "3", "controls": '{"note_density": 4}'}
    r = client.post("/v1/infill", files={"file": ("song.mid", song)}, data=fields)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"] == "infill" and out["bar_grid_warning"] is None and out["num_bars"] == 8
    assert [v["seed"] for v in out["variations"]] == [3, 4]
    original = Score.from_midi(song)
    start, end = 2 * 4 * original.tpq, 4 * 4 * original.tpq
    for v in out["variations"]:
        assert v["regions"] == [[1, start, end]]
        assert v["controls"]["requested"]["controls"] == {"note_density": 4}
        assert set(v["controls"]["measured"]["1"]["bars"]) == {"2", "3"}
        result = Score.from_midi(base64.b64decode(v["midi"]))
        before, after = notes_by_track(original), notes_by_track(result)
        for t in range(len(original.tracks)):
            if t != 1:
                assert after[t] == before[t]
        outside = lambda c: Counter({k: n for k, n in c.items() if not start <= k[0] < end})  # noqa: E731
        assert outside(after[1]) == outside(before[1])
    # candidate 2 alone, from its seed, is the same music
    alone = client.post(
        "/v1/infill", files={"file": ("song.mid", song)}, data={**fields, "seed": "4", "num_variations": "1"}
    ).json()["variations"][0]
    assert notes_by_track(Score.from_midi(base64.b64decode(alone["midi"]))) == notes_by_track(
        Score.from_midi(base64.b64decode(out["variations"][1]["midi"]))
    )


def test_accept_midi_add_track_generate(client, song):
    r = client.post(
        "/v1/add_track",
        files={"file": ("song.mid", song)},
        data={"program": "33", "seed": "1"},
        headers={"Accept": "audio/midi"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "audio/midi" and r.headers["x-mmm-seed"] == "1"
    out = Score.from_midi(r.content)
    assert len(out.tracks) == len(Score.from_midi(song).tracks) + 1 and out.tracks[-1].program == 33
    r = client.post("/v1/generate", data={"programs": "[0, -1]", "num_bars": "3", "time_signature": "3/4", "seed": "0"})
    assert r.status_code == 200, r.text
    v = r.json()["variations"][0]
    score = Score.from_midi(base64.b64decode(v["midi"]))
    assert (score.time_signatures[0].numerator, score.time_signatures[0].denominator) == (3, 4)
    assert set(v["controls"]["measured"]) <= {"0", "1"}


def new_notes(v: dict, track: int, start: int = 0, end: int | None = None) -> list:
    """The notes of `track` in a candidate's MIDI that start in [start, end) ticks."""
    score = Score.from_midi(base64.b64decode(v["midi"]))
    return [n for n in score.tracks[track].notes if start <= n.time < (end if end is not None else 1 << 62)]


def test_decoding_constraints_reach_the_model(client, song):
    """pitch_range and monophonic, as each task's form fields: the new notes keep them."""
    info = client.get("/v1/info").json()
    assert info["decoding"] == {"pitch_range": MusicRequest.pitch_range, "monophonic": MusicRequest.monophonic}
    for task in ("infill", "add_track", "generate"):
        assert {"pitch_range", "monophonic"} <= set(info["tasks"][task])
    tpq = Score.from_midi(song).tpq
    start, end = 2 * 4 * tpq, 4 * 4 * tpq
    # track 0 plays chords over a wide range: held to 5 pitches, one note at a time
    fields = {"track": "0", "bars": "[2,4]", "seed": "0", "pitch_range": "[60,64]", "monophonic": "true"}
    r = client.post("/v1/infill", files={"file": ("song.mid", song)}, data=fields)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["request"]["pitch_range"] == [60, 64] and out["request"]["monophonic"] is True
    written = new_notes(out["variations"][0], 0, start, end)
    assert written and all(60 <= n.pitch <= 64 for n in written), written
    assert len({n.time for n in written}) == len(written)  # no two notes start together
    r = client.post(
        "/v1/add_track",
        files={"file": ("song.mid", song)},
        data={"program": "0", "seed": "0", "pitch_range": "[40,45]"},
    )
    assert r.status_code == 200, r.text
    written = new_notes(r.json()["variations"][0], len(Score.from_midi(song).tracks))
    assert written and all(40 <= n.pitch <= 45 for n in written), written
    r = client.post(
        "/v1/generate",
        data={"programs": "[0]", "num_bars": "2", "seed": "0", "pitch_range": "false", "monophonic": "null"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["request"]["pitch_range"] is False and r.json()["request"]["monophonic"] is None
    schema = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/infill", "/v1/add_track", "/v1/generate"):
        props = schema[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert props["monophonic"]["type"] == ["boolean", "null"]
        assert props["pitch_range"]["anyOf"][0]["type"] == "boolean"
        assert re.fullmatch(props["pitch_range"]["anyOf"][1]["pattern"], "[48, 72]")
        assert not re.fullmatch(props["pitch_range"]["anyOf"][1]["pattern"], "[48,128]")


@pytest.fixture(scope="module")
def bad_files(song) -> dict[str, bytes]:
    empty = Score(480)
    empty.tracks.append(Track("silent", 0))
    return {
        "text": b"this is not a MIDI file at all",
        "empty": b"",
        "truncated": song[: len(song) // 3],
        "no_notes": empty.dumps_midi(),
        "smpte": b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\xe7\x28" + b"MTrk\x00\x00\x00\x04\x00\xff\x2f\x00",
    }


@pytest.mark.parametrize("name", ["text", "empty", "truncated", "no_notes", "smpte"])
def test_bad_uploads_are_400(client, bad_files, name):
    for path, data in (("/v1/infill", {"track": "0", "bars": "[0,1]"}), ("/v1/analyze", {})):
        r = client.post(path, files={"file": (f"{name}.mid", bad_files[name])}, data=data)
        assert r.status_code == 400, (path, r.text)
        err = error_of(r)
        assert err["code"] == "bad_midi" and err["field"] == "file" and f"{name}.mid" in err["message"]
    assert client.get("/v1/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "path,data,status,field,words",
    [
        ("/v1/infill", {"track": "1", "bars": "[6,12]"}, 422, "bars", "out of range: the piece has 8 bars"),
        ("/v1/infill", {"track": "9", "bars": "[0,1]"}, 422, "track", "unknown track 9"),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "controls": '{"loudness": 3}'}, 422, "controls", "note_density"),
        (
            "/v1/infill",
            {"track": "1", "bars": "[0,1]", "controls": '{"note_density": 99}'},
            422,
            "controls",
            "invalid value",
        ),
        ("/v1/infill", {"track": "1", "bars": "[0,1"}, 422, "bars", "not a JSON value"),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "tempature": "1"}, 422, "tempature", "unknown field"),
        ("/v1/infill", {"track": "1"}, 422, "bars", "needs the field(s) bars"),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "num_variations": "50"}, 422, "num_variations", "1..8"),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "top_p": "2"}, 422, "top_p", "top_p"),
        ("/v1/add_track", {"program": "200"}, 422, "program", "General MIDI program"),
        (
            "/v1/generate",
            {"programs": "[0]", "num_bars": "4", "time_signature": "13/7"},
            422,
            "time_signature",
            "valid",
        ),
        ("/v1/generate", {"programs": "[0]", "num_bars": "1000"}, 422, "num_bars", "1..64"),
        ("/v1/jobs", {"task": "remix"}, 422, "task", "expected one of infill, add_track, generate"),
        ("/v1/jobs", {"track": "0"}, 422, "task", "needs the field task"),
        # found by the fuzz test (tests/test_serve_fuzz.py): each was a 500
        (
            "/v1/generate",
            {"programs": "[0]", "num_bars": "1", "temperature": "1e-60"},
            422,
            "temperature",
            "0 (greedy)",
        ),
        ("/v1/generate", {"programs": "[0]", "num_bars": "1", "temperature": "1e300"}, 422, "temperature", "0.01..100"),
        # found by the fuzz run (experiments/serve/fuzz.py): read as "no controls", answered 200
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "controls": "false"}, 422, "controls", "a JSON object"),
        ("/v1/generate", {"programs": "[0]", "num_bars": "1", "track_controls": "0"}, 422, "track_controls", "null"),
        (
            "/v1/generate",
            {"programs": "[0]", "num_bars": "1", "controls": '{"¹": {}}'},
            422,
            "controls",
            "¹",
        ),  # was a 500
        # JSON that Python reads but a request must not carry: each was a 500
        ("/v1/generate", {"programs": "[0]", "num_bars": "1", "temperature": "NaN"}, 422, "temperature", "not a JSON"),
        ("/v1/generate", {"programs": "[0]", "num_bars": "1" * 5000}, 422, "num_bars", "not a JSON value"),
        ("/v1/generate", {"programs": "[" * 100_000, "num_bars": "1"}, 422, "programs", "not a JSON value"),
        # the decoding constraints
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "pitch_range": "[64,60]"}, 422, "pitch_range", "low <= high"),
        ("/v1/add_track", {"program": "0", "pitch_range": "[0,200]"}, 422, "pitch_range", "<= 127"),
        (
            "/v1/add_track",
            {"program": "0", "pitch_range": "[0,5]"},
            422,
            "pitch_range",
            "tokenizer's pitches are 21..108",
        ),
        (
            "/v1/generate",
            {"programs": "[0]", "num_bars": "1", "pitch_range": '"wide"'},
            422,
            "pitch_range",
            "[low, high]",
        ),
        ("/v1/generate", {"programs": "[0]", "num_bars": "1", "pitch_range": "[60.5,70]"}, 422, "pitch_range", "60.5"),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "monophonic": "1"}, 422, "monophonic", "true, false or null"),
        (
            "/v1/jobs",
            {"task": "infill", "track": "1", "bars": "[0,1]", "monophonic": '"yes"'},
            422,
            "monophonic",
            "'yes'",
        ),
        ("/v1/infill", {"track": "1", "bars": "[0,1]", "monophonic": "yes"}, 422, "monophonic", "not a JSON value"),
    ],
)
def test_bad_requests_are_4xx_with_the_field(client, song, path, data, status, field, words):
    files = None if path == "/v1/generate" else {"file": ("song.mid", song)}
    r = client.post(path, files=files, data=data)
    assert r.status_code == status, r.text
    err = error_of(r)
    assert err["field"] == field and words in err["message"], err


def test_other_errors(client, song):
    r = client.post("/v1/generate", files={"file": ("song.mid", song)}, data={"programs": "[0]", "num_bars": "2"})
    assert r.status_code == 422 and error_of(r)["code"] == "unexpected_file"
    r = client.post("/v1/infill", data={"track": "0", "bars": "[0,1]"})
    assert r.status_code == 400 and error_of(r)["code"] == "missing_file"
    r = client.post("/v1/infill", data={"track": "0", "bars": "[0,1]", "file": "/etc/passwd"})
    assert r.status_code == 400 and "no request may name a file" in error_of(r)["message"]
    r = client.post("/v1/infill", json={"track": 0, "bars": [0, 1]})
    assert r.status_code == 415 and error_of(r)["code"] == "bad_content_type"
    assert error_of(client.get("/v1/jobs/nope"))["code"] == "unknown_job"
    assert client.delete("/v1/jobs/nope").status_code == 404
    assert error_of(client.get("/v2/whatever"))["code"] == "not_found"
    assert client.get("/v1/health").json()["status"] == "ok"


def test_a_wrong_method_is_405_naming_every_method_of_the_path(client):
    """Found by the fuzz test: Starlette named the methods of the first route on the path only."""
    for path, methods in (("/v1/jobs/x", "DELETE, GET"), ("/v1/infill", "POST"), ("/v1/jobs", "POST")):
        r = client.put(path)
        assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
        assert r.headers["allow"] == methods, (path, r.headers)


def test_the_schema_declares_what_each_answer_is(client):
    """Found by the fuzz test: errors of the routes that answer MIDI or events were declared as
    MIDI or events, not JSON."""
    paths = client.get("/openapi.json").json()["paths"]
    for path, method, ok in (
        ("/v1/examples/{name}", "get", "audio/midi"),
        ("/v1/jobs/{job_id}/events", "get", "text/event-stream"),
        ("/v1/infill", "post", "application/json"),
    ):
        responses = paths[path][method]["responses"]
        assert ok in responses["200"]["content"], (path, responses["200"])
        for status in ("404", "500") if method == "get" else ("400", "422", "500", "503", "504"):
            assert list(responses[status]["content"]) == ["application/json"], (path, status)
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


def test_real_broken_files_are_400(client, midi_dir):
    files = sorted((midi_dir / "invalid").iterdir())
    assert files
    for path in files:
        r = client.post("/v1/analyze", files={"file": (path.name, path.read_bytes())})
        assert r.status_code in (400, 422) and error_of(r)["field"] == "file", (path.name, r.text)
    assert client.get("/v1/health").json()["status"] == "ok"


def test_upload_limit_413(serve_mmm, song, tmp_path, monkeypatch):
    with make_client(serve_mmm, max_upload_mb=0.01) as c:  # 10 KiB (+64 KiB for the fields)
        big = b"MThd" + bytes(200_000)
        r = c.post("/v1/infill", files={"file": ("big.mid", big)}, data={"track": "0", "bars": "[0,1]"})
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"

        def chunks():  # no Content-Length: the limit applies while the body streams in
            for _ in range(50):
                yield bytes(10_000)

        r = c.post("/v1/analyze", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and error_of(r)["code"] == "too_large"
        assert c.post("/v1/analyze", files={"file": ("song.mid", song)}).status_code == 200


def test_uploads_never_touch_the_disk(serve_mmm, tmp_path, monkeypatch):
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    with make_client(serve_mmm, max_upload_mb=3) as c:  # bigger than the parser's 1 MiB spool
        monkeypatch.setattr(tempfile, "tempdir", str(spool))  # once the workers run (their fork server's socket)
        r = c.post("/v1/analyze", files={"file": ("big.mid", b"MThd" + bytes(2_000_000))})
        assert r.status_code == 400
    assert list(spool.iterdir()) == []


def test_queue_full_is_503_with_retry_after(serve_mmm, song):
    with make_client(serve_mmm, queue_size=1) as c:
        jobs = c.app.state.server.jobs
        release = threading.Event()
        blocker = jobs.submit(Job("block", lambda j: release.wait(30) and {}, 1))
        for _ in range(200):  # the worker takes it: the queue is empty again
            if blocker.state == "running":
                break
            time.sleep(0.01)
        queued = c.post(
            "/v1/jobs", files={"file": ("song.mid", song)}, data={"task": "infill", "track": "0", "bars": "[0,1]"}
        )
        assert queued.status_code == 202
        r = c.post("/v1/infill", files={"file": ("song.mid", song)}, data={"track": "0", "bars": "[0,1]"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and error_of(r)["code"] == "queue_full"
        bad = c.post("/v1/infill", files={"file": ("x.mid", b"nope")}, data={"track": "0", "bars": "[0,1]"})
        assert bad.status_code == 400  # bad requests are answered even when the queue is full
        release.set()
        job_id = queued.json()["id"]
        for _ in range(1000):
            if c.get(f"/v1/jobs/{job_id}").json()["state"] == "done":
                break
            time.sleep(0.02)
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "done"


def test_cancel_stops_a_running_job_and_drops_a_queued_one(serve_mmm, song):
    with make_client(serve_mmm, max_new_bars=64) as c:
        r = c.post(
            "/v1/jobs",
            data={"task": "generate", "programs": "[0, 0, 0, 0]", "num_bars": "64", "seed": "0", "num_variations": "4"},
        )
        assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        job_id = r.json()["id"]
        for _ in range(3000):
            state = c.get(f"/v1/jobs/{job_id}").json()
            if state["progress"]["bars_done"] > 0:
                break
            time.sleep(0.01)
        assert state["state"] == "running" and state["progress"]["bars_total"] == 4 * 64 * 4
        cancelled = c.delete(f"/v1/jobs/{job_id}").json()
        # "cancelled" is only set once the worker caught the exception raised in the sampling loop
        assert cancelled["state"] == "cancelled" and cancelled["progress"]["bars_done"] < 4 * 64 * 4
        jobs = c.app.state.server.jobs
        assert jobs.running is None
        done_bars = c.get(f"/v1/jobs/{job_id}").json()["progress"]["bars_done"]
        time.sleep(0.2)
        assert c.get(f"/v1/jobs/{job_id}").json()["progress"]["bars_done"] == done_bars  # it really stopped
        # a queued job is dropped: it never starts
        release = threading.Event()
        jobs.submit(Job("block", lambda j: release.wait(30) and {}, 1))
        queued = c.post(
            "/v1/jobs", files={"file": ("song.mid", song)}, data={"task": "infill", "track": "0", "bars": "[0,1]"}
        )
        gone = c.delete(f"/v1/jobs/{queued.json()['id']}").json()
        assert gone["state"] == "cancelled"
        release.set()
        r = c.post("/v1/infill", files={"file": ("song.mid", song)}, data={"track": "0", "bars": "[0,1]"})
        assert r.status_code == 200  # the worker is free again
        assert c.get(f"/v1/jobs/{queued.json()['id']}").json()["started"] is None


def test_events_stream_progress_then_end(client, song):
    job = client.post(
        "/v1/jobs",
        files={"file": ("song.mid", song)},
        data={"task": "infill", "track": "[0, 1]", "bars": "[[0,2],[4,6]]", "seed": "2"},
    ).json()
    assert job["progress"]["bars_total"] == 2 * 4
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "end":
                    break
    assert events[-1][0] == "end" and events[-1][1]["state"] == "done" and events[-1][1]["result"]["variations"]
    progress = [e["progress"]["bars_done"] for n, e in events if n == "progress"]
    assert progress == sorted(progress) and events[-1][1]["progress"]["bars_done"] == 8


def test_token_and_loopback_rules(serve_mmm):
    with make_client(serve_mmm, token="s3cret") as c:
        assert c.get("/v1/health").status_code == 200
        r = c.get("/v1/info")
        assert (
            r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and error_of(r)["code"] == "unauthorized"
        )
        assert c.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"] is True
        assert c.post("/v1/analyze", files={"file": ("x.mid", b"x")}).status_code == 401
    with pytest.raises(ValueError, match="token"):
        create_app(serve_mmm, Settings(host="0.0.0.0", allowed_hosts=["studio.lan"]))
    with pytest.raises(ValueError, match="allowed_hosts"):  # which names would it answer to?
        create_app(serve_mmm, Settings(host="0.0.0.0", token="t"))
    create_app(
        serve_mmm, Settings(host="0.0.0.0", allow_unauthenticated=True, allowed_hosts=["*"])
    ).state.server.close()
    create_app(serve_mmm, Settings(host="192.168.1.20", token="t")).state.server.close()


def test_with_a_token_the_schema_declares_the_bearer_scheme(serve_mmm, client):
    """So that "Try it out" in /docs can send the token (without it every call there got 401)."""
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})  # no token: none
    with make_client(serve_mmm, token="s3cret") as c:
        schema = c.get("/openapi.json").json()
        schemes = schema["components"]["securitySchemes"]
        assert [s | {"description": None} for s in schemes.values()] == [
            {"type": "http", "scheme": "bearer", "description": None}
        ]
        name = next(iter(schemes))
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                expected = [] if path == "/v1/health" else [{name: []}]
                assert operation.get("security", []) == expected, (method, path)
                assert ("401" in operation["responses"]) == (path != "/v1/health"), (method, path)
        assert c.get("/v1/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_foreign_host_is_refused(client, serve_mmm, song):
    """DNS rebinding: a page on attacker.example re-points its name at 127.0.0.1; the browser
    then sends `Host: attacker.example:8765` to this server, and could read the answers."""
    for host in ("attacker.example:8765", "attacker.example", "127.0.0.1.attacker.example", "", "localhost:80@evil"):
        for method, path, kwargs in (
            ("GET", "/v1/info", {}),
            ("GET", "/", {}),
            ("POST", "/v1/analyze", {"files": {"file": ("song.mid", song)}}),
        ):
            r = client.request(method, path, headers={"Host": host}, **kwargs)
            assert r.status_code == 403, (host, path, r.text)
            err = error_of(r)
            assert err["code"] == "host_not_allowed" and "allowed_hosts" in err["message"], err
    for host in ("127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765", "127.0.0.1"):
        assert client.get("/v1/info", headers={"Host": host}).status_code == 200, host
    with make_client(serve_mmm, allowed_hosts=["studio.lan"]) as c:  # names it is reached by, configured
        assert c.get("/v1/info", headers={"Host": "studio.lan:8765"}).status_code == 200
        assert c.get("/v1/info", headers={"Host": "other.lan:8765"}).status_code == 403
    with make_client(serve_mmm, allowed_hosts=["*"]) as c:
        assert c.get("/v1/info", headers={"Host": "anything.example"}).status_code == 200
    with pytest.raises(ValueError, match="allowed_hosts"):
        Settings(allowed_hosts=["http://studio.lan"]).check()


def test_a_cross_origin_form_post_is_refused(client, serve_mmm, song):
    """A page on another site may POST a multipart form here without a CORS preflight (a
    "simple" request): it must not make the server work."""
    jobs = client.app.state.server.jobs
    before = len(jobs.table)
    form = {"files": {"file": ("song.mid", song)}, "data": {"track": "0", "bars": "[0,1]"}}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost"):
        for path, data in (("/v1/infill", form["data"]), ("/v1/jobs", {"task": "infill", **form["data"]})):
            r = client.post(path, files=form["files"], data=data, headers={"Origin": origin})
            assert r.status_code == 403, (origin, r.text)
            assert error_of(r)["code"] == "origin_not_allowed" and "cors_origins" in error_of(r)["message"]
        assert client.delete("/v1/jobs/x", headers={"Origin": origin}).status_code == 403
    assert len(jobs.table) == before  # nothing was queued
    # the studio's own pages (same origin), and clients that send no Origin (curl), are served
    assert client.post("/v1/infill", headers={"Origin": "http://127.0.0.1"}, **form).status_code == 200
    assert client.post("/v1/infill", **form).status_code == 200
    # reading is not changing: a GET from another origin is answered (without CORS headers the page cannot read it)
    r = client.get("/v1/health", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_an_allowed_origin_may_post(serve_mmm, song):
    with make_client(serve_mmm, cors_origins=["http://daw.example"]) as c:
        preflight = c.options(
            "/v1/infill", headers={"Origin": "http://daw.example", "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://daw.example"
        r = c.post(
            "/v1/infill",
            files={"file": ("song.mid", song)},
            data={"track": "0", "bars": "[0,1]"},
            headers={"Origin": "http://daw.example"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://daw.example"
        r = c.post("/v1/analyze", files={"file": ("song.mid", song)}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403  # only that one


def test_no_cors_unless_configured(client, serve_mmm):
    headers = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.get("/v1/health", headers=headers).headers
    assert "access-control-allow-origin" not in client.options("/v1/infill", headers=headers).headers
    with make_client(serve_mmm, cors_origins=["http://daw.example"]) as c:
        r = c.get("/v1/health", headers={"Origin": "http://daw.example"})
        assert r.headers["access-control-allow-origin"] == "http://daw.example"


# --- bars as the musician counts them ------------------------------------------------------------
def _odd_meter_piece(num: int, den: int) -> Score:
    """One bar of num/den, then 4/4: a quarter note on every beat of every bar."""
    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    score.time_signatures.append(TimeSignature(0, num, den))
    first = num * 480 * 4 // den
    score.time_signatures.append(TimeSignature(first, 4, 4))
    track = Track("piano", 0)
    for t in range(0, first + 8 * 1920, 480 * 4 // den if den > 4 else 480):
        track.notes.append(Note(t, 200, 60 + (t // 480) % 12, 80))
    score.tracks.append(track)
    return score


def test_bar_grid_reports_a_grid_that_differs_from_the_file(client, serve_mmm, tokenizer, caplog):
    known = {t.split("_", 1)[1] for t in tokenizer.vocab if t.startswith("TimeSig_")}
    plain = bar_grid(synthetic_score(seed=0, num_bars=8), tokenizer)
    assert plain.first_difference is None and plain.difference() is None and plain.num_bars == 8
    twice = synthetic_score(seed=0, num_bars=8)  # two events at tick 0: the later one rules, as in miditok
    twice.time_signatures.append(TimeSignature(0, 2, 4))
    both = bar_grid(twice, tokenizer)
    assert both.file_time_signatures[0] == both.time_signatures[0] == (2, 4) and both.first_difference is None
    num, den = next((n, d) for n, d in ((11, 8), (13, 16), (7, 16), (15, 8)) if f"{n}/{d}" not in known)
    score = _odd_meter_piece(num, den)
    grid = serve_mmm.bar_grid(score)
    assert grid.file_time_signatures[0] == (num, den) and grid.file_starts[1] == num * 480 * 4 // den
    assert grid.first_difference is not None and f"{num}/{den}" in grid.difference()
    midi = score.dumps_midi()
    a = client.post("/v1/analyze", files={"file": ("odd.mid", midi)}).json()
    assert a["grid"]["first_difference"] == grid.first_difference and f"{num}/{den}" in a["grid"]["difference"]
    with caplog.at_level("WARNING", logger="mmm.generation.api"):
        r = client.post(
            "/v1/infill", files={"file": ("odd.mid", midi)}, data={"track": "0", "bars": "[1,2]", "seed": "0"}
        )
    assert r.status_code == 200 and f"{num}/{den}" in r.json()["bar_grid_warning"]
    assert any(
        rec.name == "mmm.generation.api" and f"{num}/{den}" in rec.getMessage() for rec in caplog.records
    )  # MMM.run's


# --- the entry point ---------------------------------------------------------------------------------
LICENCE = "CC-BY-4.0 (test)"


@pytest.fixture(scope="module")
def ckpt_folder(tmp_path_factory, serve_mmm):
    """A checkpoint folder whose config.json holds a licence, as training writes it."""
    folder = tmp_path_factory.mktemp("serve_ckpt") / "model"
    save_pretrained(serve_mmm.model, serve_mmm.tokenizer, folder, extra={"license": LICENCE})
    return folder


def test_info_shows_the_checkpoints_licence(ckpt_folder, serve_mmm):
    from mmm.serve.__main__ import model_card

    assert json.loads((ckpt_folder / "config.json").read_text())["license"] == LICENCE
    for settings, licence in ((Settings(), LICENCE), (Settings(license="MIT (overridden)"), "MIT (overridden)")):
        app = create_app(serve_mmm, settings, model_card(str(ckpt_folder)))
        with TestClient(app, base_url="http://127.0.0.1") as c:
            model = c.get("/v1/info").json()["model"]
        assert model["license"] == licence and model["checkpoint"] == "model"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmm.serve", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # starts python -m mmm.serve
def test_entry_point_refuses_bad_settings_before_loading(ckpt_folder):
    r = _run(f"ckpt={ckpt_folder}", "host=0.0.0.0")
    assert r.returncode == 2 and "token" in r.stderr and "MMM studio" not in r.stdout
    r = _run("ckpt=no/such/folder")
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
    r = _run(f"ckpt={ckpt_folder}", "+colour=blue")
    assert r.returncode == 2 and "unknown config key" in r.stderr


@pytest.mark.slow  # starts python -m mmm.serve
def test_entry_point_reports_a_checkpoint_its_workers_cannot_load(ckpt_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((ckpt_folder / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"not tensors")
    r = _run(f"ckpt={broken}", "port=0")
    assert r.returncode == 2 and "could not load the model" in r.stderr and "MMM studio" not in r.stdout, r.stderr


@pytest.mark.slow  # starts python -m mmm.serve
def test_entry_point_serves(ckpt_folder, tmp_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmm.serve", f"ckpt={ckpt_folder}", f"port={port}", "num_threads=1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
        assert "<title>MMM studio</title>" in httpx.get(url + "/").text
        model = httpx.get(f"{url}/v1/info").json()["model"]
        assert model["checkpoint"] == "model" and model["license"] == LICENCE  # its name, not its path
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    # uvicorn shuts down cleanly, then re-raises SIGTERM (exit status -15) or exits with 0
    assert proc.returncode in (0, -15) and "Application shutdown complete" in out, out
    assert list(tmp_path.iterdir()) == []  # the server wrote nothing where it ran
