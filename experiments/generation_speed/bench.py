"""Generation speed: our decode loop (eager and compiled) against transformers, on the same weights.

Four measurements, every variant run interleaved with the others under the same load:

1. decode tokens/s, unconstrained, per model size: `generate_ids` eager, `generate_ids` with the
   compiled static-shape step (`compile=True`), and `MistralForCausalLM.generate` on
   `mmm.model.hf.to_hf_mistral(model)`; the same prompt (the one `MMM.infill` builds for a 4-bar
   infill), the same sampling (temperature 1, top-p 0.95, no top-k), exactly the same number of
   new tokens. `small` is the shipped model; `base` has random weights (speed does not depend
   on them). Decode time starts after the prefill (transformers: at its first logits processor
   call) and covers every sampled token.
2. grammar overhead: the compiled loop with the infill's grammar against the compiled loop
   without it, for the number of tokens the grammar run produced with that seed.
3. `MMM.infill` end to end (tokenize, prompt, prefill, decode, splice) with the shipped model:
   latency percentiles over seeds, eager and compiled.
4. (full run) decode tokens/s against the context already in the cache, ours compiled (full
   attention and a 1024-token sliding window) against transformers, as a table and a plot.

Each measurement keeps the fastest of `--tries` runs per seed (other processes share the
machine); the compile time is the first compiled call minus its best later call, on an empty
Inductor cache (a fresh cache folder per run).

    python experiments/generation_speed/bench.py --quick       # < 3 min on 2 idle cores
    python experiments/generation_speed/bench.py --write-readme
"""

from __future__ import annotations

import os
import tempfile

# An empty Inductor cache, so that the compile time reported is a first compile's.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mmm_bench_inductor_"))

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from symusic import Score

from mmm.data.layout import piece_from_score
from mmm.generation.api import MMM
from mmm.generation.compiled_step import StaticDecoder, enable_compile
from mmm.generation.grammar import BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import SamplingConfig
from mmm.generation.sampling import generate_ids, make_generator
from mmm.model import MMMTransformer, model_config_from_preset
from mmm.model.hf import to_hf_mistral

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
PLOT = HERE / "context_curve.png"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def default_midi() -> tuple[Score, str]:
    root = os.environ.get("MMM_TEST_MIDI")
    if root:
        files = sorted((Path(root) / "multitrack").glob("*.mid"))
        if files:
            return Score(str(files[0])), str(files[0])
    import music21

    from mmm.data.music21_corpus import convert_to_midi

    path = music21.corpus.getWork("bach/bwv66.6")
    return Score.from_midi(convert_to_midi(path)), "music21 corpus bach/bwv66.6"


def random_model(preset: str, vocab_size: int, max_seq_len: int, window: int | None = None) -> MMMTransformer:
    torch.manual_seed(0)
    config = model_config_from_preset(preset, vocab_size, max_seq_len, sliding_window=window, attention="sdpa")
    return MMMTransformer(config).eval()


class HFDecoder:
    """transformers' `generate` on the same weights, timing its decode from its first logits."""

    def __init__(self, model: MMMTransformer, sampling: SamplingConfig) -> None:
        from transformers import LogitsProcessorList

        self.hf = to_hf_mistral(model).eval()
        self.sampling = sampling
        self.first: list[float] = []

        def clock(input_ids, scores):  # called once per new token, the first right after the prefill
            self.first.append(time.perf_counter())
            return scores

        self.processors = LogitsProcessorList([clock])

    def decode_s(self, prompt: list[int], n: int, seed: int) -> float:
        ids = torch.tensor([prompt], device=self.hf.device)
        torch.manual_seed(seed)
        self.first.clear()
        with torch.inference_mode():
            out = self.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                top_k=0,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
                eos_token_id=None,
                use_cache=True,
                logits_processor=self.processors,
            )
        end = time.perf_counter()
        assert out.shape[1] - len(prompt) == n
        return end - self.first[0]


def ours_decode_s(
    model: MMMTransformer, prompt: list[int], n: int, seed: int, sampling: SamplingConfig, compile: bool
) -> float:
    out = generate_ids(model, prompt, n, None, 1, sampling, make_generator(seed, torch.device("cpu")), compile=compile)
    assert out.new_tokens == n
    return out.decode_s


