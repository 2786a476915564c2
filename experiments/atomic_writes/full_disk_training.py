"""A training run hitting a full disk, end to end: train to step 3, then to step 6 under a
file-size limit below the checkpoint size (the step-6 save fails), then to step 6 with space.

    python experiments/atomic_writes/full_disk_training.py --corpus <folder of MIDI> --root runs/full_disk

Uses the small training settings of the tests (`small_overrides` in tests/conftest.py: a model of a
few thousand parameters).
"""

from __future__ import annotations

import argparse
import resource
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child(corpus: Path, root: Path, steps: int, limit: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_config, small_overrides

    from mmm.model.pretrained import load_checkpoint_file
    from mmm.train import train

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as a full disk fails with ENOSPC
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    overrides = small_overrides(corpus, root) + [
        f"trainer.max_steps={steps}",
        "logger=none",
        "validate_before_training=false",
    ]
    try:
        print("result:", {k: v for k, v in train(compose_config("train", overrides)).items() if k == "global_step"})
    except Exception as e:
        print("result:", type(e).__name__, e)
    checkpoints = root / "run" / "checkpoints"
    print(
        "checkpoints:",
        sorted(p.name for p in checkpoints.iterdir()),
        "last.ckpt step:",
        load_checkpoint_file(checkpoints / "last.ckpt")["global_step"],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.corpus.resolve(), args.root.resolve(), *args.child)
    for steps, limit in ((3, 0), (6, 500_000), (6, 0)):
        print(f"-- max_steps={steps}" + (f", file-size limit {limit} bytes" if limit else ""), flush=True)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--corpus",
                str(args.corpus),
                "--root",
                str(args.root),
                "--child",
                str(steps),
                str(limit),
            ],
            check=True,
            cwd=REPO,
        )


if __name__ == "__main__":
    main()
