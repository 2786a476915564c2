"""The server survives what crashes or hangs native code: uploads are parsed and generations run in
worker processes. Faults are injected from the tests (`serve_faults.Faulty`, loaded by the
workers in place of the plain model): a MIDI parser that hangs inside C code with every signal
blocked, one that segfaults, a generation that does either, and a worker killed from outside
while idle. Each time the request at fault gets a JSON error (504 `timeout` at the deadline,
500 `worker_crashed` naming the signal), the worker is replaced, and the next request is
served."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import synthetic_score  # noqa: E402
from serve_faults import HANG, HANG_SEED, SEGV, SEGV_SEED, Faulty  # noqa: E402
from serve_helpers import error_of, make_client  # noqa: E402

pytestmark = pytest.mark.subprocess

INFILL = {"track": "1", "bars": "[0,1]", "seed": "0"}


@pytest.fixture(scope="module")
def song() -> bytes:
    return synthetic_score(seed=0, num_bars=4).dumps_midi()


def served(c, song: bytes) -> None:
    """The server answers the next requests normally."""
    assert c.post("/v1/analyze", files={"file": ("song.mid", song)}).status_code == 200
    r = c.post("/v1/infill", files={"file": ("song.mid", song)}, data=INFILL)
    assert r.status_code == 200, r.text
    health = c.get("/v1/health").json()
    assert health["status"] == "ok" and health["worker_alive"]


@pytest.mark.slow  # waits for its deadlines
def test_a_parser_hung_in_c_code_is_ended_at_the_deadline(serve_mmm, song):
    with make_client(Faulty(serve_mmm), check_timeout_s=3, check_workers=1) as c:
        r = c.post("/v1/analyze", files={"file": ("hang.mid", HANG + song)})
        assert r.status_code == 504, r.text
        err = error_of(r)
        assert err["code"] == "timeout" and err["field"] == "file" and "hang.mid" in err["message"]
        assert "3 s" in err["message"] and "parser" in err["message"]
        served(c, song)
        r = c.post("/v1/infill", files={"file": ("hang.mid", HANG + song)}, data=INFILL)  # the same before a job
        assert r.status_code == 504 and error_of(r)["code"] == "timeout"
        served(c, song)
        assert c.get("/v1/health").json()["worker_restarts"] == 2


def test_a_parser_that_segfaults_costs_its_worker_only(serve_mmm, song):
    with make_client(Faulty(serve_mmm), check_workers=1) as c:
        for path, data in (("/v1/analyze", {}), ("/v1/jobs", {"task": "infill", **INFILL})):
            r = c.post(path, files={"file": ("segv.mid", SEGV + song)}, data=data)
            assert r.status_code == 500, r.text
            err = error_of(r)
            assert err["code"] == "worker_crashed" and err["field"] == "file"
            assert "SIGSEGV" in err["message"] and "segv.mid" in err["message"] and "server goes on" in err["message"]
            served(c, song)
        assert c.get("/v1/health").json()["worker_restarts"] == 2


@pytest.mark.slow  # waits for its deadline
def test_a_hung_or_crashed_generation_fails_its_job_and_the_next_one_runs(serve_mmm, song):
    with make_client(Faulty(serve_mmm, parse=False, generate=True), job_timeout_s=5) as c:
        r = c.post("/v1/infill", files={"file": ("song.mid", song)}, data={**INFILL, "seed": str(HANG_SEED)})
        assert r.status_code == 504, r.text
        err = error_of(r)
        assert err["code"] == "timeout" and "generation" in err["message"] and "job_timeout_s" in err["message"]
        served(c, song)
        job = c.post(
            "/v1/jobs", files={"file": ("song.mid", song)}, data={"task": "infill", **INFILL, "seed": str(SEGV_SEED)}
        ).json()
        for _ in range(3000):
            state = c.get(f"/v1/jobs/{job['id']}").json()
            if state["state"] not in ("queued", "running"):
                break
            time.sleep(0.01)
        assert state["state"] == "failed" and state["error"]["code"] == "worker_crashed", state
        assert "SIGSEGV" in state["error"]["message"]
        served(c, song)
        assert c.get("/v1/health").json()["worker_restarts"] == 2


def test_a_worker_killed_while_idle_is_replaced_before_the_next_request(serve_mmm, song):
    with make_client(serve_mmm, check_workers=1) as c:
        server = c.app.state.server
        for worker in server.workers:  # as the out-of-memory killer would
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.join()
        served(c, song)
        assert c.get("/v1/health").json()["worker_restarts"] == 2
