"""Training throughput of MMMTransformer vs transformers' MistralForCausalLM (same weights, same
batches, one run), and samples/s of the sequence builder vs the slow miditok reference.

    python experiments/train_throughput/bench.py --midi ../shared/midi/multitrack --write-readme

Figures are ratios measured in the same run, steps interleaved (ours, HF, ours, ...) so that
load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the slow reference path lives with the tests

from reference import reference_sample  # noqa: E402

from mmm.data.datamodule import collate  # noqa: E402
from mmm.data.sequences import SequenceBuilder  # noqa: E402
from mmm.data.store import Store  # noqa: E402
from mmm.model import MMMTransformer, model_config_from_preset, to_hf_mistral  # noqa: E402
from mmm.tokenizer import Vocab, load_tokenizer  # noqa: E402
from mmm.data.prepare import train_tokenizer  # noqa: E402


def config(*overrides: str):
    """The repository's `python -m mmm.train_tokenizer` config (configs/tokenizer.yaml), composed
    by Hydra with `overrides` on a folder source."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("tokenizer", overrides=["data=folder", *overrides])


def build_data(midi: Path, work: Path, vocab_size: int) -> tuple[Path, Path]:
    """Store and BPE tokenizer of the folder `midi` under `work`, as `python -m mmm.train_tokenizer` makes them."""
    cfg = config(f"data.path={midi.resolve()}", f"data.store={work / 'store'}",
                 f"tokenizer.vocab_size={vocab_size}", f"tokenizer.path={work / 'tokenizer.json'}")
    train_tokenizer(cfg.data, cfg.tokenizer)
    return work / "store", work / "tokenizer.json"


def sequences_config() -> dict:
    """`data.sequences` of the repository's configs (configs/data/common.yaml), composed by Hydra."""
    return OmegaConf.to_container(config("data.path=unused").data.sequences, resolve=True)


def step_time(model, batch, autocast: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch["input_ids"])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - start


def bench_models(vocab: Vocab, batches, preset: str, seq_len: int, steps: int, autocast: bool) -> dict:
    torch.manual_seed(0)
    ours = MMMTransformer(model_config_from_preset(preset, vocab_size=vocab.size, max_seq_len=seq_len))
    hf = to_hf_mistral(ours, attn_implementation="sdpa")
    times = {"ours": [], "hf": []}
    for i in range(steps + 2):  # 2 warm-up steps each
        batch = batches[i % len(batches)]
        for name, model in (("ours", ours), ("hf", hf)):
            t = step_time(model, batch, autocast)
            if i >= 2:
                times[name].append(t)
    tokens = sum(b["input_ids"].numel() for b in batches) / len(batches)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset, "params": ours.num_parameters(), "precision": "bf16 autocast" if autocast else "fp32",
        "ours_tok_s": tokens / med["ours"], "hf_tok_s": tokens / med["hf"], "ratio": med["hf"] / med["ours"],
    }


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
    return {"samples": n, "fast_per_s": n / fast_s, "reference_per_s": n / slow_s, "ratio": slow_s / fast_s, "identical": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--midi", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--loader-samples", type=int, default=60)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        store_path, tok_path = build_data(args.midi, Path(tmp), args.vocab_size)
        tokenizer = load_tokenizer(tok_path)
        vocab = Vocab(tokenizer)
        store = Store(store_path, "train")
        builder = SequenceBuilder(vocab, sequences_config(), args.seq_len)
        rng = random.Random(1)
        batches = []
        for b in range(4):
            items = []
            for i in range(args.batch):
                index = (b * args.batch + i) % len(store)
                ids, labels = builder(store[index], rng)
                items.append({"input_ids": ids, "labels": labels, "num_notes": 0, "index": index})
            batches.append(collate(items, vocab.pad))
        rows = [bench_models(vocab, batches, p, args.seq_len, args.steps, ac) for p in ("tiny", "small") for ac in (False, True)]
        loader = bench_loader(store, tokenizer, vocab, args.seq_len, args.loader_samples)
    lines = [
        "| model | params | precision | ours tokens/s | Mistral tokens/s | ratio ours/Mistral |",
        "|---|---|---|---|---|---|",
        *(f"| {r['preset']} | {r['params']:,} | {r['precision']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | {r['ratio']:.2f} |" for r in rows),
        "",
        "| sequence builder | samples/s |",
        "|---|---|",
        f"| fast path (token ids) | {loader['fast_per_s']:.1f} |",
        f"| slow reference (miditok on the augmented Score) | {loader['reference_per_s']:.2f} |",
        f"| **ratio** | **{loader['ratio']:.1f}x** (identical outputs: {loader['identical']}) |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_readme:
        readme = Path(__file__).with_name("README.md")
        text = readme.read_text()
        marker = "<!-- results -->"
        head = text.split(marker)[0]
        machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        batch = f"batches {args.batch}x{args.seq_len} (real samples, right-padded)"
        readme.write_text(f"{head}{marker}\nMachine: {machine}; {batch}; {args.steps} timed steps each, interleaved.\n\n{table}\n")


if __name__ == "__main__":
    main()
