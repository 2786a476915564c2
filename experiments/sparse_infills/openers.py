"""How the generated bars of training samples open, in model ids: with an id holding only the
bar header (`Bar_None TimeSig`) or with one that merges the header into the first notes, and
what follows a header-only id (an AC, the bar's notes, or the next bar: the bar is empty).

    python experiments/sparse_infills/openers.py models/mmm-music21-small data/music21_all/store
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from omegaconf import OmegaConf

from mmm import MMM
from mmm.config import plain
from mmm.data.sequences import SequenceBuilder
from mmm.data.store import Store
from mmm.generation.grammar import GrammarTables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a checkpoint folder: its tokenizer encodes the samples")
    p.add_argument("store")
    p.add_argument("--samples", type=int, default=1500)
    p.add_argument("--max-seq-len", type=int, default=1024)
    args = p.parse_args()
    vocab = MMM.from_pretrained(args.ckpt, num_threads=1).vocab
    tables = GrammarTables.of(vocab)
    sequences = plain(OmegaConf.load("configs/data/common.yaml").sequences)
    builder = SequenceBuilder(vocab, sequences, args.max_seq_len)
    store = Store(args.store, "train")
    rng = random.Random(2)
    counts: Counter = Counter()
    for _ in range(args.samples):
        ids = builder(store[rng.randrange(len(store))], rng)[0].tolist()
        if vocab.fill_start not in ids:
            continue
        start = ids.index(vocab.fill_start) + 1
        for j in range(start, len(ids) - 1):
            if not tables.opens_bar[ids[j]]:
                continue
            which = "first bar" if j == start else "later bars"
            if tables.first_pos[ids[j]] >= 0:
                counts[which, "header merged with notes", ""] += 1
                continue
            nxt = ids[j + 1]
            after = (
                "an AC"
                if vocab.is_ac_model[nxt]
                else "the next bar (empty)"
                if tables.opens_bar[nxt] or nxt == vocab.fill_end
                else "notes"
            )
            counts[which, "header-only id", after] += 1
    print(f"fill sections of {args.samples} training samples ({args.ckpt})")
    print("| bar | opening id | followed by | bars |")
    print("|---|---|---|---|")
    for (which, opening, after), n in sorted(counts.items()):
        print(f"| {which} | {opening} | {after} | {n} |")


if __name__ == "__main__":
    main()
