"""Markdown table of the alignment ablation's evaluations (experiments/alignment/run.sh).

python experiments/alignment/table.py EVAL_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def row(name: str, m: dict) -> str:
    lik, ic = m["likelihood"], m["likelihood"]["infill_context"]
    ratio = ic["ratio_to_real"]
    real = ic["conditions"]["real"]["bits_per_note"]
    listening = m["listening"]["rows"]
    model, kept = listening["model"], listening["model, track's range and monophony kept"]
    return (
        f"| {name} | {fmt(lik['model']['bits_per_note'], 2)} | {fmt(real, 2)} | {fmt(1 / ratio['alone'], 2)}x | "
        f"{fmt(ratio['shifted'], 2)}x | {fmt(ratio['other_piece'], 2)}x | {fmt(model['onset_pitch_f1'])} | "
        f"{fmt(model['onset_f1'])} | {fmt(model['consonance'])} | {fmt(model['in_range'])} | "
        f"{fmt(kept['onset_pitch_f1'])} | {fmt(kept['consonance'])} |"
    )


if __name__ == "__main__":
    runs = sorted(Path(sys.argv[1]).glob("*/metrics.json"))
    print(
        "| arm | bits/note | fill bits/note | with / without others | shifted / real | other piece / real "
        "| onset+pitch F1 | onset F1 | consonance | in range ±3 | constrained: onset+pitch F1 | constrained: consonance |"
    )
    print("|---" * 12 + "|")
    for f in runs:
        print(row(f.parent.name, json.loads(f.read_text())))
