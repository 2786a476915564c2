"""Likelihood of test sequences: the model's NLL per target, rates per token, note and bar, the
unigram and bigram baselines beside it (`mmm.evaluate.metrics`), and the fill-section NLL of
bar-infill samples under context conditions: the same target ids after the real prompt, after the
other tracks shifted one bar later, after other tracks taken from another piece, and with the
target track alone. A model that listens to the other tracks predicts its fill best after the real
prompt; one that only counts on them being there does as well after the wrong ones."""

from __future__ import annotations

import copy
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmm.data.datamodule import collate
from mmm.data.sequences import IGNORE_INDEX, SequenceBuilder
from mmm.data.store import Store
from mmm.data.timing import sequence_timing
from mmm.evaluate.metrics import LOG2, BigramKN, UnigramLM, targets
from mmm.model import next_token_nll
from mmm.tokenizer import Vocab

Pairs = list[tuple[np.ndarray, np.ndarray]]  # (ids, labels) of sequences


# The prompts a fill section is scored after, beside the real one (`build_sequences`).
CONDITIONS = ("shifted", "other_piece", "alone")


@dataclass
class EvalSequence:
    ids: np.ndarray
    labels: np.ndarray
    task: str
    fill_start: int | None = None  # index of FillBar_Start in ids (infill samples)
    # infill samples with context tracks: the same fill section after another prompt, per condition
    conditions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _fill_start(ids: np.ndarray, vocab: Vocab) -> int:
    return int(np.flatnonzero(ids == vocab.fill_start)[0])


def build_sequences(
    store: Store,
    chunks: Sequence[int],
    builder: SequenceBuilder,
    per_chunk: int,
    seed: str,
    with_conditions: bool,
    desc: str,
) -> list[EvalSequence]:
    """`per_chunk` samples of each chunk, each from its own seeded RNG. With `with_conditions`, an
    infill sample with context tracks also gets its twins under each of `CONDITIONS` (same target
    bars, span, ACs and shifts; kept when its fill section is the same ids)."""
    vocab = builder.vocab
    out = []
    for n, i in enumerate(tqdm(chunks, desc=desc, unit="chunk", leave=False)):
        chunk = store[i]
        for k in range(per_chunk):
            rng = random.Random(f"{seed}-{i}-{k}")
            spec = builder.draw_spec(chunk, rng)
            ids, labels = builder.build(chunk, spec, rng)
            seq = EvalSequence(ids, labels, spec.task)
            if spec.task == "infill":
                seq.fill_start = _fill_start(ids, vocab)
                if with_conditions and len(spec.tracks) > 1:
                    other = store[chunks[(n + 1) % len(chunks)]] if len(chunks) > 1 else None
                    for condition in CONDITIONS:
                        twin = _condition_sample(builder, chunk, spec, condition, other)
                        # The prompt is rebuilt (the length fit may drop tracks or bars): kept
                        # only when the fill section, what is scored, came out the same ids.
                        if twin is not None and np.array_equal(
                            twin[0][_fill_start(twin[0], vocab) :], ids[seq.fill_start :]
                        ):
                            seq.conditions[condition] = twin
            out.append(seq)
    return out


def _condition_sample(
    builder: SequenceBuilder, chunk, spec, condition: str, other
) -> tuple[np.ndarray, np.ndarray] | None:
    """The sample of `spec` after another prompt: the other tracks one bar later (bar 0 left empty),
    the other tracks of another piece (cut or padded with empty bars to this one's length), or
    the target track alone."""
    spec = copy.deepcopy(spec)
    bars = list(chunk["bars"])
    programs = list(chunk["programs"])
    context = [t for t in spec.tracks if t != spec.target]
    if condition == "alone":
        spec.tracks = [spec.target]
    elif condition == "shifted":
        for t in context:  # the first bar's header (Bar TimeSig) stands for an empty bar
            bars[t] = [list(bars[t][0][:2]), *bars[t][:-1]]
    elif condition == "other_piece":
        if other is None or len(other["programs"]) < len(context):
            return None
        num_bars = len(bars[spec.target])
        for t, theirs in zip(context, range(len(other["programs"]))):
            header = list(bars[t][0][:2])
            bars[t] = [*other["bars"][theirs][:num_bars]]
            bars[t] += [header] * (num_bars - len(bars[t]))
            programs[t] = other["programs"][theirs]
    changed = {**chunk, "bars": bars, "programs": programs}
    return builder.build(changed, spec, random.Random(0))


