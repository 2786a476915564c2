"""The shipped model beside the demo model on one test split: the model card's targets table.

python experiments/shipped_model/compare.py runs/eval/music21 runs/eval/demo_on_music21
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def figures(m: dict) -> dict[str, float | None]:
    lik, ctl, stats = m["likelihood"], m["controls"], m["musical_stats"]
    ctx = lik["infill_context"]
    bar = ctl["bar"]
    return {
        "bits_per_note": lik["model"]["bits_per_note"],
        "bigram_bits_per_note": lik["bigram"]["bits_per_note"],
        "empty_beats_generated": stats["empty_beat_rate"]["generated_mean"],
        "empty_beats_real": stats["empty_beat_rate"]["real_mean"],
        "pitch_in_range": m["pitch_in_context_range"]["within_3_semitones"],
        "density_spearman": bar["note_density"]["with_control"]["spearman"],
        "density_within_1": bar["note_density"]["with_control"]["within_1"],
        "polyphony_min_exact": bar["polyphony_min"]["with_control"]["exact"],
        "polyphony_max_exact": bar["polyphony_max"]["with_control"]["exact"],
        "fill_bits_with_context": ctx["with_context"]["bits_per_note"],
        "fill_bits_without_context": ctx["without_context"]["bits_per_note"],
        "exact_bars": m["structure"]["all"]["exact_bars"],
    }


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shipped", type=Path)
    p.add_argument("demo", type=Path)
    args = p.parse_args()
    s, d = figures(load(args.shipped)), figures(load(args.demo))
    ok = lambda b: "met" if b else "**not met**"  # noqa: E731
    gain = lambda f: 1 - f["fill_bits_with_context"] / f["fill_bits_without_context"]  # noqa: E731
    rows = [
        (
            "bits/note (bigram baseline)",
            f"{fmt(s['bits_per_note'])} ({fmt(s['bigram_bits_per_note'])})",
            f"{fmt(d['bits_per_note'])} ({fmt(d['bigram_bits_per_note'])})",
            "≤ 0.75 × demo",
            ok(s["bits_per_note"] <= 0.75 * d["bits_per_note"]),
        ),
        (
            "empty beats, uncontrolled infills (real bars)",
            f"{fmt(s['empty_beats_generated'], True)} ({fmt(s['empty_beats_real'], True)})",
            f"{fmt(d['empty_beats_generated'], True)} ({fmt(d['empty_beats_real'], True)})",
            "≤ 2 × real",
            ok(s["empty_beats_generated"] <= 2 * s["empty_beats_real"]),
        ),
        (
            "generated notes within the track's range ±3",
            fmt(s["pitch_in_range"], True),
            fmt(d["pitch_in_range"], True),
            "≥ 95%",
            ok(s["pitch_in_range"] >= 0.95),
        ),
        (
            "bar note density: Spearman",
            fmt(s["density_spearman"]),
            fmt(d["density_spearman"]),
            "≥ 0.7",
            ok((s["density_spearman"] or 0) >= 0.7),
        ),
        (
            "bar note density: exact or ±1",
            fmt(s["density_within_1"], True),
            fmt(d["density_within_1"], True),
            "≥ 80%",
            ok(s["density_within_1"] >= 0.8),
        ),
        (
            "bar polyphony min / max: exact",
            f"{fmt(s['polyphony_min_exact'], True)} / {fmt(s['polyphony_max_exact'], True)}",
            f"{fmt(d['polyphony_min_exact'], True)} / {fmt(d['polyphony_max_exact'], True)}",
            "≥ 90%",
            ok(min(s["polyphony_min_exact"], s["polyphony_max_exact"]) >= 0.9),
        ),
        (
            "fill bits/note with / without the other tracks",
            f"{fmt(s['fill_bits_with_context'])} / {fmt(s['fill_bits_without_context'])} ({gain(s):+.1%})",
            f"{fmt(d['fill_bits_with_context'])} / {fmt(d['fill_bits_without_context'])} ({gain(d):+.1%})",
            "≥ 10% lower with them",
            ok(gain(s) >= 0.10),
        ),
        (
            "outputs with exactly the requested bars",
            fmt(s["exact_bars"], True),
            fmt(d["exact_bars"], True),
            "100%",
            ok(s["exact_bars"] == 1.0),
        ),
    ]
    print("| measure | shipped model | demo model | target | shipped model meets it |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
