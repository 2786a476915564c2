"""What running uploads and generations in worker processes costs in latency: the same requests,
alternately, to a server of the previous code (everything in the server process's threads) and
to one of this checkout, both started by the real entry point on the same model.

    before=$(mktemp -d) && cp -r mmm configs "$before" && rm -rf "$before/mmm/serve" \
        && git archive <commit before the change> mmm/serve configs/serve.yaml | tar -x -C "$before"
    python experiments/serve/isolation_latency.py --before "$before" [--ckpt models/mmm-music21-small] [--rounds 30]

Per round, one request of each kind to each server, in alternating order: a 4-bar infill
(`track=1 bars=[2,6] seed=0` of the bundled `pop_4_tracks`, one candidate) and an analysis of
the same file. Latency is measured by the client, from sending the upload to the end of the
answer. Both servers generate the same tokens (same model, same seed), so the difference is
the cost of the design. Prints a markdown table: p50 and p95 per server, and the median of the
per-round differences; then the start-up times, and (this checkout only, Linux) how long a
4-bar infill takes right after every worker process was killed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from mmm.serve.music import example_midi

REPO = Path(__file__).resolve().parents[2]


def start(root: Path, ckpt: Path) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "mmm.serve", f"ckpt={ckpt}", f"port={port}", "num_threads=1", "log_level=warning"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    server = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return server, url, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"the server of {root} did not start")


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def recovery(http: httpx.Client, server: subprocess.Popen, url: str, midi: bytes, fields: dict) -> float:
    """Seconds to answer an infill right after every worker was killed (as the out-of-memory
    killer would): new workers start (fork, load the model), then the request runs."""
    workers = [w for c in children(server.pid) for w in children(c)]  # the fork server's children
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # gone
    return timed(http, url, "/v1/infill", midi, fields)


def timed(http: httpx.Client, url: str, path: str, midi: bytes, fields: dict) -> float:
    t0 = time.perf_counter()
    r = http.post(url + path, files={"file": ("pop.mid", midi, "audio/midi")}, data=fields)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--before", type=Path, required=True, help="a copy of mmm/ and configs/ with the previous mmm/serve"
    )
    parser.add_argument("--ckpt", type=Path, default=REPO / "models" / "mmm-music21-small")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    midi = example_midi("pop_4_tracks")
    requests = {
        "infill 4 bars": ("/v1/infill", {"track": "1", "bars": "[2,6]", "seed": "0"}),
        "analyze": ("/v1/analyze", {}),
    }
    servers = {}
    for name, root in (("before", args.before.resolve()), ("after", REPO)):
        servers[name] = start(root, args.ckpt.resolve())
    times = {(name, kind): [] for name in servers for kind in requests}
    try:
        with httpx.Client(timeout=600) as http:
            for _, url, _ in servers.values():  # warm-up
                for path, fields in requests.values():
                    timed(http, url, path, midi, fields)
            for k in range(args.rounds):
                order = list(servers) if k % 2 == 0 else list(servers)[::-1]
                for kind, (path, fields) in requests.items():
                    for name in order:
                        times[name, kind].append(timed(http, servers[name][1], path, midi, fields))
        after, url, _ = servers["after"]
        with httpx.Client(timeout=600) as http:
            recovered = [recovery(http, after, url, midi, requests["infill 4 bars"][1]) for _ in range(3)]
    finally:
        for server, _, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)
    print(f"{args.rounds} rounds, model {args.ckpt.name}, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| request | before p50 s | before p95 s | after p50 s | after p95 s | median of (after - before) s |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in requests:
        b, a = np.array(times["before", kind]), np.array(times["after", kind])
        print(
            f"| {kind} | {np.median(b):.3f} | {np.percentile(b, 95):.3f} | {np.median(a):.3f} | "
            f"{np.percentile(a, 95):.3f} | {np.median(a - b):+.3f} |"
        )
    print(f"\nstart until /v1/health answers: before {servers['before'][2]:.1f} s, after {servers['after'][2]:.1f} s")
    print(f"after: a 4-bar infill right after every worker was killed: {', '.join(f'{t:.2f}' for t in recovered)} s")


if __name__ == "__main__":
    main()
