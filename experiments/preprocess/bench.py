"""Preprocessing throughput (files/s) at 1 and 2 workers on a folder of music files.

    python experiments/preprocess/bench.py --midi ../shared/midi --repeats 2 --write-readme

Each repeat builds a fresh store with 1 worker then with 2 (interleaved, so machine load
hits both alike); the table reports the median files/s and the speed-up of 2 workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mmm.data.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]


def run(midi: Path, workers: int, store: Path) -> tuple[float, dict]:
    """One run of `python -m mmm.preprocess data=folder data.path=<midi> data.store=<store>
    data.preprocess.num_workers=<workers>` (the repository's configs, composed by Hydra), timed."""
    overrides = ["data=folder", f"data.path={midi.resolve()}", f"data.store={store}", f"data.preprocess.num_workers={workers}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("preprocess", overrides=overrides)
    start = time.perf_counter()
    report = preprocess(cfg.data, cfg.tokenizer)
    return time.perf_counter() - start, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--midi", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    seconds: dict[int, list[float]] = {1: [], 2: []}
    report = {}
    for r in range(args.repeats):
        for workers in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                s, report = run(args.midi, workers, Path(tmp) / "store")
                seconds[workers].append(s)
    files = report["files"]
    rows = {w: files / statistics.median(s) for w, s in seconds.items()}
    table = "\n".join([
        "| workers | files/s (median) | seconds per run | speed-up |",
        "|---|---|---|---|",
        *(f"| {w} | {rows[w]:.2f} | {', '.join(f'{x:.1f}' for x in seconds[w])} | {rows[w] / rows[1]:.2f}x |" for w in (1, 2)),
    ])
    kept = f"{files} files: {report['kept']} kept, {report['rejected']} rejected ({report['rejected_by_reason']}); " \
           f"{sum(v['chunks'] for v in report['splits'].values())} chunks"
    print(kept)
    print(table)
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        head = readme.read_text().split("<!-- results -->")[0]
        load = os.getloadavg()[0]
        readme.write_text(f"{head}<!-- results -->\nCorpus: {kept}. Machine: {os.cpu_count()} CPU cores, "
                          f"load average {load:.1f} at the end of the run (shared machine).\n\n{table}\n")


if __name__ == "__main__":
    main()
