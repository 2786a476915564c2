"""What handing freed memory back costs, measured apart: 256 blocks of 1 MB from glibc's heap
are written, freed and written again, once with the freed memory kept and once after
`malloc_trim(0)`; the difference in CPU time per extra page fault is what a training step pays
for the pages it takes back after a release, plus the release call itself.

    python experiments/memory/fault_cost.py
"""

from __future__ import annotations

import ctypes
import resource
import time

M_MMAP_THRESHOLD = -3
BLOCKS, SIZE = 256, 1 << 20

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fill() -> list[int]:
    blocks = [libc.malloc(SIZE) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    return blocks


def free(blocks: list[int]) -> None:
    for block in blocks:
        libc.free(ctypes.c_void_p(block))


def main() -> None:
    libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)  # blocks from the heap, as training's tensors under 32 MB are
    free(fill())
    for _ in range(6):
        f, cpu = faults(), time.process_time()
        blocks = fill()
        kept, kept_faults = time.process_time() - cpu, faults() - f
        free(blocks)
        cpu = time.process_time()
        libc.malloc_trim(0)
        trim = time.process_time() - cpu
        f, cpu = faults(), time.process_time()
        blocks = fill()
        released, released_faults = time.process_time() - cpu, faults() - f
        free(blocks)
        per_fault = (released - kept) / max(released_faults - kept_faults, 1) * 1e6
        print(
            f"256 MB kept: {kept * 1e3:.0f} ms ({kept_faults} faults); released: trim {trim * 1e3:.1f} ms "
            f"+ {released * 1e3:.0f} ms ({released_faults} faults) -> {per_fault:.2f} us per extra fault"
        )


if __name__ == "__main__":
    main()
