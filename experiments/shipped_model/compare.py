"""Models side by side on one test split: the model card's targets table. The first evaluation
folder is the model judged against the targets; the others are columns beside it, the last one
the demo model (the bits/note target is relative to it).

    python experiments/shipped_model/compare.py runs/eval/music21_aligned runs/eval/music21_shipped \
        runs/eval/demo_on_music21 --names "this model" "previous shipped model" "demo model"

Each folder holds the `metrics.json` of `python -m mmm.evaluate`. Rows a folder lacks (an
evaluation made before the listening benchmark existed) read n/a.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmm.evaluate.listening import BASELINE_ROWS, REAL_ROW

MODEL, CONSTRAINED = "model", "model, track's range and monophony kept"
NAN = float("nan")


def figures(m: dict) -> dict[str, float]:
    """The measures the targets are about, from one evaluation's metrics."""
    lik, ctl, stats = m["likelihood"], m["controls"], m["musical_stats"]
    ctx, bar = lik["infill_context"], ctl["bar"]
    out = {
        "bits_per_note": lik["model"]["bits_per_note"],
        "bigram_bits_per_note": lik["bigram"]["bits_per_note"],
        "empty_beats_generated": stats["empty_beat_rate"]["generated_mean"],
        "empty_beats_real": stats["empty_beat_rate"]["real_mean"],
        "pitch_in_range": m["pitch_in_context_range"]["within_3_semitones"],
        "density_spearman": bar["note_density"]["with_control"]["spearman"] or NAN,
        "density_within_1": bar["note_density"]["with_control"]["within_1"],
        "polyphony_min_exact": bar["polyphony_min"]["with_control"]["exact"],
        "polyphony_max_exact": bar["polyphony_max"]["with_control"]["exact"],
        "fill_real": ctx["with_context"]["bits_per_note"],
        "fill_alone": ctx["without_context"]["bits_per_note"],
        "fill_shifted": ctx.get("conditions", {}).get("shifted", {}).get("bits_per_note", NAN),
        "exact_bars": m["structure"]["all"]["exact_bars"],
    }
    rows = (m.get("listening") or {}).get("rows", {})
    for key in ("onset_pitch_f1", "onset_f1", "consonance", "in_range"):
        out[f"model_{key}"] = rows.get(MODEL, {}).get(key, NAN)
        out[f"constrained_{key}"] = rows.get(CONSTRAINED, {}).get(key, NAN)
        out[f"best_baseline_{key}"] = max((rows[b][key] for b in BASELINE_ROWS if b in rows), default=NAN)
        out[f"real_{key}"] = rows.get(REAL_ROW, {}).get(key, NAN)
    return out


def fmt(x: float, pct: bool = False) -> str:
    if x != x:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def rows(demo: dict[str, float]) -> list[tuple[str, callable, str, callable]]:
    """(measure, how a column shows it, target, whether a model's figures meet it)."""
    return [
        (
            "bits/note (bigram baseline)",
            lambda f: f"{fmt(f['bits_per_note'])} ({fmt(f['bigram_bits_per_note'])})",
            "≤ 0.75 × demo",
            lambda f: f["bits_per_note"] <= 0.75 * demo["bits_per_note"],
        ),
        (
            "fill bits/note: real prompt / target alone / others a bar late",
            lambda f: f"{fmt(f['fill_real'])} / {fmt(f['fill_alone'])} / {fmt(f['fill_shifted'])}",
            "",
            None,
        ),
        (
            "fill bits/note with the other tracks ÷ without",
            lambda f: f"{f['fill_real'] / f['fill_alone']:.3f}x",
            "≤ 0.75x",
            lambda f: f["fill_real"] <= 0.75 * f["fill_alone"],
        ),
        (
            "fill bits/note, other tracks a bar late ÷ real",
            lambda f: f"{f['fill_shifted'] / f['fill_real']:.3f}x",
            "≥ 1.15x",
            lambda f: f["fill_shifted"] >= 1.15 * f["fill_real"],
        ),
        (
            "listening: onset+pitch F1 (best naive baseline)",
            lambda f: f"{fmt(f['model_onset_pitch_f1'])} ({fmt(f['best_baseline_onset_pitch_f1'])})",
            "above every baseline",
            lambda f: f["model_onset_pitch_f1"] > f["best_baseline_onset_pitch_f1"],
        ),
        (
            "listening: onset F1 (best naive baseline)",
            lambda f: f"{fmt(f['model_onset_f1'])} ({fmt(f['best_baseline_onset_f1'])})",
            "above every baseline",
            lambda f: f["model_onset_f1"] > f["best_baseline_onset_f1"],
        ),
        (
            "listening: consonance with the real other tracks (real bars)",
            lambda f: f"{fmt(f['model_consonance'])} ({fmt(f['real_consonance'])})",
            "within 0.05 of real",
            lambda f: f["model_consonance"] >= f["real_consonance"] - 0.05,
        ),
        (
            "listening: pitches in the track's range ±3, unconstrained / constrained",
            lambda f: f"{fmt(f['model_in_range'], True)} / {fmt(f['constrained_in_range'], True)}",
            "≥ 95% / 100%",
            lambda f: f["model_in_range"] >= 0.95 and f["constrained_in_range"] == 1.0,
        ),
        (
            "API infills: notes within the track's range ±3 (constrained by default)",
            lambda f: fmt(f["pitch_in_range"], True),
            "100%",
            lambda f: f["pitch_in_range"] == 1.0,
        ),
        (
            "empty beats, uncontrolled infills (real bars)",
            lambda f: f"{fmt(f['empty_beats_generated'], True)} ({fmt(f['empty_beats_real'], True)})",
            "≤ 2 × real",
            lambda f: f["empty_beats_generated"] <= 2 * f["empty_beats_real"],
        ),
        (
            "bar note density: Spearman / exact or ±1",
            lambda f: f"{fmt(f['density_spearman'])} / {fmt(f['density_within_1'], True)}",
            "≥ 0.7 / ≥ 80%",
            lambda f: f["density_spearman"] >= 0.7 and f["density_within_1"] >= 0.8,
        ),
        (
            "bar polyphony min / max: exact",
            lambda f: f"{fmt(f['polyphony_min_exact'], True)} / {fmt(f['polyphony_max_exact'], True)}",
            "≥ 90%",
            lambda f: min(f["polyphony_min_exact"], f["polyphony_max_exact"]) >= 0.9,
        ),
        (
            "outputs with exactly the requested bars",
            lambda f: fmt(f["exact_bars"], True),
            "100%",
            lambda f: f["exact_bars"] == 1.0,
        ),
    ]


def table(folders: list[Path], names: list[str]) -> list[str]:
    models = [figures(json.loads((f / "metrics.json").read_text())) for f in folders]
    lines = [
        "| measure | " + " | ".join(names) + " | target | " + f"{names[0]} meets it |",
        "|---" * (len(names) + 3) + "|",
    ]
    for measure, show, target, meets in rows(models[-1]):
        verdict = "" if meets is None else ("met" if meets(models[0]) else "**not met**")
        lines.append(f"| {measure} | " + " | ".join(show(f) for f in models) + f" | {target} | {verdict} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", type=Path, nargs="+", help="evaluation folders: the judged model first, the demo last")
    p.add_argument("--names", nargs="+", help="column names (default: the folders' names)")
    args = p.parse_args()
    names = args.names or [f.name for f in args.folders]
    if len(names) != len(args.folders):
        p.error(f"--names gives {len(names)} names for {len(args.folders)} folders")
    print("\n".join(table(args.folders, names)))


if __name__ == "__main__":
    main()
