"""Training throughput of MMMTransformer vs transformers' MistralForCausalLM (same weights, same
batches, one run), and samples/s of the sequence builder vs the slow miditok reference.

    python experiments/train_throughput/bench.py --midi ../shared/midi/multitrack --write-readme

Figures are ratios measured in the same run, steps interleaved (ours, HF, ours, ...) so that
load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Compile times are measured cold: a fresh Inductor cache for this run (a second training run
# of the same model would find its kernels cached and compile faster).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mmm-bench-inductor-"))

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the slow reference path lives with the tests

from reference import reference_sample

from mmm.data.datamodule import collate, pack
from mmm.data.prepare import train_tokenizer
from mmm.data.sequences import (
    IGNORE_INDEX,
    SequenceBuilder,
)
from mmm.data.store import Store
from mmm.model import MMMTransformer, model_config_from_preset, next_token_nll
from mmm.model.hf import to_hf_mistral
from mmm.tokenizer import Vocab, load_tokenizer


def config(*overrides: str):
    """The repository's `python -m mmm.train_tokenizer` config (configs/tokenizer.yaml), composed
    by Hydra with `overrides` on a folder source."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("tokenizer", overrides=["data=folder", *overrides])


def build_data(midi: Path, work: Path, vocab_size: int) -> tuple[Path, Path]:
    """Store and BPE tokenizer of the folder `midi` under `work`, as `python -m mmm.train_tokenizer` makes them."""
    cfg = config(
        f"data.path={midi.resolve()}",
        f"data.store={work / 'store'}",
        f"tokenizer.vocab_size={vocab_size}",
        f"tokenizer.path={work / 'tokenizer.json'}",
    )
    train_tokenizer(cfg.data, cfg.tokenizer)
    return work / "store", work / "tokenizer.json"


def sequences_config() -> dict:
    """`data.sequences` of the repository's configs (configs/data/common.yaml), composed by Hydra."""
    return OmegaConf.to_container(config("data.path=unused").data.sequences, resolve=True)


def step_time(model, batch, autocast: bool, loss_fn=None) -> float:
    """One forward + backward; `loss_fn(model, batch)` is ours (packed or not, compiled or not),
    None is transformers' model on the padded batch."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if loss_fn is None:
            logits = model(batch["input_ids"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        else:
            loss = loss_fn(model, batch)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - start


def ours_loss(nll_fn):
    def loss(model, batch):
        nll = nll_fn(
            model, batch["input_ids"], batch["labels"], IGNORE_INDEX, reduction="sum", doc_ids=batch.get("doc_ids")
        )
        return nll / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    return loss


def useful_tokens(batch) -> int:
    """Ids of real samples in the batch (padding excluded)."""
    return int(sum(batch["lengths"]))


def bench_models(
    vocab: Vocab, samples: list[list[dict]], preset: str, seq_len: int, steps: int, autocast: bool, full: bool
) -> dict:
    """Useful tokens/s of ways to train on the same samples, steps interleaved: transformers'
    Mistral on today's padded batches; ours packed into one row per batch (the loader's `pack`)
    and compiled as `compile=true` compiles; with `full`, also ours on the padded batches, ours
    packed uncompiled, and ours packed into rows of `seq_len` (fixed shapes, compiled for them)."""
    torch.manual_seed(0)
    ours = MMMTransformer(model_config_from_preset(preset, vocab_size=vocab.size, max_seq_len=seq_len))
    hf = to_hf_mistral(ours, attn_implementation="sdpa")
    padded = [with_lengths(collate(items, vocab.pad), items) for items in samples]
    packed = [with_lengths(pack(items, vocab.pad), items) for items in samples]
    variants = {  # name: (model, batches, loss_fn)
        "mistral_padded": (hf, padded, None),
        "ours_packed_compiled": (ours, packed, ours_loss(torch.compile(next_token_nll, dynamic=True))),
    }
    rows = [with_lengths(pack(items, vocab.pad, seq_len), items) for items in samples]
    if full:
        variants["ours_padded"] = (ours, padded, ours_loss(next_token_nll))
        variants["ours_packed"] = (ours, packed, ours_loss(next_token_nll))
        variants["ours_rows_compiled"] = (ours, rows, ours_loss(torch.compile(next_token_nll, dynamic=None)))
    # Compilation: the first step of each compiled variant, once per shape it compiles for (dynamic
    # shapes: one; fixed rows: one per row count), less as many normal steps. It is their warm-up.
    compile_s = {}
    for name, (model, batches, loss_fn) in variants.items():
        start = time.perf_counter()
        shapes = list({tuple(b["input_ids"].shape): b for b in batches}.values())
        warm_up = shapes if name == "ours_rows_compiled" else batches[:1]
        for b in warm_up:
            step_time(model, b, autocast, loss_fn)
        if "compiled" in name:
            compile_s[name] = (time.perf_counter() - start, len(warm_up))
    times = {name: [] for name in variants}
    for i in range(steps):
        for name, (model, batches, loss_fn) in variants.items():
            t = step_time(model, batches[i % len(batches)], autocast, loss_fn)
            times[name].append((t, useful_tokens(batches[i % len(batches)])))
    rate = {name: sum(n for _, n in v) / sum(t for t, _ in v) for name, v in times.items()}
    compile_s = {
        name: total - steps_run * statistics.median(t for t, _ in times[name])
        for name, (total, steps_run) in compile_s.items()
    }
    return {
        "preset": preset,
        "params": ours.num_parameters(),
        "precision": "bf16 autocast" if autocast else "fp32",
        **{f"{k}_tok_s": v for k, v in rate.items()},
        **{f"ratio_{k}": v / rate["mistral_padded"] for k, v in rate.items()},
        "ratio": rate["ours_packed_compiled"] / rate["mistral_padded"],
        "compile_s": compile_s["ours_packed_compiled"],
        "compile_rows_s": compile_s.get("ours_rows_compiled"),
        "ids_padded": sum(b["input_ids"].numel() for b in padded) / len(padded),
        "ids_packed": sum(b["input_ids"].numel() for b in packed) / len(packed),
        "ids_rows": sum(b["input_ids"].numel() for b in rows) / len(rows),
    }


def rate_cell(r: dict, name: str) -> str:
    return f"{r[name + '_tok_s']:,.0f} ({r['ratio_' + name]:.2f}x)" if name + "_tok_s" in r else "(full run)"


def with_lengths(batch: dict, items: list[dict]) -> dict:
    return {**batch, "lengths": [len(b["input_ids"]) for b in items]}


def padding_fraction(samples: list[list[dict]], pad_to: int | None = None) -> float:
    """Share of the ids of today's right-padded batches that are padding (`pad_to`: rows of that length)."""
    useful = sum(len(b["input_ids"]) for items in samples for b in items)
    total = sum(len(items) * (pad_to or max(len(b["input_ids"]) for b in items)) for items in samples)
    return 1 - useful / total


