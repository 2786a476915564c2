"""The smallest reproduction: the training step's matrix products alone (bf16 `linear` forward
and backward with the `small` model's weight shapes, on rows of T ids), no model, no
torch.compile, no Lightning, no loader. T is drawn in [2000, 8000] each step as a packed batch's
length varies (`vary`), or fixed at 6000 (`fixed`); `trim N` releases freed memory every N steps
(`mmm.training.callbacks.release_freed_memory`); `mmap X` fixes glibc's mmap threshold at X
bytes (mallopt M_MMAP_THRESHOLD). Every 40 steps: the step, resident MB, glibc's heap
(in use / freed but kept / mmapped, MB) and the seconds spent in the steps so far.

    python experiments/memory/matmuls.py 200 vary
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python experiments/memory/matmuls.py 200 vary
    python experiments/memory/matmuls.py 200 trim 20
"""

from __future__ import annotations

import ctypes
import random
import sys
import time

import torch

from mmm.training.callbacks import glibc_heap, process_memory, release_freed_memory

M_MMAP_THRESHOLD = -3


def main() -> None:
    steps, mode = int(sys.argv[1]), sys.argv[2]
    arg = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    if mode == "mmap":
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, arg)
    shapes = ((256, 256), (128, 256), (768, 256), (256, 768), (2000, 256))  # q/o, k/v, up/gate, down, lm head
    weights = [torch.randn(n, k, dtype=torch.bfloat16, requires_grad=True) for n, k in shapes]
    rng = random.Random(0)
    spent = 0.0
    for step in range(steps):
        length = 6000 if mode == "fixed" else rng.randint(2000, 8000)
        start = time.perf_counter()
        x = torch.randn(length, 256, dtype=torch.bfloat16, requires_grad=True)
        total = sum(
            torch.nn.functional.linear(x if w.shape[1] == 256 else torch.randn(length, 768, dtype=torch.bfloat16), w)
            .float()
            .sum()
            for w in weights
        )
        total.backward()
        if mode == "trim" and step % arg == arg - 1:
            release_freed_memory()
        spent += time.perf_counter() - start
        if step % 40 == 39:
            heap = {k: round(v) for k, v in glibc_heap().items()}
            print(mode, arg, step, round(process_memory()["rss_mb"]), heap, f"{spent:.1f}s", flush=True)


if __name__ == "__main__":
    main()