def decode_vs_hf(
    model: MMMTransformer, prompt: list[int], n: int, seeds: int, tries: int, sampling: SamplingConfig
) -> dict:
    """Decode tokens/s of our eager loop, our compiled loop and transformers, fastest of `tries` per seed."""
    hf = HFDecoder(model, sampling)
    t0 = time.perf_counter()
    ours_decode_s(model, prompt, n, 0, sampling, compile=True)  # compiles
    first_call = time.perf_counter() - t0
    best = {"eager": [], "compiled": [], "hf": []}
    for seed in range(seeds):
        runs = {k: [] for k in best}
        for _ in range(tries):
            runs["compiled"].append(ours_decode_s(model, prompt, n, seed, sampling, compile=True))
            runs["eager"].append(ours_decode_s(model, prompt, n, seed, sampling, compile=False))
            runs["hf"].append(hf.decode_s(prompt, n, seed))
        for k in best:
            best[k].append(min(runs[k]))
    tps = {k: seeds * n / sum(v) for k, v in best.items()}
    # The first call also prefilled and decoded n tokens: take its best steady-state time off.
    steady = min(best["compiled"])
    return {
        "tokens_per_s": tps,
        "compiled_vs_hf": tps["compiled"] / tps["hf"],
        "eager_vs_hf": tps["eager"] / tps["hf"],
        "compiled_vs_eager": tps["compiled"] / tps["eager"],
        "compile_s": first_call - steady,
        "new_tokens": n,
        "prompt_tokens": len(prompt),
        "params": model.num_parameters(),
    }


def grammar_and_infill(
    mmm: MMM,
    eager_mmm: MMM,
    score: Score,
    track: int,
    bars: tuple[int, int],
    plan: BarPlan,
    prompt: list[int],
    budget: int,
    seeds: int,
    tries: int,
    sampling: SamplingConfig,
) -> dict:
    """Compiled loop with and without the grammar (same token count per seed); `MMM.infill`
    latency eager and compiled (`eager_mmm`: the same checkpoint loaded again, never compiled:
    `MMM.infill` compiles when its model is compile-enabled)."""
    model, tables = mmm.model, GrammarTables.of(mmm.vocab)
    decode = {"grammar": [], "unconstrained": []}
    latency = {"eager": [], "compiled": []}
    tokens = 0
    for seed in range(1000, 1000 + seeds):
        runs = {k: [] for k in (*decode, *latency)}
        for _ in range(tries):
            out = generate_ids(
                model,
                prompt,
                budget,
                [BarGrammar(tables, plan, budget)],
                1,
                sampling,
                make_generator(seed, torch.device("cpu")),
                compile=True,
            )
            n = out.new_tokens
            runs["grammar"].append(out.decode_s)
            runs["unconstrained"].append(ours_decode_s(model, prompt, n, seed, sampling, compile=True))
            for key, api in (("eager", eager_mmm), ("compiled", mmm)):
                t0 = time.perf_counter()
                api.infill(
                    score, track=track, bars=bars, seed=seed, top_p=sampling.top_p, temperature=sampling.temperature
                )
                runs[key].append(time.perf_counter() - t0)
        tokens += n
        for k in decode:
            decode[k].append(min(runs[k]))
        for k in latency:  # every run counts: a latency percentile describes single calls
            latency[k].extend(runs[k])
    overhead = sum(decode["grammar"]) / sum(decode["unconstrained"]) - 1
    pct = {k: {"p50_s": statistics.median(v), "p90_s": sorted(v)[int(0.9 * (len(v) - 1))]} for k, v in latency.items()}
    return {
        "grammar_overhead": overhead,
        "new_tokens": tokens,
        "decode_tokens_per_s": {k: tokens / sum(v) for k, v in decode.items()},
        "infill_latency": pct,
    }


def context_curve(lengths: list[int], n: int, window: int, tries: int, sampling: SamplingConfig) -> dict:
    """Decode tokens/s with `length` tokens already cached: ours compiled (full attention and a
    sliding window, same weights) and transformers (full attention)."""
    max_len = max(lengths) + n
    full = random_model("small", 2000, max_len)
    windowed = random_model("small", 2000, max_len, window)
    windowed.load_state_dict(full.state_dict())
    for m in (full, windowed):
        enable_compile(m)
    hf = HFDecoder(full, sampling)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        prompt = torch.randint(3, 2000, (length,), generator=gen).tolist()
        runs = {"compiled": [], "compiled_window": [], "hf": []}
        for t in range(tries + 1):  # the first round pays the compiles of a new cache length
            runs["compiled"].append(ours_decode_s(full, prompt, n, t, sampling, compile=True))
            runs["compiled_window"].append(ours_decode_s(windowed, prompt, n, t, sampling, compile=True))
            runs["hf"].append(hf.decode_s(prompt, n, t))
        rows.append({"context": length, **{k: n / min(v[1:]) for k, v in runs.items()}})
    return {"new_tokens": n, "window": window, "rows": rows}


