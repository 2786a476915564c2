"""Memory of the data loader's workers by start method: the demo recipe's training loader with
2 workers, in a process holding a heap of `ballast_mb` (the trainer's stand-in) that it rewrites
after the workers started, as every training step rewrites the trainer's heap.

    MMM_DATA_DIR=data python experiments/memory/workers.py fork 1000
    MMM_DATA_DIR=data python experiments/memory/workers.py forkserver 1000

Prints the PSS (physical memory, shared pages split between their users) of this process and of
every process it started (workers, and the fork server with its resource tracker).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


def pss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descendants(pid: int) -> list[int]:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [d for c in children for d in (c, *descendants(c))]


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_config

    from mmm.config import check_section
    from mmm.data.datamodule import DataConfig, MIDIDataModule

    method, ballast_mb = sys.argv[1], int(sys.argv[2])
    ballast = bytearray(ballast_mb * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])
    cfg = compose_config("train", ["+experiment=demo", f"paths.data_dir={os.environ.get('MMM_DATA_DIR', 'data')}"])
    loader = {"loader": {"num_workers": 2, "start_method": method}}
    data = check_section("data", OmegaConf.merge(cfg.data, loader), DataConfig)
    dm = MIDIDataModule.from_config(data, cfg.tokenizer.path, seed=0)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    for _ in range(30):
        next(batches)
    ballast[::4096] = b"\2" * len(ballast[::4096])
    next(batches)
    others = descendants(os.getpid())
    print(
        f"{method}: this process {pss_mb(os.getpid()):.0f} MB, the processes it started "
        f"{', '.join(f'{pss_mb(p):.0f}' for p in others)} MB: {sum(map(pss_mb, others)):.0f} MB"
    )


if __name__ == "__main__":
    main()
