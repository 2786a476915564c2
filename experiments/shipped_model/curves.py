"""Loss curves of a training run, from its TensorBoard events, as a PNG.

python experiments/shipped_model/curves.py runs/music21 models/mmm-music21-small/loss_curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files (resumed runs write several), by tag."""
    series: dict[str, dict[int, float]] = {}
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                series.setdefault(tag, {})[e.step] = e.value  # a resumed run's later value wins
    return {tag: sorted(points.items()) for tag, points in series.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument(
        "--mark",
        action="append",
        default=[],
        metavar="STEP:LABEL",
        help="a vertical line at STEP (e.g. where the recipe changed)",
    )
    args = p.parse_args()
    series = scalars(args.run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, label in (("train/loss", "train (per step)"), ("val/loss", "validation")):
        if tag in series:
            steps, values = zip(*series[tag])
            ax.plot(
                steps,
                values,
                label=label,
                marker="o" if tag.startswith("val") else None,
                lw=1 if tag.startswith("train") else 2,
            )
    if "val/loss_per_note" in series:  # comparable across encodings: nats per note, not per id
        steps, values = zip(*series["val/loss_per_note"])
        right = ax.twinx()
        right.plot(steps, values, color="tab:green", marker="s", lw=1.5, label="validation per note")
        right.set_ylabel("validation (nats per note)", color="tab:green")
        right.legend(loc="center right")
    for mark in args.mark:
        step, _, label = mark.partition(":")
        ax.axvline(int(step), color="grey", ls="--", lw=1)
        ax.text(int(step), ax.get_ylim()[1] * 0.95, f" {label}", color="grey", va="top", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per model id)")
    ax.set_title(f"{args.run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    for tag, points in sorted(series.items()):
        if tag.endswith("loss") or "loss" in tag:
            print(
                f"{tag}: first {points[0][1]:.3f} at step {points[0][0]}, last {points[-1][1]:.3f} at step {points[-1][0]}"
            )


if __name__ == "__main__":
    main()