def length_curve(vocab_size: int, preset: str, lengths: list[int], tokens: int, steps: int) -> list[dict]:
    """Training tokens/s vs row length at a fixed number of tokens per batch (full rows of
    random ids, no padding): ours compiled vs transformers' Mistral, bf16 autocast."""
    out = []
    for length in lengths:
        torch.manual_seed(0)
        ours = MMMTransformer(model_config_from_preset(preset, vocab_size=vocab_size, max_seq_len=length))
        hf = to_hf_mistral(ours, attn_implementation="sdpa")
        rows = max(1, tokens // length)
        ids = torch.randint(0, vocab_size, (rows, length))
        batch = {"input_ids": ids, "labels": ids.clone(), "doc_ids": torch.zeros_like(ids)}
        loss_fn = ours_loss(torch.compile(next_token_nll, dynamic=True))
        step_time(ours, batch, True, loss_fn)  # compiles
        times = {"ours": [], "hf": []}
        for _i in range(steps + 1):
            times["ours"].append(step_time(ours, batch, True, loss_fn))
            times["hf"].append(step_time(hf, batch, True))
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        out.append(
            {
                "length": length,
                "rows": rows,
                "ours_tok_s": ids.numel() / med["ours"],
                "hf_tok_s": ids.numel() / med["hf"],
            }
        )
    return out


def plot_curve(curve: list[dict], preset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [r["length"] for r in curve]
    ax.plot(x, [r["ours_tok_s"] for r in curve], "o-", label="ours (packed rows, compiled)")
    ax.plot(x, [r["hf_tok_s"] for r in curve], "s--", label="transformers Mistral")
    ax.set(
        xscale="log",
        xlabel="sequence length (ids per row; 8,192 ids per step)",
        ylabel="training tokens/s",
        title=f"{preset}: training tokens/s vs sequence length",
    )
    ax.minorticks_off()  # log-scale minor labels would overprint the lengths
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_loader(store: Store, tokenizer, vocab: Vocab, seq_len: int, n: int) -> dict:
    builder = SequenceBuilder(vocab, sequences_config(), max_seq_len=10**9)  # no length fitting: same work both ways
    rng = random.Random(0)
    chunks = [store[i % len(store)] for i in range(n)]
    specs = [builder.draw_spec(c, rng) for c in chunks]
    start = time.perf_counter()
    fast = [builder.build(c, s, rng) for c, s in zip(chunks, [s.__class__(**vars(s)) for s in specs])]
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    slow = [reference_sample(c, s, tokenizer, vocab) for c, s in zip(chunks, specs)]
    slow_s = time.perf_counter() - start
    same = all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(fast, slow))
    return {
        "samples": n,
        "fast_per_s": n / fast_s,
        "reference_per_s": n / slow_s,
        "ratio": slow_s / fast_s,
        "identical": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--midi", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="samples per step (the music21 recipe's batch)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=6, help="distinct batches, cycled through")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--presets", default="tiny,small,base")
    ap.add_argument("--curve-preset", default="tiny")
    ap.add_argument("--curve-lengths", default="256,512,1024,2048")
    ap.add_argument("--loader-samples", type=int, default=60)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small (the shipped model's size) only, Mistral vs ours packed + compiled, 2 steps, no curve (under 3 minutes)",
    )
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    if args.quick:
        # small only: each preset costs about a minute of cold compilation on 2 cores.
        args.presets, args.steps, args.batches, args.loader_samples, args.curve_lengths = "small", 2, 2, 20, ""
    with tempfile.TemporaryDirectory() as tmp:
        store_path, tok_path = build_data(args.midi, Path(tmp), args.vocab_size)
        tokenizer = load_tokenizer(tok_path)
        vocab = Vocab(tokenizer)
        store = Store(store_path, "train")
        builder = SequenceBuilder(vocab, sequences_config(), args.seq_len)
        rng = random.Random(1)
        samples = []  # the same real samples for every variant, as the training loader draws them
        for b in range(args.batches):
            items = []
            for i in range(args.batch):
                index = (b * args.batch + i) % len(store)
                ids, labels = builder(store[index], rng)
                items.append({"input_ids": ids, "labels": labels, "num_notes": 0, "index": index})
            samples.append(items)
        rows = [
            bench_models(vocab, samples, p, args.seq_len, args.steps, True, full=not args.quick)
            for p in args.presets.split(",")
        ]
        loader = bench_loader(store, tokenizer, vocab, args.seq_len, args.loader_samples)
    lengths = [int(v) for v in args.curve_lengths.split(",") if v]
    curve = length_curve(vocab.size, args.curve_preset, lengths, 8192, max(2, args.steps // 2)) if lengths else []
    pad = padding_fraction(samples)
    lines = [
        f"Today's padded batches ({args.batch} samples, right-padded to the longest): {pad:.1%} padding "
        f"({padding_fraction(samples, args.seq_len):.1%} of rows of {args.seq_len}).",
        "",
        "Useful tokens/s (padding excluded) of one training step, forward + backward, on the same samples; "
        "ours packed = the batch's samples end to end in one row (`data.loader.pack`), compiled as `compile=true` does:",
        "",
        "| model | params | Mistral, padded | ours, padded | ours, packed | ours, packed + compiled | **ratio** (packed + compiled / Mistral) | ids per step padded → packed | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['preset']} | {r['params']:,} | {r['mistral_padded_tok_s']:,.0f} | {rate_cell(r, 'ours_padded')} | "
            f"{rate_cell(r, 'ours_packed')} | "
            f"{r['ours_packed_compiled_tok_s']:,.0f} | **{r['ratio']:.2f}x** | {r['ids_padded']:,.0f} → {r['ids_packed']:,.0f} | {r['compile_s']:.0f} |"
            for r in rows
        ),
    ]
    if "ours_rows_compiled_tok_s" in rows[0]:
        lines += [
            "",
            f"The fixed-shape alternative: the same samples packed into rows of {args.seq_len} (first fit decreasing), compiled for those shapes:",
            "",
            "| model | ours, rows of fixed length + compiled | ratio / Mistral | ids per step | compile (s) |",
            "|---|---|---|---|---|",
            *(
                f"| {r['preset']} | {r['ours_rows_compiled_tok_s']:,.0f} | {r['ratio_ours_rows_compiled']:.2f}x | "
                f"{r['ids_rows']:,.0f} | {r['compile_rows_s']:.0f} |"
                for r in rows
            ),
        ]
    lines += [
        "",
        "| sequence builder | samples/s |",
        "|---|---|",
        f"| fast path (token ids) | {loader['fast_per_s']:.1f} |",
        f"| slow reference (miditok on the augmented Score) | {loader['reference_per_s']:.2f} |",
        f"| **ratio** | **{loader['ratio']:.1f}x** (identical outputs: {loader['identical']}) |",
    ]
    if curve:
        lines += [
            "",
            f"Training tokens/s vs sequence length ({args.curve_preset}, 8,192 ids per batch, bf16 autocast; `length_curve.png`):",
            "",
            "| length | rows | ours (packed, compiled) | Mistral | ratio |",
            "|---|---|---|---|---|",
            *(
                f"| {c['length']} | {c['rows']} | {c['ours_tok_s']:,.0f} | {c['hf_tok_s']:,.0f} | {c['ours_tok_s'] / c['hf_tok_s']:.2f}x |"
                for c in curve
            ),
        ]
        plot_curve(curve, args.curve_preset, Path(__file__).with_name("length_curve.png"))
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        text = readme.read_text()
        marker = "<!-- results -->"
        head = text.split(marker)[0]
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, load average at the end {load}"
        setup = f"{args.batches} batches of {args.batch} real samples (≤ {args.seq_len} ids), bf16 autocast; {args.steps} timed steps each, interleaved"
        readme.write_text(
            f"{head}{marker}\nRun of {time.strftime('%Y-%m-%d')}. Machine: {machine}; {setup}.\n\n{table}\n"
        )
    print(
        "ratios: "
        + ", ".join(f"{r['preset']} {r['ratio']:.2f}x (compile {r['compile_s']:.0f} s)" for r in rows)
        + f"; padding {pad:.1%}; builder {loader['ratio']:.0f}x"
    )


if __name__ == "__main__":
    main()
