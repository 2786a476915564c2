"""The release's cost from a `probe.py --alternate K` run: CPU seconds per step with the release
after every step and without, in the interleaved blocks of one process. Left out: the first block
(compilation, warm-up), the first step of every block (it pays for the previous block's
release, or does the first release of its block), and steps of more than twice the median CPU
time: torch.compile recompiling for a row length its guards had not seen (hundreds of
thousands of page faults; 35 s instead of 4), which lands in either block by chance. The rows differ in length from step to step,
which moves a step's time far more than the release does, so the cost is also fitted together
with the length: CPU seconds = a + b * ids + c * released (least squares); c is the release's cost.

    python experiments/memory/cost.py probe_alternate.csv
"""

from __future__ import annotations

import csv
import sys

import numpy as np


def main() -> None:
    with open(sys.argv[1]) as f:
        rows = list(csv.DictReader(f))
    released = [r["released"] for r in rows]
    first_block_end = released.index("1")
    kept = [r for i, r in enumerate(rows) if i > first_block_end and released[i] == released[i - 1]]
    median = float(np.median([float(r["cpu_seconds"]) for r in kept]))
    slow = [r["step"] for r in kept if float(r["cpu_seconds"]) > 2 * median]
    kept = [r for r in kept if r["step"] not in slow]
    print(f"left out as recompilations (over twice the median {median:.2f} CPU s): steps {', '.join(slow) or 'none'}")
    cpu = np.array([float(r["cpu_seconds"]) for r in kept])
    wall = np.array([float(r["seconds"]) for r in kept])
    on = np.array([r["released"] == "1" for r in kept])
    print(
        f"steps {kept[0]['step']}-{kept[-1]['step']} of {len(rows)}: {(~on).sum()} without the release, {on.sum()} with"
    )
    faults = np.array([float(r["page_faults"]) for r in kept])
    print(f"page faults/step: without {faults[~on].mean():,.0f}, with {faults[on].mean():,.0f}")
    for name, values in (("CPU s/step", cpu), ("wall s/step", wall)):
        a, b = values[~on], values[on]
        se = (a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b)) ** 0.5
        print(
            f"{name}: without {a.mean():.3f}, with {b.mean():.3f}: "
            f"{(b.mean() / a.mean() - 1) * 100:+.1f}% (± {se / a.mean() * 100:.1f}% s.e.)"
        )
    if "tokens" in kept[0]:
        ids = np.array([float(r["tokens"]) for r in kept])
        x = np.column_stack([np.ones_like(ids), ids, on])
        coef, residual, *_ = np.linalg.lstsq(x, cpu, rcond=None)
        sigma2 = residual[0] / (len(cpu) - x.shape[1])
        se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
        base = cpu[~on].mean()
        print(
            f"CPU s/step fitted with the row's length: the release adds {coef[2]:+.3f} s "
            f"(± {se[2]:.3f} s.e.) = {coef[2] / base * 100:+.1f}% (± {se[2] / base * 100:.1f}%) "
            f"of the {base:.2f} s of a step without it"
        )


if __name__ == "__main__":
    main()
