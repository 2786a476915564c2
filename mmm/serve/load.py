"""A bounded load test of a running server: `clients` threads each send `requests` requests
and record status and latency; every answer must be 200 or 503 (queue full), none lost.

    python -m mmm.serve.load --url http://127.0.0.1:8765 --midi song.mid --clients 16 --requests 4

The request is an infill of `--bars` of `--track` (a JSON span, e.g. [0,1]). Prints a JSON
summary: counts per status, latency percentiles of the 200s and of all answers, and whether
`/v1/health` still answers afterwards.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


def load_test(
    url: str,
    midi: bytes,
    clients: int = 16,
    requests: int = 4,
    fields: dict[str, str] | None = None,
    token: str | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    import httpx

    fields = fields or {"track": "0", "bars": "[0,1]", "seed": "0"}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    results: list[tuple[int, float]] = []  # (status or -1 for a lost request, seconds)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s, headers=headers) as http:
            for _ in range(requests):
                t0 = time.perf_counter()
                try:
                    status = http.post(
                        "/v1/infill", files={"file": ("load.mid", midi, "audio/midi")}, data=fields
                    ).status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    results.append((status, time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    with httpx.Client(base_url=url, timeout=10) as http:
        health = http.get("/v1/health").json()

    def percentiles(xs: list[float]) -> dict[str, float | None]:
        if not xs:
            return {"p50_s": None, "p95_s": None, "max_s": None}
        return {
            "p50_s": round(float(np.percentile(xs, 50)), 3),
            "p95_s": round(float(np.percentile(xs, 95)), 3),
            "max_s": round(max(xs), 3),
        }

    return {
        "clients": clients,
        "requests_per_client": requests,
        "sent": clients * requests,
        "answered": len(results),
        "status": dict(sorted(Counter(s for s, _ in results).items())),
        "wall_s": round(wall, 3),
        "ok_latency": percentiles([t for s, t in results if s == 200]),
        "all_latency": percentiles([t for _, t in results]),
        "health_after": health,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--midi", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--track", default="0")
    parser.add_argument("--bars", default="[0,1]")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    fields = {"track": args.track, "bars": args.bars, "seed": "0"}
    print(
        json.dumps(
            load_test(args.url, args.midi.read_bytes(), args.clients, args.requests, fields, args.token), indent=2
        )
    )


if __name__ == "__main__":
    main()
