"""Piano-roll PNGs of generated scores: original notes in grey-blue, generated notes in
orange-red, the generated regions shaded. Uses matplotlib's Agg canvas directly (no global
backend switch, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from symusic import Score

ORIGINAL_COLOR = "#4c72b0"
GENERATED_COLOR = "#dd5500"
REGION_COLOR = "#ffd9b3"


def plot_pianoroll(
    score: Score,
    path: str | Path,
    regions: Sequence[tuple[int, int, int]] = (),
    title: str | None = None,
    bar_ticks: Sequence[int] | None = None,
) -> Path:
    """Write a piano roll of `score` to `path` (PNG). `regions` are the generated parts as
    `(track index, start tick, end tick)`: notes of that track with an onset inside are drawn
    as generated. One lane per track, pitches inside a lane, time in quarter notes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    tracks = list(score.tracks)
    n = max(1, len(tracks))
    fig = Figure(figsize=(14, 1.2 + 0.9 * n), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    tpq = score.tpq
    end = max((score.end(), *(r[2] for r in regions)), default=0) / tpq or 1.0
    for track_idx, start, stop in regions:  # shaded background of generated regions
        ax.add_patch(_rect(start / tpq, n - 1 - track_idx, (stop - start) / tpq, 1.0, REGION_COLOR, 0.6))
    polys = {False: [], True: []}
    for lane, track in enumerate(tracks):
        notes = track.notes.numpy()
        if len(notes["time"]) == 0:
            continue
        generated = np.zeros(len(notes["time"]), dtype=bool)
        for track_idx, start, stop in regions:
            if track_idx == lane:
                generated |= (notes["time"] >= start) & (notes["time"] < stop)
        lo, hi = int(notes["pitch"].min()), int(notes["pitch"].max())
        span = max(hi - lo + 1, 12)
        base = n - 1 - lane
        height = 0.9 / span
        for t, d, p, g in zip(notes["time"], notes["duration"], notes["pitch"], generated):
            x0, x1 = t / tpq, (t + max(int(d), 1)) / tpq
            y0 = base + 0.05 + (int(p) - lo) / span * 0.9
            polys[bool(g)].append([(x0, y0), (x1, y0), (x1, y0 + height), (x0, y0 + height)])
    for generated, color in ((False, ORIGINAL_COLOR), (True, GENERATED_COLOR)):
        if polys[generated]:
            ax.add_collection(PolyCollection(polys[generated], facecolors=color, edgecolors=color, linewidths=0.3))
    if bar_ticks is not None:
        for t in bar_ticks:
            ax.axvline(t / tpq, color="#dddddd", linewidth=0.5, zorder=0)
    for lane in range(1, n):
        ax.axhline(lane, color="#999999", linewidth=0.5)
    ax.set_xlim(0, end)
    ax.set_ylim(0, n)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(len(tracks))])
    ax.set_yticklabels(
        [f"{i}: {'drums' if t.is_drum else t.name or f'program {t.program}'}" for i, t in enumerate(tracks)], fontsize=8
    )
    ax.set_xlabel("quarter notes")
    ax.legend(
        handles=[Patch(color=ORIGINAL_COLOR, label="original"), Patch(color=GENERATED_COLOR, label="generated")],
        loc="upper right",
        fontsize=8,
    )
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _rect(x: float, y: float, w: float, h: float, color: str, alpha: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=color, edgecolor="none", alpha=alpha, zorder=0)