def design_checks(model: MMMTransformer, prompt: list[int], total: int, steps: int) -> dict:
    """What the design choices cost: the grammar's masked_fill next to a compiled step (mask
    inside or outside the graph), and a compiled step at batch 4 against batch 1 (keeping
    finished rows in a static batch against dropping them, which means a graph per batch size)."""
    out = {}
    with torch.inference_mode():
        for batch in (1, 4):
            decoder = StaticDecoder(model, batch, total, compile=True)
            decoder.prefill(prompt)
            ids = torch.zeros(batch, dtype=torch.long)
            t0 = time.perf_counter()
            decoder.step(ids)
            out[f"first_step_s_batch{batch}"] = time.perf_counter() - t0
            best = float("inf")
            for _ in range(3):
                decoder.prefill(prompt)
                t0 = time.perf_counter()
                for _ in range(steps):
                    logits = decoder.step(ids)
                best = min(best, (time.perf_counter() - t0) / steps)
            out[f"step_ms_batch{batch}"] = 1e3 * best
        blocked = torch.rand(logits.shape[-1]) < 0.9
        logits = logits[:1]
        t0 = time.perf_counter()
        for _ in range(1000):
            logits.masked_fill(blocked, float("-inf"))
        out["mask_us"] = 1e6 * (time.perf_counter() - t0) / 1000
    out["mask_share_of_step"] = out["mask_us"] / (1e3 * out["step_ms_batch1"])
    return out


