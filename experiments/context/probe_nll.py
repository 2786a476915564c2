"""Fill bits/note of the probe corpus's doubling track (the melody an octave lower), after the
real prompt, the other tracks shifted one bar later and the track alone: how far a model brings
the fill loss down when the answer is in another track. The bass (independent of the others)
is measured the same way as a control: no prompt should help it.

    python experiments/context/probe_nll.py CKPT STORE [--split test] [--bars 2]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from mmm.data.sequences import SampleSpec, SequenceBuilder
from mmm.data.store import Store
from mmm.evaluate.likelihood import TargetCounts, _condition_sample, _fill_start, _fill_totals, _rates, model_nll
from mmm.generation.api import MMM

PROGRAMS = {"doubling": 42, "bass": 32}  # probe_corpus.py's tracks (the melody is program 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("store", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--bars", type=int, default=2)
    args = parser.parse_args()
    mmm = MMM.from_pretrained(args.ckpt, num_threads=1)
    model, vocab = mmm.model, mmm.vocab
    sequences = {
        "infill_ratio": 1.0,
        "all_tracks_ratio": 1.0,
        "tracks_ratio": [1.0, 1.0],
        "infill_bars_ratio": [0.1, 0.4],
        "track_acs_ratio": [0.0, 0.0],
        "uncontrolled_ratio": 1.0,
        "bar_acs_ratio": [0.2, 1.0],
        "ac_bars_ratio": [0.5, 1.0],
        "context_loss": True,
        "pitch_shift": 0,
        "velocity_shift": 0,
    }
    builder = SequenceBuilder(
        vocab, sequences, model.config.max_seq_len, model.config.fill_program, model.config.target_last
    )
    store = Store(args.store, args.split)
    counter = TargetCounts(vocab)
    results = {}
    for name, program in PROGRAMS.items():
        samples = {"real": [], "shifted": [], "alone": []}
        for i in range(len(store)):
            chunk = store[i]
            n = len(chunk["bars"][0])
            target = chunk["programs"].index(program)
            order = list(range(len(chunk["programs"])))
            random.Random(i).shuffle(order)
            if model.config.target_last:  # as the model was trained: the target's block last
                order.remove(target)
                order.append(target)
            a = (n - args.bars) // 2
            spec = SampleSpec(task="infill", tracks=order, target=target, span=(a, a + args.bars))
            real = builder.build(chunk, spec, random.Random(0))
            twins = {c: _condition_sample(builder, chunk, spec, c, None) for c in ("shifted", "alone")}
            fill = real[0][_fill_start(real[0], vocab) :]
            if all(np.array_equal(t[0][_fill_start(t[0], vocab) :], fill) for t in twins.values()):
                samples["real"].append(real)
                for c, twin in twins.items():
                    samples[c].append(twin)
        rates = {}
        for condition, pairs in samples.items():
            nll = model_nll(model, pairs, 8, vocab.pad, condition, vocab)
            totals = sum(
                _fill_totals(counter, ids, labels, nats, _fill_start(ids, vocab))
                for (ids, labels), nats in zip(pairs, nll)
            )
            rates[condition] = _rates(totals[0], *(int(x) for x in totals[1:]))["bits_per_note"]
        results[name] = {"samples": len(samples["real"]), "bits_per_note": rates}
    print(json.dumps({"ckpt": args.ckpt, **results}, indent=2))


if __name__ == "__main__":
    main()
