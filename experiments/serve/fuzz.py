"""The HTTP API fuzzed from its own OpenAPI schema with Schemathesis, for longer than the test
suite does (tests/test_serve_fuzz.py runs a few examples per operation on every test run).

    python experiments/serve/fuzz.py [--max-examples 100] [--seed 0] [--phases examples,coverage,fuzzing,stateful]

Builds a random-weight checkpoint (2 layers, width 32: the tests' model) with the tokenizer of
configs/tokenizer/mmm.yaml, starts the real entry point (`python -m mmm.serve ... max_new_bars=2
max_variations=2 max_bar_tokens=4 queue_size=512`) on a free loopback port, and runs
`schemathesis run` against its /openapi.json with every check, valid and invalid inputs, and
real MIDI files for the upload parts the schema declares as audio/midi. Schemathesis prints its
own summary (operations, test cases, failures); the JSON report goes to --report-dir.
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
from schemathesis.cli import schemathesis as cli
from symusic import Note, Score, Tempo, TimeSignature, Track

from mmm.model import MMMTransformer, ModelConfig
from mmm.model.pretrained import save_pretrained
from mmm.serve.music import example_midi
from mmm.tokenizer import Vocab, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import serve_fuzzing  # noqa: I001 (tests/: what the test adds to Schemathesis, MIDI files and valid spans)

# As the test: valid data may still get 400 (the file's bytes) or 422 (what a schema cannot say).
CONFIG = """
[cache]
enabled = false  # its crash records would go to .schemathesis/ in the checkout

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422", "429"]
"""


def four_bars() -> bytes:
    score = Score(480)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, 120.0))
    track = Track("piano", 0)
    track.notes.extend(Note(t, 400, 60 + (t // 480) % 12, 80) for t in range(0, 4 * 1920, 480))
    score.tracks.append(track)
    return score.dumps_midi()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    parser.add_argument("--report-dir", type=Path, default=Path(tempfile.gettempdir()) / "mmm-fuzz-report")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        tokenizer_params = OmegaConf.to_container(compose("tokenizer").tokenizer.params)
    tokenizer = build_tokenizer(tokenizer_params)
    config = ModelConfig(
        vocab_size=Vocab(tokenizer).size,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_seq_len=1024,
        attention="sdpa",
    )
    serve_fuzzing.register([four_bars(), example_midi("waltz")])
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        ckpt = save_pretrained(MMMTransformer(config).eval(), tokenizer, Path(tmp) / "model")
        (Path(tmp) / "schemathesis.toml").write_text(CONFIG)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "mmm.serve", f"ckpt={ckpt}", f"port={port}", "num_threads=1"]
        # Short generations (4 ids a bar at most), and a queue long enough for the jobs the run
        # creates faster than they run: a full queue's 503 is load shedding, tested elsewhere.
        command += ["max_new_bars=2", "max_variations=2", "max_bar_tokens=4", "queue_size=512", "log_level=warning"]
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
        try:
            for _ in range(1200):
                try:
                    httpx.get(url + "/v1/health", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            argv = [
                "--config-file",
                str(Path(tmp) / "schemathesis.toml"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                # DELETE /v1/jobs/{id} cancels a job; its record (final state, events) stays readable.
                "--exclude-checks",
                "use_after_free",
                "--mode",
                "all",
                "--phases",
                args.phases,
                "--max-examples",
                str(args.max_examples),
                "--seed",
                str(args.seed),
                "--workers",
                "1",
                "--suppress-health-check",
                "all",
                "--report",
                "json",
                "--report-dir",
                str(args.report_dir),
                # A synchronous request waits behind the jobs the run queued (up to queue_size).
                "--request-timeout",
                "600",
                "--max-response-time",
                "600",
            ]
            t0 = time.perf_counter()
            try:
                cli.main(argv, standalone_mode=False)
                code = 0
            except SystemExit as done:  # schemathesis ends with its exit status
                code = done.code
            print(f"schemathesis exit code {code}, {time.perf_counter() - t0:.0f} s", flush=True)
            health = httpx.get(url + "/v1/health").json()
            print("health after:", health)
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
