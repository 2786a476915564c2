"""Markdown table of the recipe ablation: one row per evaluated model (folders under EVAL)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(name: str, m: dict) -> str:
    lik, ctl, stats = m["likelihood"], m["controls"], m["musical_stats"]
    ctx = lik["infill_context"]
    gain = 1 - ctx["with_context"]["bits_per_note"] / ctx["without_context"]["bits_per_note"]
    density = ctl["bar"]["note_density"]["with_control"]
    cells = [
        name,
        f"{lik['model']['bits_per_note']:.2f}",
        f"{stats['empty_beat_rate']['generated_mean']:.1%} (real {stats['empty_beat_rate']['real_mean']:.1%})",
        f"{density['spearman']:.2f}" if density["spearman"] is not None else "n/a",
        f"{density['within_1']:.2f}",
        f"{ctl['bar']['polyphony_max']['with_control']['exact']:.2f}",
        f"{gain:+.1%}",
        f"{m['structure']['all']['exact_bars']:.0%}",
    ]
    return "| " + " | ".join(cells) + " |"


def main(root: str) -> None:
    print(
        "| model | bits/note | empty beats, uncontrolled infills | bar density Spearman | density exact-or-±1 | polyphony_max exact | fill NLL gain from context | exact bars |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for folder in sorted(Path(root).iterdir()):
        metrics = folder / "metrics.json"
        if metrics.is_file():
            print(row(folder.name, json.loads(metrics.read_text())))


if __name__ == "__main__":
    main(sys.argv[1])
