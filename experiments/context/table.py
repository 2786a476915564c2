"""Markdown tables of experiments/context/run.sh's results: per checkpoint, the fill bits/note
under the four prompts and the listening benchmark; per design, the probe.

    python experiments/context/table.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = {
    "real": "real prompt",
    "shifted": "other tracks shifted one bar",
    "other_piece": "other tracks of another piece",
    "alone": "target alone",
}
COLUMNS = {
    "consonance": "consonance",
    "onset_pitch_f1": "onset+pitch F1",
    "onset_f1": "onset F1",
    "onset_pitch_class_f1": "pitch-class F1",
    "in_range": "in range ±3",
    "notes_per_original": "notes / original",
}


def fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def context_tables(out: Path) -> list[str]:
    lines = []
    for metrics_file in sorted((out / "eval").glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        ic = metrics["likelihood"]["infill_context"]
        lines += [
            f"### {metrics_file.parent.name}",
            "",
            f"Fill bits/note of {ic['samples']} infill samples of the test split, the same target ids after each prompt:",
            "",
            "| prompt | bits/note | vs real |",
            "|---|---|---|",
        ]
        real = ic["conditions"]["real"]["bits_per_note"]
        for key, label in PROMPTS.items():
            value = ic["conditions"][key]["bits_per_note"]
            lines.append(f"| {label} | {fmt(value)} | {value / real:.2f}x |")
        listening = metrics.get("listening")
        if listening:
            s = listening["settings"]
            lines += [
                "",
                f"Listening: {s['bars']} bars in the middle of every track of {s['pieces']} test pieces, seeds "
                f"{s['seeds']}, judged against the real piece:",
                "",
                "| | " + " | ".join(COLUMNS.values()) + " |",
                "|---" * (len(COLUMNS) + 1) + "|",
            ]
            for name, row in listening["rows"].items():
                lines.append(f"| {name} | " + " | ".join(fmt(row[k]) for k in COLUMNS) + " |")
        lines.append("")
    return lines


def probe_table(out: Path) -> list[str]:
    files = sorted(out.glob("probe_*.json"))
    if not files:
        return []
    lines = [
        "### Probe: fill bits/note when the answer is in another track",
        "",
        "| design | doubling: real prompt | shifted | alone | bass: real prompt | alone |",
        "|---|---|---|---|---|---|",
    ]
    for f in files:
        r = json.loads(f.read_text())
        d, b = r["doubling"]["bits_per_note"], r["bass"]["bits_per_note"]
        lines.append(
            f"| {f.stem.removeprefix('probe_')} | {fmt(d['real'])} | {fmt(d['shifted'])} | {fmt(d['alone'])} | "
            f"{fmt(b['real'])} | {fmt(b['alone'])} |"
        )
    return lines


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print("\n".join(context_tables(out) + probe_table(out)))
