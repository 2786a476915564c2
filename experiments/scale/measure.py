"""The measured inputs of the scale plan (experiments/scale/README.md), on this machine's CPUs.

    python experiments/scale/measure.py --midi ../shared/midi --work runs/scale/shared --out experiments/scale/shared.json

1. preprocessing: files per CPU-second (one worker) and store bytes per file, on real MIDI;
2. the loader: training samples (and model tokens) built per CPU-second by one worker, at the
   `+experiment=gigamidi` sequence length (2048);
3. `base` training tokens/s on the CPU (bf16 autocast, as trainer=cpu);
4. DeepSpeed's own estimators of model-state memory (params, grads, Adam) for ZeRO-2 and ZeRO-3
   at `base` and at a ~300M-parameter config.

On a shared machine, wall-clock rates depend on the load; the figures used by the plan are per
CPU-second of the measuring process (and its children), which the load changes much less.
Both are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]

# ~300M parameters with the GigaMIDI vocabulary: twice base's width, 20 layers.
LARGE = dict(hidden_size=1024, num_layers=20, num_heads=16, num_kv_heads=8, intermediate_size=3072)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def config(midi: Path, work: Path, vocab_size: int):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                "data=folder",
                f"data.path={midi}",
                f"paths.data_dir={work}",
                "data.preprocess.num_workers=1",
                "data.max_seq_len=2048",
                f"tokenizer.vocab_size={vocab_size}",
                f"run_dir={work}/run",
                "data.preprocess.chunk_max_tokens=8192",
                "data.preprocess.chunk_max_track_tokens=3072",  # as gigamidi
            ],
        )


def measure_preprocessing(cfg) -> dict:
    from mmm.data.store_writer import preprocess

    with Clock() as c:
        report = preprocess(cfg.data, cfg.tokenizer)
    store = Path(cfg.data.store)
    size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    files, kept = report["files"], report["kept"]
    chunks = sum(s["chunks"] for s in report["splits"].values())
    notes = sum(k["notes"] for k in report["kept_files"])
    midi_bytes = sum(p.stat().st_size for p in Path(cfg.data.path).rglob("*") if p.is_file())
    return {
        "files": files,
        "kept": kept,
        "chunks": chunks,
        "notes": notes,
        "midi_bytes": midi_bytes,
        "wall_s": round(c.wall, 2),
        "cpu_s": round(c.cpu, 2),
        "files_per_cpu_s": round(files / c.cpu, 2),
        "files_per_wall_s": round(files / c.wall, 2),
        "notes_per_cpu_s": round(notes / c.cpu),
        "store_bytes": size,
        "store_bytes_per_file": round(size / files),
        "store_bytes_per_note": round(size / notes, 2),
        "store_bytes_per_midi_byte": round(size / midi_bytes, 2),
    }


def measure_loader(cfg, tokenizer_path: Path, seconds: float) -> dict:
    from mmm.data.datamodule import SequenceDataset, collate
    from mmm.tokenizer import Vocab, load_tokenizer

    ds = SequenceDataset(
        cfg.data.store,
        "train",
        tokenizer_path,
        cfg.data.sequences,
        cfg.data.max_seq_len,
        seed=0,
        vary_per_epoch=True,
        length=10**6,
    )
    pad = Vocab(load_tokenizer(tokenizer_path)).pad
    ds[0]  # opens the store and the tokenizer (once per worker)
    samples = tokens = 0
    with Clock() as c:
        while time.perf_counter() - c.wall < seconds:
            batch = [ds[samples + k] for k in range(16)]
            collate(batch, pad)
            samples += 16
            tokens += sum(len(b["input_ids"]) for b in batch)
    return {
        "samples": samples,
        "mean_tokens_per_sample": round(tokens / samples),
        "wall_s": round(c.wall, 2),
        "cpu_s": round(c.cpu, 2),
        "samples_per_cpu_s": round(samples / c.cpu, 1),
        "tokens_per_cpu_s": round(tokens / c.cpu),
    }


def measure_training(vocab_size: int, seq: int, batch: int, steps: int) -> dict:
    from mmm.model import MMMTransformer, model_config_from_preset

    torch.manual_seed(0)
    model = MMMTransformer(model_config_from_preset("base", vocab_size=vocab_size, max_seq_len=seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab_size, (batch, seq + 1))
    out = {"parameters": model.num_parameters(), "threads": torch.get_num_threads(), "batch": batch, "seq": seq}
    for i in range(steps + 1):
        with Clock() as c:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids[:, :-1])
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        if i:  # the first step warms up
            out.setdefault("wall_s", []).append(round(c.wall, 2))
            out.setdefault("cpu_s", []).append(round(c.cpu, 2))
    tokens = batch * seq * steps
    out["tokens_per_wall_s"] = round(tokens / sum(out["wall_s"]))
    out["tokens_per_cpu_s"] = round(tokens / sum(out["cpu_s"]))
    return out


def memory_estimates(vocab_size: int, seq: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from mmm.model import MMMTransformer, model_config_from_preset

    out = {}
    for name, overrides in (("base", {}), ("large_300m", LARGE)):
        with torch.device("meta"):
            model = MMMTransformer(
                model_config_from_preset("base", vocab_size=vocab_size, max_seq_len=seq, **overrides)
            )
        total = model.num_parameters()
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        rows = {}
        for gpus in (1, 4, 8):
            for offload in (False, True):
                cpu2, gpu2 = estimate_zero2_model_states_mem_needs(total, gpus, 1, offload)
                cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, 1, offload, offload)
                rows[f"{gpus}gpu_offload{int(offload)}"] = {
                    "zero2_gpu_gb": gpu2 / 2**30,
                    "zero2_cpu_gb": cpu2 / 2**30,
                    "zero3_gpu_gb": gpu3 / 2**30,
                    "zero3_cpu_gb": cpu3 / 2**30,
                }
        out[name] = {
            "parameters": total,
            "largest_layer": largest,
            "config": overrides or "base preset",
            "per_gpu": rows,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--midi", type=Path, required=True, help="a folder of real MIDI files")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (store, tokenizer)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--bpe", type=int, default=2000, help="BPE vocabulary learned on the corpus (small corpora: small)"
    )
    parser.add_argument("--loader-seconds", type=float, default=40)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["preprocess", "loader", "train", "memory"])
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    cfg = config(args.midi.resolve(), args.work.resolve(), args.bpe)
    if "preprocess" in args.only:
        results["preprocess"] = measure_preprocessing(cfg)
        print("preprocess", results["preprocess"], flush=True)
    if "loader" in args.only:
        from mmm.data.prepare import train_tokenizer

        tokenizer_path = Path(cfg.tokenizer.path)
        if not tokenizer_path.is_file():
            train_tokenizer(cfg.data, cfg.tokenizer)
        results["loader"] = measure_loader(cfg, tokenizer_path, args.loader_seconds)
        print("loader", results["loader"], flush=True)
    if "train" in args.only:
        results["train_base_cpu"] = measure_training(16000, 1024, 2, args.train_steps)
        print("train", results["train_base_cpu"], flush=True)
    if "memory" in args.only:
        results["memory"] = memory_estimates(16000, 2048)
        print("memory", json.dumps(results["memory"], indent=1), flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
