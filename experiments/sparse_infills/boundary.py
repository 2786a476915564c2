"""The model's own probability that an infilled bar is empty, given the real bars before it.

For infill requests drawn like `mmm.evaluate`'s (a 16-bar window of a stored chunk, 4 bars of
one track that has notes there), the prompt the API builds is followed by the *real* bars
(teacher forcing). At each bar boundary of the fill section this measures:

- P(FillBar_End): the model ends the section;
- P(header-only id): the next bar opens with an id holding only `Bar_None TimeSig`;
- P(empty bar): sum over those ids h of P(h) x P(the bar closes right after h), one more
  forward per h;
- the real rate of empty bars at that boundary.

A calibrated model gives P(empty bar) near the real rate; sampling then compounds whatever
excess there is (a generated empty bar makes the next one likelier).

    python experiments/sparse_infills/boundary.py models/mmm-music21-small data/music21_all/store --split train
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from draw import has_notes, infill_requests

from mmm import MMM
from mmm.data.store import Store
from mmm.generation.grammar import GrammarTables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt")
    p.add_argument("store")
    p.add_argument("--split", default="test")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--bars", type=int, default=4, help="bars per infill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    mmm = MMM.from_pretrained(args.ckpt, num_threads=1)
    vocab, tok, model = mmm.vocab, mmm.tokenizer, mmm.model
    tables = GrammarTables.of(vocab)
    header_only = np.array([tables.opens_bar[i] and tables.first_pos[i] < 0 for i in range(vocab.size)])
    closes = tables.opens_bar.copy()
    closes[vocab.fill_end] = True
    store = Store(args.store, args.split)
    rng = random.Random(args.seed)
    rows = []
    requests = infill_requests(store, rng, tok, vocab, args.bars)
    for _ in range(1, args.requests + 1):
        score, target, (a, b), real = next(requests)
        # The API builds the prompt (a tiny bar budget: only the prompt is used here).
        mmm.infill(score, track=target, bars=(a, b), seed=1, max_bar_tokens=8)
        prompt = list(mmm.last_report.steps[0].prompt)
        completion, starts = [], []
        for bar in real:
            starts.append(len(prompt) + len(completion))
            completion += vocab.encode_words([bar])
        starts.append(len(prompt) + len(completion))
        ids = prompt + completion + [vocab.fill_end]
        with torch.inference_mode():
            probs = model(torch.tensor([ids]))[0].float().softmax(-1).numpy()
            for k, s in enumerate(starts):
                q = probs[s - 1]
                empty = 0.0
                for h in np.flatnonzero(header_only & (q > 0.005)):
                    after = model(torch.tensor([ids[:s] + [int(h)]]), last_only=True)[0, -1].float().softmax(-1).numpy()
                    empty += q[h] * after[closes].sum()
                real_empty = float(not has_notes(real[k], vocab)) if k < len(real) else float("nan")
                rows.append((k, q[vocab.fill_end], q[header_only].sum(), empty, real_empty))
    rows = np.array(rows, dtype=float)
    print(
        f"{args.ckpt}, {args.split} split, {args.requests} requests of {args.bars} bars (teacher forced on the real bars)"
    )
    print("| boundary | P(FillBar_End) | P(header-only id) | P(empty bar) | real empty |")
    print("|---|---|---|---|---|")
    for k in range(args.bars + 1):
        r = rows[rows[:, 0] == k]
        name = f"before bar {k}" if k < args.bars else "after the last bar"
        print(f"| {name} | " + " | ".join("" if np.isnan(x) else f"{x:.3f}" for x in r[:, 1:].mean(0)) + " |")


if __name__ == "__main__":
    main()
