"""The training run's memory: `MemoryMonitor` records it as the run goes (loggers and a CSV),
and `ReleaseFreedMemory` hands what glibc keeps after freeing back to the system
(experiments/memory has the cause and the curves)."""

from __future__ import annotations

import csv

import pytest
from conftest import compose_config, small_overrides

from mmm.train import train
from mmm.training.callbacks import glibc_heap, process_memory, release_freed_memory


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_run_records_its_memory_as_it_trains(corpus, tmp_path):
    overrides = ["trainer.max_steps=4", "validate_before_training=false", "callbacks.memory_monitor.every_n_steps=2"]
    train(compose_config("train", small_overrides(corpus, tmp_path) + overrides))
    with open(tmp_path / "run" / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == [
        "step",
        "time",
        "cpu_s",
        "rss_mb",
        "peak_rss_mb",
        "anon_mb",
        "workers_rss_mb",
        "total_pss_mb",
        "heap_free_mb",
    ]
    assert all(float(r["rss_mb"]) > 0 and float(r["peak_rss_mb"]) >= float(r["rss_mb"]) * 0.5 for r in rows)
    assert list((tmp_path / "run").glob("tensorboard/**/events.out.tfevents.*"))  # the loggers got it too


@pytest.mark.skipif(glibc_heap() is None, reason="glibc only")
def test_freed_memory_that_glibc_keeps_is_handed_back():
    """Blocks of 100 KB come from glibc's heap; freeing all but every tenth leaves free chunks
    between live ones, which glibc keeps resident (it only trims a heap's top by itself)."""
    blocks = [bytearray(100_000) for _ in range(3000)]  # touched: zero-filled
    for i in range(len(blocks)):
        if i % 10:
            blocks[i] = None
    before = process_memory()["rss_mb"]
    assert release_freed_memory()
    assert before - process_memory()["rss_mb"] > 100  # of the ~257 MB freed
    assert len([b for b in blocks if b is not None]) == 300


def test_the_processes_a_run_started_include_grandchildren():
    """Loader workers started by a fork server are its children, not the trainer's: the readings
    count every process the trainer started."""
    import os
    import subprocess
    import sys
    import time

    from mmm.training.callbacks import descendants

    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        time.sleep(0.2)
        assert {child.pid, grandchild} <= set(descendants(os.getpid()))
    finally:
        subprocess.run(["pkill", "-P", str(child.pid)])
        child.kill()
        child.wait()
