"""Write the GPU check's results into its README (between the RESULTS markers); run.sh calls it."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

START, END = "<!-- RESULTS -->", "<!-- /RESULTS -->"


def training(work: Path, name: str) -> str:
    config = work / "runs" / name / "model" / "config.json"
    if not config.is_file():
        return f"| {name} | (no model folder: see log.txt) | | |"
    t = json.loads(config.read_text()).get("training", {})
    return f"| {name} | {t.get('global_step')} | {t.get('initial_val_loss', float('nan')):.3f} | {t.get('val_loss', float('nan')):.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seconds", type=int, required=True)
    parser.add_argument("--readme", type=Path, required=True)
    args = parser.parse_args()
    b = json.loads((args.work / "bench.json").read_text())
    lines = [
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {b['gpu']} (torch {b['torch']}), "
        f"all steps in {args.seconds} s.",
        "",
        f"`base` ({b['parameters']:,} parameters at vocabulary {b['vocab']:,}), bf16 autocast, batch "
        f"{b['batch']} x {b['seq']}, fused AdamW; peak bf16 assumed {b['peak_bf16_tflops']} TFLOP/s:",
        "",
        "| attention | tokens/s | MFU | peak memory (GB) |",
        "|---|---|---|---|",
    ]
    for attention in ("flash", "sdpa"):
        r = b.get(attention)
        if r:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {attention} | {r['tokens_per_s']:,} | {mfu} | {r['peak_memory_gb']} |")
    logits = b.get("logits_flash_vs_sdpa")
    if logits:
        lines += [
            "",
            f"Logits, flash-attn vs SDPA (same weights, 4 x 1024): max |diff| {logits['max_abs_diff']:.4f}, "
            f"mean {logits['mean_abs_diff']:.5f}, argmax agreement {100 * logits['argmax_agreement']:.2f}%, "
            f"within rtol=atol=2e-2: {logits['within_tolerance']}.",
        ]
    else:
        lines += ["", "flash-attn is not installed: SDPA only."]
    lines += [
        "",
        "Demo corpus, `base`, context 1024 (validation loss in nats/token):",
        "",
        "| run | steps | val loss before | val loss after |",
        "|---|---|---|---|",
        training(args.work, "flash"),
        training(args.work, "sdpa"),
        training(args.work, "deepspeed"),
        "",
        f"The DeepSpeed checkpoint was exported to `{args.work}/runs/deepspeed/exported` and infilled "
        "bars 4-8 of BWV 1.6's second track; the full log is `{args.work}/log.txt`.",
    ]
    text = args.readme.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.readme.write_text(head + START + "\n" + "\n".join(lines) + "\n" + END + tail)


if __name__ == "__main__":
    main()
