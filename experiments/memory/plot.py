"""Resident memory against training step, from the `memory.csv` that `MemoryMonitor`
(`callbacks.memory_monitor`) writes into a run folder, one curve per run:

    python experiments/memory/plot.py out.png "label=runs/x/memory.csv" ["label=other.csv" ...]

Columns plotted: `rss_mb` (solid; between steps), `peak_rss_mb` (dashed; the highest within the
steps since the previous reading) and `workers_rss_mb` (dotted; the loader's worker processes).
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in rows[0]}


def main() -> None:
    out, runs = sys.argv[1], [arg.rsplit("=", 1) for arg in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(9, 5))
    for (label, path), colour in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        data = {key: [v / 1024 for v in values] if key != "step" else values for key, values in read(path).items()}
        ax.plot(data["step"], data["rss_mb"], color=colour, label=f"{label}: training process")
        if "peak_rss_mb" in data:
            ax.plot(
                data["step"],
                data["peak_rss_mb"],
                color=colour,
                linestyle="--",
                linewidth=0.8,
                label=f"{label}: its peak",
            )
        ax.plot(data["step"], data["workers_rss_mb"], color=colour, linestyle=":", label=f"{label}: loader worker")
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory (GB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
