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


def main() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_config

    from mmm.config import check_section
    from mmm.data.datamodule import DataConfig, MIDIDataModule
    from mmm.training.callbacks import descendants, proportional_memory

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
    pss = [proportional_memory(p) for p in others]
    print(
        f"{method}: this process {proportional_memory():.0f} MB, the processes it started "
        f"{', '.join(f'{m:.0f}' for m in pss)} MB: {sum(pss):.0f} MB"
    )


if __name__ == "__main__":
    main()
