"""Why are uncontrolled infills sparse? Empty bars of the same infill requests, three ways.

For each request (the windows, tracks and spans `mmm.evaluate` draws), with the prompt the API
builds:

- generated: the whole span sampled as the API does (grammar on), `--variations` rows;
- teacher-forced: each bar of the span sampled alone after the *real* bars before it
  (the model's own view of the bar, without its earlier mistakes);
- free: the whole span sampled without the grammar (stops at FillBar_End or its budget);
- real: the bars the request replaces.

A bar counts as empty when it holds no note. Also reported: the probability mass the grammar
takes away from the model per step (high mass means the grammar fights the model).

    python experiments/sparse_infills/probe.py models/mmm-music21-small data/music21_all/store
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict

import numpy as np
import torch
from draw import has_notes, infill_requests

from mmm import MMM
from mmm.data.layout import generated_bars
from mmm.data.store import Store
from mmm.generation.grammar import PHASES, BarGrammar, BarPlan, GrammarTables
from mmm.generation.request import SamplingConfig
from mmm.generation.sampling import make_generator, sample_next


@torch.inference_mode()
def sample_rows(model, prompt, budget, grammars, n, sampling, gen, end_id, vocab, fights=None):
    """Like generation.generate_ids (no row dropping), also measuring the mass the grammar
    blocks; `fights` counts (phase, most likely blocked id) where it blocks over half."""
    cache = model.new_cache(1, max_len=len(prompt) + budget)
    logits = model(torch.tensor([prompt]), cache, last_only=True)[:, -1].float()
    cache = cache.repeat(n)
    logits = logits.expand(n, -1)
    out = [[] for _ in range(n)]
    done = [False] * n
    blocked_mass = []
    for _ in range(budget):
        if grammars is not None:
            blocked = torch.stack([g.blocked(logits.shape[-1], logits.device) for g in grammars])
            probs = logits.softmax(-1)
            for r in range(n):
                if not done[r]:
                    blocked_mass.append(float(probs[r][blocked[r]].sum()))
                    if blocked_mass[-1] > 0.5 and fights is not None:
                        top = int((probs[r] * blocked[r]).argmax())
                        tokens = " ".join(vocab.token_of[i] for i in vocab.model_to_base[top])
                        fights[PHASES[grammars[r].key()[0]], tokens[:60]] += 1
            logits = logits.masked_fill(blocked, float("-inf"))
        ids = sample_next(logits, sampling, gen)
        for r, i in enumerate(ids.tolist()):
            if done[r]:
                continue
            out[r].append(i)
            if grammars is not None:
                grammars[r].advance(i)
                done[r] = grammars[r].done
            else:
                done[r] = i == end_id
        if all(done):
            break
        if grammars is not None:  # a finished row keeps sampling into a dummy: give it any id
            ids = torch.where(torch.tensor(done), torch.zeros_like(ids), ids)
        logits = model(ids[:, None], cache)[:, -1].float()
    return out, blocked_mass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("store")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--variations", type=int, default=4)
    p.add_argument("--split", default="test")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    mmm = MMM.from_pretrained(args.ckpt, num_threads=1)
    model, vocab, tok = mmm.model, mmm.vocab, mmm.tokenizer
    tables = GrammarTables.of(vocab)
    store = Store(args.store, args.split)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p)
    gen = make_generator(0, torch.device("cpu"))
    counts = defaultdict(lambda: [0, 0])  # way -> [empty bars, bars]
    by_pos = defaultdict(lambda: [0, 0])
    masses = []
    fights = defaultdict(int)
    rng = random.Random(0)
    done = 0
    requests = infill_requests(store, rng, tok, vocab)
    while done < args.requests:
        score, target, (a, b), t_bars = next(requests)
        mmm.infill(score, track=target, bars=(a, b), seed=rng.randrange(2**31))
        step = mmm.last_report.steps[0]
        if len(mmm.last_report.steps) != 1:
            continue
        prompt = list(step.prompt)
        real = [has_notes(bar, vocab) for bar in t_bars]
        budget = step.budget
        tsigs = [next(i for i in bar if vocab.token_of[i].startswith("TimeSig")) for bar in t_bars]
        plan = BarPlan(tsigs, [[] for _ in tsigs], vocab.fill_end, score.tracks[target].is_drum)
        nv = args.variations
        rows, mass = sample_rows(
            model,
            prompt,
            budget,
            [BarGrammar(tables, plan, budget) for _ in range(nv)],
            nv,
            sampling,
            gen,
            vocab.fill_end,
            vocab,
            fights,
        )
        masses += mass
        for row in rows:
            for k, bar in enumerate(generated_bars(vocab.to_base(row), vocab)):
                counts["generated"][0] += not has_notes(bar, vocab)
                counts["generated"][1] += 1
                by_pos["generated", k][0] += not has_notes(bar, vocab)
                by_pos["generated", k][1] += 1
        free, _ = sample_rows(model, prompt, budget, None, nv, sampling, gen, vocab.fill_end, vocab)
        for row in free:
            base = [i for i in vocab.to_base(row) if i != vocab.fill_end]
            # unconstrained rows may write anything: count the bars they open (up to 4)
            starts = [j for j, i in enumerate(base) if i == vocab.bar][:4]
            bars = [base[j:k] for j, k in zip(starts, starts[1:] + [len(base)])]
            for bar in bars:
                counts["free"][0] += not has_notes(bar, vocab)
                counts["free"][1] += 1
        # teacher forced: bar k alone after the real bars 0..k-1
        for k in range(4):
            prefix = prompt + vocab.encode_words(t_bars[:k])
            left = mmm.model.config.max_seq_len - len(prefix)
            plan1 = BarPlan(tsigs[k : k + 1], [[]], vocab.fill_end, plan.drums)
            rows1, _ = sample_rows(
                model,
                prefix,
                left,
                [BarGrammar(tables, plan1, left) for _ in range(nv)],
                nv,
                sampling,
                gen,
                vocab.fill_end,
                vocab,
            )
            for row in rows1:
                bar = generated_bars(vocab.to_base(row), vocab)[0]
                counts["teacher-forced"][0] += not has_notes(bar, vocab)
                counts["teacher-forced"][1] += 1
                by_pos["teacher-forced", k][0] += not has_notes(bar, vocab)
                by_pos["teacher-forced", k][1] += 1
        for k, r in enumerate(real):
            counts["real"][0] += not r
            counts["real"][1] += 1
            by_pos["real", k][0] += not r
            by_pos["real", k][1] += 1
        done += 1
        print(
            f"request {done}: track {target} bars {a}-{b} real {real} "
            + " ".join(f"{w} {c[0]}/{c[1]}" for w, c in counts.items()),
            file=sys.stderr,
            flush=True,
        )
    print("| way | empty bars | bar 0 | bar 1 | bar 2 | bar 3 |")
    print("|---|---|---|---|---|---|")
    for w, (e, t) in counts.items():
        cells = [f"{by_pos[w, k][0] / by_pos[w, k][1]:.0%}" if by_pos[w, k][1] else "" for k in range(4)]
        print(f"| {w} | {e}/{t} ({e / t:.0%}) | " + " | ".join(cells) + " |")
    m = np.array(masses)
    print(
        f"grammar-blocked probability mass per step: mean {m.mean():.3f}, median {np.median(m):.3f}, "
        f"steps over 0.1: {(m > 0.1).mean():.1%}, over 0.5: {(m > 0.5).mean():.1%} ({len(m)} steps)"
    )
    print("where the grammar blocks over half the mass: steps, phase, the model's most likely blocked id")
    for (phase, tokens), count in sorted(fights.items(), key=lambda x: -x[1])[:10]:
        print(f"  {count:5d}  {phase:5s}  {tokens}")


if __name__ == "__main__":
    main()
