"""The music21 recipe's training step without Lightning or the loader, to tell the allocator
apart from the framework: the `small` model, the loss compiled with dynamic shapes, bf16
autocast, AdamW, gradient clipping, on synthetic packed rows of 8 samples of 200-1,024 ids
(`--fixed`: always 8 x 1,024; `--bucket B`: the row padded to a multiple of B ids, as
`mmm.data.datamodule.pack(row_len=...)` pads). Prints one CSV line per step: the row's length in
ids, the step's time, resident memory (now and its peak during the step) and glibc's heap
(`mmm.training.callbacks`), and the CPU seconds (all threads) and page faults it took: on a
machine shared with other jobs its CPU time, unlike its wall time, hardly depends on their load.
`--alternate K`: the release after every step on in every other block of K steps, off in the
others, in one process (the same compiled code, the same load on the machine) to tell its cost.

    python experiments/memory/probe.py --steps 150 [--eager] [--fixed] [--bucket 256] [--release N] > out.csv
    python experiments/memory/probe.py --steps 200 --alternate 10 > alternate.csv
    OMP_NUM_THREADS=1 python experiments/memory/probe.py --steps 120 --alternate 5 > alternate_1thread.csv
    python experiments/memory/cost.py alternate.csv   # the release's cost from such a run
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from mmm.data.sequences import IGNORE_INDEX
from mmm.model import MMMTransformer, model_config_from_preset, next_token_nll
from mmm.training.callbacks import glibc_heap, process_memory, release_freed_memory, reset_peak_memory


def batch(rng: random.Random, fixed: bool, bucket: int, vocab: int = 2000, samples: int = 8) -> dict:
    lengths = [1024 if fixed else rng.randint(200, 1024) for _ in range(samples)]
    total = -(-sum(lengths) // bucket) * bucket
    if total > sum(lengths):
        lengths.append(total - sum(lengths))  # the padding at the row's end is a sample of its own
    ids = torch.randint(4, vocab, (1, total), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    docs = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    labels = ids.clone()
    labels[0, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "doc_ids": docs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--fixed", action="store_true", help="every row 8 x 1,024 ids")
    parser.add_argument("--bucket", type=int, default=1, help="pad each row to a multiple of this many ids")
    parser.add_argument("--release", type=int, default=0, help="release_freed_memory() every N steps (0: never)")
    parser.add_argument("--alternate", type=int, default=0, help="release every step in every other block of K steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = MMMTransformer(model_config_from_preset("small", vocab_size=2000, max_seq_len=1024))
    loss_fn = next_token_nll if args.eager else torch.compile(next_token_nll, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(
        "step,released,tokens,seconds,cpu_seconds,page_faults,rss_mb,peak_rss_mb,anon_mb,heap_in_use_mb,heap_free_mb,heap_mmapped_mb",
        flush=True,
    )
    for step in range(args.steps):
        b = batch(rng, args.fixed, args.bucket)
        reset_peak_memory()
        if args.alternate:
            release = (step // args.alternate) % 2 == 1
        else:
            release = bool(args.release) and step % args.release == 0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu = time.process_time()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = loss_fn(model, b["input_ids"], b["labels"], IGNORE_INDEX, reduction="sum", doc_ids=b["doc_ids"])
        loss = nll / (b["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if release:
            release_freed_memory()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        mem, heap = process_memory(), glibc_heap() or {}
        print(
            f"{step},{int(release)},{b['input_ids'].shape[1]},{seconds:.3f},{cpu:.3f},{faults},"
            f"{mem['rss_mb']:.1f},{mem['peak_rss_mb']:.1f},{mem['anon_mb']:.1f},"
            f"{heap.get('in_use_mb', float('nan')):.1f},{heap.get('free_mb', float('nan')):.1f},"
            f"{heap.get('mmapped_mb', float('nan')):.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
