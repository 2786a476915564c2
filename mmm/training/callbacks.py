"""Lightning callbacks of mmm, and the process-memory readings of `MemoryMonitor`."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

_MB = 1024 * 1024


class CheckpointOnInterrupt(L.Callback):
    """Save `last.ckpt` when training is stopped by SIGTERM (what Slurm sends before
    preemption or at the time limit) or Ctrl-C. Lightning stops after the current batch, so the
    checkpoint holds a whole step: resuming with `ckpt_path=last` continues from it."""

    def __init__(self, dirpath: str) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            log.warning("interrupted at step %d: checkpoint saved to %s", trainer.global_step, self.path)


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process in MB (Linux /proc): `rss_mb` in all (`peak_rss_mb`: its
    highest since the process started or `reset_peak_memory`), `anon_mb` of it not
    backed by a file (the heap: what grows when memory is kept), `file_mb` mapped files (code,
    memory-mapped stores: the kernel can drop those pages). Empty where /proc is missing or the
    process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kb = lambda key: int(fields.get(key, "0 kB").split()[0]) / 1024  # noqa: E731
    return {
        "rss_mb": kb("VmRSS"),
        "peak_rss_mb": kb("VmHWM"),
        "anon_mb": kb("RssAnon"),
        "file_mb": kb("RssFile") + kb("RssShmem"),
    }


def proportional_memory(pid: int | str = "self") -> float | None:
    """A process's proportional set size in MB (Linux /proc smaps_rollup): its resident pages,
    each page shared with other processes counted as its share. A loader worker forked from the
    training process shares all the pages the trainer had then, which its RSS counts again in
    full; the PSS of the processes adds up to the physical memory they hold. None where
    unavailable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_memory() -> None:
    """Start `peak_rss_mb` (the kernel's high-water mark of this process) afresh (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def descendants(pid: int) -> list[int]:
    """Children, their children, ...: loader workers started by a fork server are its children."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []
    return [d for c in children for d in (c, *descendants(c))]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc (musl has no malloc_trim)


def glibc_heap() -> dict[str, float] | None:
    """glibc's own account of this process's heap, all arenas, in MB: `in_use_mb` (allocated and
    not freed), `free_mb` (freed but kept by the allocator: resident until returned),
    `mmapped_mb` (large blocks mapped apart, returned at once when freed). None without glibc
    2.33 or later (`mallinfo2`)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use_mb": info.uordblks / _MB, "free_mb": info.fordblks / _MB, "mmapped_mb": info.hblkhd / _MB}


def release_freed_memory() -> bool:
    """Return to the system the memory that glibc's allocator holds after it was freed
    (`malloc_trim(0)`: the free pages inside its heaps too, not only at their top). False
    where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class ReleaseFreedMemory(L.Callback):
    """Hand the memory freed by each training step back to the system (`release_freed_memory`)
    every `every_n_steps` steps and after each validation.

    Why: a packed batch is one row as long as its samples, so every step allocates its
    activations in sizes no earlier step used. glibc serves tensors under 32 MB (its largest
    mmap threshold) from its heaps, and the free chunks these varying sizes leave behind stay
    resident: a long CPU run's memory grew without bound while what it used stayed flat
    (docs/reliability.rst). Released every step, resident memory stays at what a step uses; the
    pages the next step takes back are its cost (experiments/memory has the curves and the cost)."""

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r}: expected a number of steps >= 1")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            release_freed_memory()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        release_freed_memory()


class MemoryMonitor(L.Callback):
    """Log the training process's resident memory every `every_n_steps` steps to the run's
    loggers (`memory/rss_mb`; `memory/peak_rss_mb`: its highest since the previous reading, what
    an out-of-memory killer sees; `memory/anon_mb`; `memory/workers_rss_mb`: the processes it
    started (the data loader's workers and their fork server; in a local multi-process run the
    other ranks); their RSS counts
    again the pages they share with this process; `memory/total_pss_mb`: the physical memory of
    this process and those together; `memory/heap_free_mb`: freed memory glibc still
    holds) and, with `csv`, one line per reading to that file, so a long run's memory curve is
    recorded as it goes, with the wall-clock time of each reading (`experiments/memory`)."""

    def __init__(self, every_n_steps: int = 10, csv: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r}: expected a number of steps >= 1")
        self.every_n_steps, self.csv = every_n_steps, Path(csv) if csv else None
        self._last_step = -1

    def reading(self) -> dict[str, float]:
        """This process's memory now and at its peak since the last reading, its children's."""
        own = process_memory()
        reset_peak_memory()
        children = descendants(os.getpid())
        workers = [process_memory(c) for c in children]
        pss = [proportional_memory(p) for p in ["self", *children]]
        heap = glibc_heap() or {}
        nan = float("nan")
        return {
            "rss_mb": own.get("rss_mb", nan),
            "peak_rss_mb": own.get("peak_rss_mb", nan),
            "anon_mb": own.get("anon_mb", nan),
            "workers_rss_mb": sum(w.get("rss_mb", 0.0) for w in workers),
            "total_pss_mb": nan if None in pss else sum(pss),
            "heap_free_mb": heap.get("free_mb", nan),
        }

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # Accumulating gradients, several batches end on one step: one reading per step.
        if step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        reading = self.reading()
        for logger in trainer.loggers:
            logger.log_metrics({f"memory/{k}": v for k, v in reading.items()}, step=step)
        if self.csv is not None:
            new = not self.csv.is_file()
            self.csv.parent.mkdir(parents=True, exist_ok=True)
            with open(self.csv, "a") as f:
                if new:
                    f.write("step,time,cpu_s," + ",".join(reading) + "\n")
                # The wall clock and this process's CPU seconds, to read memory against time and
                # the steps' pace off the same file (CPU time hardly depends on other jobs' load).
                clocks = f"{time.time():.1f},{time.process_time():.1f},"
                f.write(f"{step}," + clocks + ",".join(f"{v:.1f}" for v in reading.values()) + "\n")