@torch.no_grad()
def model_nll(
    model, sequences: Pairs, batch_size: int, pad_id: int, desc: str, vocab: Vocab | None = None
) -> list[np.ndarray]:
    """Per sequence, the NLL (nats) of each target (positions of `metrics.targets`), batched like
    training batches (shortest first) and scored with the training objective. A model with
    alignment signals reads each sequence's timing (`vocab` is then required)."""
    device = next(model.parameters()).device
    kind = model.config.timing
    if kind is not None and vocab is None:
        raise ValueError("this model reads musical times and target flags: model_nll needs the vocab to compute them")
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    out: list[np.ndarray | None] = [None] * len(sequences)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[s : s + batch_size]
        items = []
        for i in rows:
            ids, labels = sequences[i]
            items.append({"input_ids": ids, "labels": labels, "num_notes": 0, "index": i})
            if kind is not None:
                items[-1]["times"], items[-1]["flags"], _ = sequence_timing(ids, vocab, kind)
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        nll = next_token_nll(
            model,
            batch["input_ids"],
            batch["labels"],
            IGNORE_INDEX,
            times=batch.get("times"),
            flags=batch.get("flags"),
        )
        nll = nll.cpu().numpy()
        for r, i in enumerate(rows):
            mask = sequences[i][1][1:] != IGNORE_INDEX
            out[i] = nll[r, : len(mask)][mask].astype(np.float64)
    return out  # type: ignore[return-value]


def _rates(nats: float, tokens: int, notes: int, bars: int) -> dict[str, float]:
    bits = nats / LOG2
    return {
        "nats_per_token": nats / max(tokens, 1),
        "bits_per_token": bits / max(tokens, 1),
        "bits_per_note": bits / notes if notes else math.nan,
        "bits_per_bar": bits / bars if bars else math.nan,
        "tokens": tokens,
        "notes": notes,
        "bars": bars,
    }


class TargetCounts:
    """Notes and bars carried by model ids (a BPE id may hold several notes or a bar start)."""

    def __init__(self, vocab: Vocab) -> None:
        self.notes = vocab.notes_per_model_id
        self.bars = np.array([sum(b == vocab.bar for b in bases) for bases in vocab.model_to_base])

    def totals(self, nats: np.ndarray, tgt: np.ndarray) -> tuple[float, int, int, int]:
        return float(nats.sum()), len(tgt), int(self.notes[tgt].sum()), int(self.bars[tgt].sum())


def _score_set(
    model, vocab: Vocab, test: list[EvalSequence], unigram: UnigramLM, bigram: BigramKN, batch_size: int, desc: str
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Rates of the model and both baselines on `test`, and the model's per-target NLL."""
    counter = TargetCounts(vocab)
    pairs = [(s.ids, s.labels) for s in test]
    nll = model_nll(model, pairs, batch_size, vocab.pad, desc, vocab)
    models: dict[str, Callable[[int], np.ndarray]] = {
        "model": lambda i: nll[i],
        "bigram": lambda i: bigram.bits(*pairs[i]) * LOG2,
        "unigram": lambda i: unigram.bits(*pairs[i]) * LOG2,
    }
    out: dict[str, Any] = {}
    for name, nats_of in models.items():
        sums = np.zeros(4)
        by_task: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(4))
        for i, seq in enumerate(test):
            _, tgt, _ = targets(seq.ids, seq.labels)
            t = np.array(counter.totals(nats_of(i), tgt))
            sums += t
            by_task[seq.task] += t
        out[name] = _rates(sums[0], *(int(x) for x in sums[1:]))
        out[name]["by_task"] = {task: _rates(v[0], *(int(x) for x in v[1:])) for task, v in sorted(by_task.items())}
    return out, nll


