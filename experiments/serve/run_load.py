"""Load test of `python -m mmm.serve` on loopback: p50/p95 latency and 200/503 counts.

    python experiments/serve/run_load.py [--preset tiny] [--context 1024] [--queue-size 8]

Builds a random-weight checkpoint of `--preset` with the tokenizer of configs/tokenizer/mmm.yaml
(no trained model needed: sampling costs the same, and random weights use the whole per-bar
budget, the slow case), starts the real entry point in its own process on a free port, then
for each scenario (clients x requests) sends infill requests of one bar of the bundled example
`pop_4_tracks` with `mmm.serve.load.load_test`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmm.model import MMMTransformer, model_config_from_preset
from mmm.model.pretrained import save_pretrained
from mmm.serve.load import load_test
from mmm.serve.music import example_midi
from mmm.tokenizer import Vocab, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = [(1, 8), (4, 4), (16, 4)]  # (clients, requests per client)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--bars", default="[4,5]")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        tokenizer_params = OmegaConf.to_container(compose("tokenizer").tokenizer.params)  # configs/tokenizer/mmm.yaml
    tokenizer = build_tokenizer(tokenizer_params)
    model = MMMTransformer(model_config_from_preset(args.preset, Vocab(tokenizer).size, args.context)).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        ckpt = save_pretrained(model, tokenizer, Path(tmp) / "model")
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mmm.serve",
                f"ckpt={ckpt}",
                f"port={port}",
                f"queue_size={args.queue_size}",
                "num_threads=1",
                "log_level=warning",
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )  # its log (budget warnings) would cut the table
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/v1/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            midi = example_midi("pop_4_tracks")
            fields = {"track": "0", "bars": args.bars, "seed": "0"}
            load_test(url, midi, 1, 2, fields)  # warm-up
            print(
                f"preset {args.preset} ({params / 1e6:.2f}M parameters), context {args.context}, "
                f"queue_size {args.queue_size}, infill bars={args.bars} of track 0 of pop_4_tracks\n"
            )
            print(
                "| clients x requests | 200 | 503 | lost | wall s | p50 s (200s) | p95 s (200s) | p50 s (all) | p95 s (all) | healthy after |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
            for clients, requests in SCENARIOS:
                r = load_test(url, midi, clients, requests, fields)
                ok, all_ = r["ok_latency"], r["all_latency"]
                print(
                    f"| {clients} x {requests} | {r['status'].get(200, 0)} | {r['status'].get(503, 0)} | "
                    f"{r['sent'] - r['answered'] + r['status'].get(-1, 0)} | {r['wall_s']} | {ok['p50_s']} | {ok['p95_s']} | "
                    f"{all_['p50_s']} | {all_['p95_s']} | {'yes' if r['health_after']['status'] == 'ok' else 'NO'} |",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
