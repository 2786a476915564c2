"""Time a checkpoint write: Lightning's own writer against mmm's (temp file beside the target,
fsync of file and folder), and one lock acquire/release.

    python experiments/atomic_writes/bench.py --out runs/bench_io --mb 64 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmm.files.locks import acquire_lock
from mmm.training.checkpoint_io import MMMCheckpointIO


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (on the disk to measure)")
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| checkpoint | Lightning TorchCheckpointIO | mmm MMMCheckpointIO |")
    print("|---|---|---|")
    for mb in args.mb:
        ckpt = {"state_dict": {"w": torch.randn(mb * 2**20 // 4)}, "global_step": 1}
        path = args.out / "last.ckpt"
        lightning = timed(lambda ckpt=ckpt, path=path: TorchCheckpointIO().save_checkpoint(ckpt, path), args.repeats)
        ours = timed(lambda ckpt=ckpt, path=path: MMMCheckpointIO().save_checkpoint(ckpt, path), args.repeats)
        print(f"| {mb} MB | {lightning:.2f} s | {ours:.2f} s |")
    path.unlink()

    def lock() -> None:
        with acquire_lock(args.out, "bench"):
            pass

    print(f"lock acquire + release: {timed(lock, 50) * 1000:.2f} ms (median of 50)")


if __name__ == "__main__":
    main()