def plot_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["context"] for r in curve["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("compiled", "ours, compiled"),
        ("compiled_window", f"ours, compiled, window {curve['window']}"),
        ("hf", "transformers generate"),
    ):
        ax.plot(xs, [r[key] for r in curve["rows"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("tokens already in the cache")
    ax.set_ylabel("decode tokens/s (1 thread)")
    ax.set_title("small preset: decode speed against context")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratios_line(results: dict) -> str:
    d = results["decode"]
    sizes = ", ".join(f"{s} {d[s]['compiled_vs_hf']:.2f}x" for s in d)
    g = results["grammar_infill"]
    return (
        f"ratios: decode vs transformers {sizes}, grammar overhead {100 * g['grammar_overhead']:+.1f}%, "
        f"infill p50 {g['infill_latency']['compiled']['p50_s']:.2f} s compiled "
        f"({g['infill_latency']['eager']['p50_s']:.2f} s eager)"
    )


def markdown(results: dict, command: str) -> str:
    s = results["setup"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {s['cores']} CPU cores ({s['cpu']}), torch {s['torch']}, transformers {s['transformers']}, "
        f"{s['threads']} torch thread; load average {s['loadavg_start'][0]:.1f} at the start, "
        f"{s['loadavg_end'][0]:.1f} at the end (1-minute). Input: {s['input']}, track {s['track']}, "
        f"bars {s['bars'][0]}-{s['bars'][1]}, prompt {s['prompt_tokens']} ids; {s['seeds']} seeds x {s['tries']} tries; "
        f"run took {s['wall_s'] / 60:.1f} min.",
        "",
        "| model | parameters | new tokens | ours eager tok/s | ours compiled tok/s | transformers tok/s | "
        "compiled vs transformers | eager vs transformers | compile time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, d in results["decode"].items():
        t = d["tokens_per_s"]
        lines.append(
            f"| {size} | {d['params'] / 1e6:.1f} M | {d['new_tokens']} | {t['eager']:.0f} | {t['compiled']:.0f} | "
            f"{t['hf']:.0f} | **{d['compiled_vs_hf']:.2f}x** | {d['eager_vs_hf']:.2f}x | {d['compile_s']:.0f} |"
        )
    g = results["grammar_infill"]
    lat = g["infill_latency"]
    lines += [
        "",
        "| shipped model (small) | value |",
        "|---|---|",
        f"| compiled decode tok/s with grammar / without | {g['decode_tokens_per_s']['grammar']:.0f} / "
        f"{g['decode_tokens_per_s']['unconstrained']:.0f} ({g['new_tokens']} tokens) |",
        f"| grammar overhead (decode time) | **{100 * g['grammar_overhead']:+.1f}%** |",
        f"| `MMM.infill` 4 bars, p50 / p90, compiled | **{lat['compiled']['p50_s']:.2f} s** / {lat['compiled']['p90_s']:.2f} s |",
        f"| `MMM.infill` 4 bars, p50 / p90, eager | {lat['eager']['p50_s']:.2f} s / {lat['eager']['p90_s']:.2f} s |",
    ]
    if "design" in results:
        c = results["design"]
        lines += [
            f"| compiled step, batch 1 / batch 4 | {c['step_ms_batch1']:.2f} ms / {c['step_ms_batch4']:.2f} ms |",
            f"| first step at a new batch size (a new graph) | {c['first_step_s_batch4']:.0f} s |",
            f"| grammar masked_fill outside the graph | {c['mask_us']:.1f} us = {100 * c['mask_share_of_step']:.2f}% of a step |",
        ]
    if "curve" in results:
        c = results["curve"]
        lines += [
            "",
            f"![decode tokens/s against context]({PLOT.name})",
            "",
            f"| tokens in the cache | ours compiled tok/s | ours compiled, window {c['window']} | transformers tok/s | ours / transformers |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['context']} | {r['compiled']:.0f} | {r['compiled_window']:.0f} | {r['hf']:.0f} | "
                f"{r['compiled'] / r['hf']:.2f}x |"
            )
    lines += ["", "Last line of the run:", "", f"    {ratios_line(results)}"]
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = README.read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"{README} has no {START} ... {END} section to replace")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", readme, flags=re.S)
    README.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt", default="models/mmm-music21-small", help="checkpoint folder (default: the shipped model)"
    )
    parser.add_argument(
        "--midi",
        default=None,
        help="multi-track MIDI (default: first of $MMM_TEST_MIDI/multitrack, else a Bach chorale)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer seeds, no context curve: under 3 minutes on 2 idle cores"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per measurement (default 5, quick 2)")
    parser.add_argument("--tries", type=int, default=None, help="runs per seed, the fastest kept (default 3, quick 2)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per decode-speed run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--write-readme", action="store_true", help="replace the README's results section (full run only)"
    )
    args = parser.parse_args()
    if args.write_readme and args.quick:
        parser.error("--write-readme records a full run; drop --quick")
    seeds = args.seeds or (2 if args.quick else 5)
    tries = args.tries or (2 if args.quick else 3)

    wall0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    sampling = SamplingConfig(1.0, None, 0.95)
    mmm = MMM.from_pretrained(args.ckpt, num_threads=args.threads)
    score, source = (Score(args.midi), args.midi) if args.midi else default_midi()
    piece = piece_from_score(score, mmm.tokenizer, mmm.vocab)
    a, b = piece.num_bars // 2, piece.num_bars // 2 + 4
    pitched = [i for i in range(len(score.tracks)) if not piece.empty[i] and piece.programs[i] >= 0]
    track = max(pitched, key=lambda i: sum(mmm.vocab.is_note_start[t] for bar in piece.bars[i][a:b] for t in bar))
    mmm.infill(score, track=track, bars=(a, b), seed=0)  # the prompt and budget MMM.infill uses
    step = mmm.last_report.steps[0]
    prompt, budget = step.prompt, step.budget
    plan = BarPlan(piece.time_sigs[a:b], [[] for _ in range(b - a)], mmm.vocab.fill_end, piece.programs[track] < 0)
    n = min(args.new_tokens, budget)

    results: dict = {"decode": {}}
    context = mmm.model.config.max_seq_len
    for size, model in (("small", mmm.model), ("base", random_model("base", mmm.vocab.size, context))):
        results["decode"][size] = decode_vs_hf(model, prompt, n, seeds, tries, sampling)
        print(size, json.dumps(results["decode"][size]), flush=True)
    eager_mmm = MMM.from_pretrained(args.ckpt, num_threads=args.threads)
    results["grammar_infill"] = grammar_and_infill(
        mmm, eager_mmm, score, track, (a, b), plan, prompt, budget, seeds * 2, tries, sampling
    )
    print(json.dumps(results["grammar_infill"]), flush=True)
    if not args.quick:
        results["design"] = design_checks(mmm.model, prompt, len(prompt) + budget, 64)
        print(json.dumps(results["design"]), flush=True)
        results["curve"] = context_curve([512, 1024, 2048, 4096], 32, 1024, tries, sampling)
        print(json.dumps(results["curve"]), flush=True)
        plot_curve(results["curve"], PLOT)
    import transformers

    results["setup"] = {
        "ckpt": args.ckpt,
        "input": source,
        "track": track,
        "bars": [a, b],
        "prompt_tokens": len(prompt),
        "budget": budget,
        "seeds": seeds,
        "tries": tries,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - wall0,
        "quick": args.quick,
    }
    command = "python experiments/generation_speed/bench.py " + " ".join(sys.argv[1:])
    print(markdown(results, command.strip()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.write_readme:
        write_readme(markdown(results, command.strip()))
    print(ratios_line(results))


if __name__ == "__main__":
    main()
