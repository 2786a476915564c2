"""A bounded load test on loopback: 16 concurrent clients x 4 infill requests against a real
uvicorn server with a queue of 4. Every request is answered 200 or 503 (queue full, with
Retry-After), none is lost, at least one of each happens, and the server is healthy and
idle afterwards. Latency figures go in experiments/serve/README.md, not in assertions."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")

from conftest import synthetic_score  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402

from mmm.serve.app import Settings, create_app  # noqa: E402
from mmm.serve.load import load_test  # noqa: E402

pytestmark = pytest.mark.subprocess  # the server's worker processes


def test_load_16_clients_x_4_requests(serve_mmm):
    midi = synthetic_score(seed=1, num_bars=8).dumps_midi()
    with serve_in_thread(create_app(serve_mmm, Settings(queue_size=4))) as url:
        result = load_test(url, midi, clients=16, requests=4, fields={"track": "1", "bars": "[0,1]", "seed": "0"})
    assert result["answered"] == result["sent"] == 64
    assert set(result["status"]) <= {200, 503}, result["status"]
    assert result["status"].get(200, 0) >= 1 and result["status"].get(503, 0) >= 1, result["status"]
    health = result["health_after"]
    assert health["status"] == "ok" and health["worker_alive"] and health["queued"] == 0 and health["running"] is None
