"""Likelihood of test sequences: the model's NLL per target, rates per token, note and bar, the
unigram and bigram baselines beside it (`mmm.evaluate.metrics`), and the fill-section NLL of bar-infill
samples with and without the other tracks."""

from __future__ import annotations

import copy
import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass
class EvalSequence:
    ids: np.ndarray
    labels: np.ndarray
    task: str
    fill_start: int | None = None  # index of FillBar_Start in ids (infill samples)
    alone: tuple[np.ndarray, np.ndarray] | None = None  # the infill sample with the target track alone


def _fill_start(ids: np.ndarray, vocab: Vocab) -> int:
    return int(np.flatnonzero(ids == vocab.fill_start)[0])


def build_sequences(
    store: Store,
    chunks: Sequence[int],
    builder: SequenceBuilder,
    per_chunk: int,
    seed: str,
    pair_alone: bool,
    desc: str,
) -> list[EvalSequence]:
    """`per_chunk` samples of each chunk, each from its own seeded RNG. With `pair_alone`, an
    infill sample with context tracks also gets its twin without them (same span, ACs, shifts)."""
    vocab = builder.vocab
    out = []
    for i in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        chunk = store[i]
        for k in range(per_chunk):
            rng = random.Random(f"{seed}-{i}-{k}")
            spec = builder.draw_spec(chunk, rng)
            ids, labels = builder.build(chunk, spec, rng)
            seq = EvalSequence(ids, labels, spec.task)
            if spec.task == "infill":
                seq.fill_start = _fill_start(ids, vocab)
                if pair_alone and len(spec.tracks) > 1:
                    # fit() drops context, ACs or bars only when too long; with context kept,
                    # nothing else was dropped, and the target alone is shorter: same fill section.
                    alone = copy.deepcopy(spec)
                    alone.tracks = [spec.target]
                    a_ids, a_labels = builder.build(chunk, alone, random.Random(0))
                    start = _fill_start(a_ids, vocab)
                    if np.array_equal(a_ids[start:], ids[seq.fill_start :]):
                        seq.alone = (a_ids, a_labels)
            out.append(seq)
    return out


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
    NLL of the infill samples with and without the other tracks."""
    counter = TargetCounts(vocab)
    unigram, bigram = fit_baselines(train, vocab.size, kn_discount)
    out, nll = _score_set(model, vocab, test, unigram, bigram, batch_size, "test NLL")
    if augmented is not None:
        aug_test, aug_train = augmented
        aug_baselines = fit_baselines(aug_train, vocab.size, kn_discount, " (augmented)")
        out["augmented"], _ = _score_set(model, vocab, aug_test, *aug_baselines, batch_size, "augmented test NLL")

    # Fill sections (bar infilling) with and without the other tracks.
    paired = [i for i, s in enumerate(test) if s.alone is not None]
    alone_nll = model_nll(model, [test[i].alone for i in paired], batch_size, vocab.pad, "infill NLL alone", vocab)
    with_ctx, without = np.zeros(4), np.zeros(4)
    context_tracks = []
    for j, i in enumerate(paired):
        seq = test[i]
        with_ctx += _fill_totals(counter, seq.ids, seq.labels, nll[i], seq.fill_start)
        a_ids, a_labels = seq.alone
        without += _fill_totals(counter, a_ids, a_labels, alone_nll[j], _fill_start(a_ids, vocab))
        context_tracks.append(int((seq.ids == vocab.track_start).sum()) - 1)
    out["infill_context"] = {
        "samples": len(paired),
        "mean_context_tracks": float(np.mean(context_tracks)) if context_tracks else math.nan,
        "with_context": _rates(with_ctx[0], *(int(x) for x in with_ctx[1:])),
        "without_context": _rates(without[0], *(int(x) for x in without[1:])),
    }
    ic = out["infill_context"]
    ic["context_gain_bits_per_note"] = ic["without_context"]["bits_per_note"] - ic["with_context"]["bits_per_note"]
    out["baselines"] = {
        "unigram": "add-one (Laplace) over the model vocabulary",
        "bigram": f"interpolated Kneser-Ney, discount {kn_discount}, add-one continuation unigram",
        "train_sequences": len(train),
        "train_targets": int(unigram.counts.sum()),
    }
    return out


def _fill_totals(
    counter: TargetCounts, ids: np.ndarray, labels: np.ndarray, nats: np.ndarray, fill_start: int
) -> np.ndarray:
    _, tgt, mask = targets(ids, labels)
    positions = np.flatnonzero(mask) + 1  # index in ids of each target
    inside = positions > fill_start
    return np.array(counter.totals(nats[inside], tgt[inside]))