def fit_baselines(train: Pairs, vocab_size: int, kn_discount: float, desc: str = "") -> tuple[UnigramLM, BigramKN]:
    unigram = UnigramLM(vocab_size).fit(tqdm(train, desc=f"fit unigram{desc}", leave=False))
    bigram = BigramKN(vocab_size, kn_discount).fit(tqdm(train, desc=f"fit bigram{desc}", leave=False))
    return unigram, bigram


def likelihood(
    model,
    vocab: Vocab,
    test: list[EvalSequence],
    train: Pairs,
    batch_size: int,
    kn_discount: float,
    augmented: tuple[list[EvalSequence], Pairs] | None = None,
) -> dict[str, Any]:
    """Model and n-gram rates on `test`, the baselines fitted on `train` (sequences of the same
    builder); the same on `augmented` (test, train) sequences when given; and the fill-section
    NLL of the infill samples under the context conditions (`infill_context`)."""
    unigram, bigram = fit_baselines(train, vocab.size, kn_discount)
    out, nll = _score_set(model, vocab, test, unigram, bigram, batch_size, "test NLL")
    if augmented is not None:
        aug_test, aug_train = augmented
        aug_baselines = fit_baselines(aug_train, vocab.size, kn_discount, " (augmented)")
        out["augmented"], _ = _score_set(model, vocab, aug_test, *aug_baselines, batch_size, "augmented test NLL")

    out["infill_context"] = infill_context(model, vocab, test, nll, batch_size)
    out["baselines"] = {
        "unigram": "add-one (Laplace) over the model vocabulary",
        "bigram": f"interpolated Kneser-Ney, discount {kn_discount}, add-one continuation unigram",
        "train_sequences": len(train),
        "train_targets": int(unigram.counts.sum()),
    }
    return out


def infill_context(model, vocab: Vocab, test: list[EvalSequence], nll: list[np.ndarray], batch_size: int) -> dict:
    """Fill-section rates of the infill samples that have a twin under every condition: after the
    real prompt (`with_context`), with the target alone (`without_context`), and per condition,
    with each condition's bits per note as a ratio of the real prompt's."""
    counter = TargetCounts(vocab)
    paired = [i for i, s in enumerate(test) if len(s.conditions) == len(CONDITIONS)]
    totals = {"real": np.zeros(4), **{c: np.zeros(4) for c in CONDITIONS}}
    for i in paired:
        totals["real"] += _fill_totals(counter, test[i].ids, test[i].labels, nll[i], test[i].fill_start)
    for condition in CONDITIONS:
        twins = [test[i].conditions[condition] for i in paired]
        twin_nll = model_nll(model, twins, batch_size, vocab.pad, f"infill NLL ({condition})", vocab)
        for (ids, labels), nats in zip(twins, twin_nll):
            totals[condition] += _fill_totals(counter, ids, labels, nats, _fill_start(ids, vocab))
    rates = {name: _rates(v[0], *(int(x) for x in v[1:])) for name, v in totals.items()}
    real = rates["real"]["bits_per_note"]
    context_tracks = [int((test[i].ids == vocab.track_start).sum()) - 1 for i in paired]
    return {
        "samples": len(paired),
        "mean_context_tracks": float(np.mean(context_tracks)) if context_tracks else math.nan,
        "with_context": rates["real"],
        "without_context": rates["alone"],
        "context_gain_bits_per_note": rates["alone"]["bits_per_note"] - real,
        "conditions": rates,
        # bits per note of the fill under each condition / under the real prompt (> 1: the real one helps)
        "ratio_to_real": {c: rates[c]["bits_per_note"] / real if real else math.nan for c in CONDITIONS},
    }


def _fill_totals(
    counter: TargetCounts, ids: np.ndarray, labels: np.ndarray, nats: np.ndarray, fill_start: int
) -> np.ndarray:
    _, tgt, mask = targets(ids, labels)
    positions = np.flatnonzero(mask) + 1  # index in ids of each target
    inside = positions > fill_start
    return np.array(counter.totals(nats[inside], tgt[inside]))
