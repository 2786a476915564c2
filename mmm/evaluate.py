"""`python -m mmm.evaluate ckpt=<folder|.ckpt> data=<source>`: evaluate a checkpoint on the
test split of a token store; writes `metrics.json`, `report.md` and PNG plots to `out_dir`.

1. Likelihood of test sequences built like training samples (same SequenceBuilder, seeded):
   nats and bits per token, bits per note (total NLL / notes of the predicted targets:
   comparable across tokenizers) and per bar, beside unigram and bigram baselines fitted on
   train-split sequences of the same builder (`mmm.metrics`). Test pieces are taken as they
   are; the same draws with the training augmentation are measured too. For the bar-infill
   samples, the NLL of the fill section (the bars after FillBar_Start) with the other tracks
   in the prompt and with the target track alone: the same bars, ACs and random choices.
2. Generation through the `mmm.MMM` API on test pieces: infill requests (a span of bars of
   one track) and add-track requests (one track regenerated over a window of bars), each
   once without controls and once per attribute-control family with a value drawn from
   the test split's own AC values. Every output is checked for structure (decodes, exact
   bar count, every note outside the span untouched); each control family is scored by
   recomputing it on the output with miditok's classes (`mmm.data.controls`), beside the
   output of the same request without the control; the generated spans of the uncontrolled
   infills are compared with the real bars they replace (musical statistics).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from miditok.utils import get_bars_ticks
from omegaconf import DictConfig
from symusic import Score, Track
from tqdm import tqdm

from mmm.api import MMM, count_bars
from mmm.config import plain, require_keys
from mmm.data.controls import bar_controls, track_controls
from mmm.data.pieces import carry_tempo
from mmm.data.sequences import IGNORE_INDEX, SequenceBuilder
from mmm.data.store import Store
from mmm.generation import SamplingConfig
from mmm.metrics import (
    LOG2,
    MUSICAL_STATS,
    BigramKN,
    UnigramLM,
    adherence,
    histogram_overlap,
    musical_stats,
    summarize,
    targets,
)
from mmm.tokenizer import Vocab, vocab_fingerprint

log = logging.getLogger(__name__)

EVAL_KEYS = {
    "ckpt", "split", "seed", "out_dir", "device", "num_threads", "max_seq_len", "max_chunks",
    "samples_per_chunk", "augment", "batch_size", "baseline_samples_per_chunk", "baseline_max_chunks",
    "kn_discount", "num_requests", "infill_bars", "piece_bars", "track_bars", "controls", "sampling",
    "max_bar_tokens", "max_failures_listed",
}
GROUPS = {"data", "tokenizer", "paths", "hydra"}
_POSITIVE_INTS = ("samples_per_chunk", "batch_size", "baseline_samples_per_chunk", "infill_bars", "piece_bars",
                  "track_bars")
METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"


# --- config and inputs ------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Fail before any work on settings that cannot run, naming the key."""
    top = {k: v for k, v in cfg.items() if k not in GROUPS}
    require_keys("evaluate", top, EVAL_KEYS)
    for key in _POSITIVE_INTS:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected an integer >= 1")
    for key in ("num_requests", "seed"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ValueError(f"{key}={cfg[key]!r}: expected an integer >= 0")
    for key in ("max_chunks", "baseline_max_chunks", "max_seq_len"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value!r}: expected null or an integer >= 1")
    if cfg.split not in ("train", "valid", "test"):
        raise ValueError(f"split={cfg.split!r}: expected test (or valid, train)")
    require_keys("sampling", cfg.sampling, {"temperature", "top_k", "top_p"})
    SamplingConfig(**plain(cfg.sampling)).validate()
    if cfg.infill_bars > cfg.piece_bars:
        raise ValueError(f"infill_bars={cfg.infill_bars} exceeds piece_bars={cfg.piece_bars}")


def open_store(cfg: DictConfig, tokenizer) -> Store:
    """The store split to evaluate; preprocessed first when missing. Its base vocabulary must
    be the checkpoint's (vocab fingerprints)."""
    path = Path(cfg.data.store)
    if not (path / "manifest.json").is_file() or not (path / "report.json").is_file():
        from mmm.preprocess import preprocess

        log.info("no complete store at %s: preprocessing %s first", path, cfg.data.name)
        preprocess(cfg.data, cfg.tokenizer)
    store = Store(path, cfg.split)
    ours, theirs = vocab_fingerprint(tokenizer), store.manifest.get("vocab_fingerprint")
    if ours != theirs:
        raise ValueError(
            f"vocabulary mismatch: the store at {path} was tokenized with base vocabulary {theirs}, but the "
            f"checkpoint {cfg.ckpt} has base vocabulary {ours}. Evaluate on a store made with the checkpoint's "
            "tokenizer settings (data=<its source>, or data.store=<its store>, or tokenizer=<its config> to "
            "preprocess a new one into another data.dir)"
        )
    if len(store) == 0:
        raise ValueError(f"the {cfg.split} split of {path} is empty: nothing to evaluate")
    return store


def _subset(n: int, limit: int | None, seed: str) -> list[int]:
    """All indices, or a seeded random subset of `limit` of them (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


# --- likelihood -------------------------------------------------------------------------------
@dataclass
class EvalSequence:
    ids: np.ndarray
    labels: np.ndarray
    task: str
    fill_start: int | None = None  # index of FillBar_Start in ids (infill samples)
    alone: tuple[np.ndarray, np.ndarray] | None = None  # the infill sample with the target track alone


def _fill_start(ids: np.ndarray, vocab: Vocab) -> int:
    return int(np.flatnonzero(ids == vocab.fill_start)[0])


def build_sequences(store: Store, chunks: Sequence[int], builder: SequenceBuilder, per_chunk: int, seed: str,
                    pair_alone: bool, desc: str) -> list[EvalSequence]:
    """`per_chunk` samples of each chunk, each from its own seeded RNG. With `pair_alone`, an
    infill sample with context tracks also gets its twin without them (same span, ACs, shifts)."""
    vocab = builder.vocab
    out = []
    for i in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        chunk = store[i]
        for k in range(per_chunk):
            rng = random.Random(f"{seed}-{i}-{k}")
            spec = builder.draw_spec(chunk, rng)
            ids, labels = builder.fit(chunk, spec, rng)
            seq = EvalSequence(ids, labels, spec.task)
            if spec.task == "infill":
                seq.fill_start = _fill_start(ids, vocab)
                if pair_alone and len(spec.tracks) > 1:
                    # fit() drops context, ACs or bars only when too long; with context kept,
                    # nothing else was dropped, and the target alone is shorter: same fill section.
                    alone = copy.deepcopy(spec)
                    alone.tracks = [spec.target]
                    a_ids, a_labels = builder.fit(chunk, alone, random.Random(0))
                    start = _fill_start(a_ids, vocab)
                    if np.array_equal(a_ids[start:], ids[seq.fill_start:]):
                        seq.alone = (a_ids, a_labels)
            out.append(seq)
    return out


@torch.no_grad()
def model_nll(model, sequences: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int,
              desc: str) -> list[np.ndarray]:
    """Per sequence, the NLL (nats) of each target (positions of `metrics.targets`)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i][0]), i))
    out: list[np.ndarray | None] = [None] * len(sequences)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[s:s + batch_size]
        length = max(len(sequences[i][0]) for i in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, :len(sequences[i][0])] = torch.from_numpy(sequences[i][0])
            labels[r, :len(sequences[i][1])] = torch.from_numpy(sequences[i][1])
        logits = model(ids[:, :-1].to(device)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten().to(device), ignore_index=IGNORE_INDEX,
                              reduction="none").view(len(rows), -1).cpu().numpy()
        for r, i in enumerate(rows):
            mask = sequences[i][1][1:] != IGNORE_INDEX
            out[i] = nll[r, :len(mask)][mask].astype(np.float64)
    return out  # type: ignore[return-value]


def _rates(nats: float, tokens: int, notes: int, bars: int) -> dict[str, float]:
    bits = nats / LOG2
    return {
        "nats_per_token": nats / max(tokens, 1), "bits_per_token": bits / max(tokens, 1),
        "bits_per_note": bits / notes if notes else math.nan, "bits_per_bar": bits / bars if bars else math.nan,
        "tokens": tokens, "notes": notes, "bars": bars,
    }


class TargetCounts:
    """Notes and bars carried by model ids (a BPE id may hold several notes or a bar start)."""

    def __init__(self, vocab: Vocab) -> None:
        self.notes = vocab.notes_per_model_id
        self.bars = np.array([sum(b == vocab.bar for b in bases) for bases in vocab.model_to_base])

    def totals(self, nats: np.ndarray, tgt: np.ndarray) -> tuple[float, int, int, int]:
        return float(nats.sum()), len(tgt), int(self.notes[tgt].sum()), int(self.bars[tgt].sum())


def _score_set(model, vocab: Vocab, test: list[EvalSequence], unigram: UnigramLM, bigram: BigramKN,
               batch_size: int, desc: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Rates of the model and both baselines on `test`, and the model's per-target NLL."""
    counter = TargetCounts(vocab)
    pairs = [(s.ids, s.labels) for s in test]
    nll = model_nll(model, pairs, batch_size, vocab.pad, desc)
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


def fit_baselines(train: list[tuple[np.ndarray, np.ndarray]], vocab_size: int, kn_discount: float,
                  desc: str = "") -> tuple[UnigramLM, BigramKN]:
    unigram = UnigramLM(vocab_size).fit(tqdm(train, desc=f"fit unigram{desc}", leave=False))
    bigram = BigramKN(vocab_size, kn_discount).fit(tqdm(train, desc=f"fit bigram{desc}", leave=False))
    return unigram, bigram


Pairs = list[tuple[np.ndarray, np.ndarray]]  # (ids, labels) of sequences


def likelihood(model, vocab: Vocab, test: list[EvalSequence], train: Pairs, batch_size: int, kn_discount: float,
               augmented: tuple[list[EvalSequence], Pairs] | None = None) -> dict[str, Any]:
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
    alone_nll = model_nll(model, [test[i].alone for i in paired], batch_size, vocab.pad, "infill NLL alone")
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
    out["baselines"] = {"unigram": "add-one (Laplace) over the model vocabulary",
                        "bigram": f"interpolated Kneser-Ney, discount {kn_discount}, add-one continuation unigram",
                        "train_sequences": len(train),
                        "train_targets": int(unigram.counts.sum())}
    return out


def _fill_totals(counter: TargetCounts, ids: np.ndarray, labels: np.ndarray, nats: np.ndarray,
                 fill_start: int) -> np.ndarray:
    _, tgt, mask = targets(ids, labels)
    positions = np.flatnonzero(mask) + 1  # index in ids of each target
    inside = positions > fill_start
    return np.array(counter.totals(nats[inside], tgt[inside]))


# --- generation through the API ---------------------------------------------------------------
class ControlCodec:
    """AC base ids <-> control values, with the names and kinds of `mmm.api.Controls`."""

    def __init__(self, controls) -> None:
        self.kinds: dict[tuple[str, str], str] = {}
        self.bins: dict[tuple[str, str], list[float]] = {}
        self.inverse: dict[int, tuple[str, str, Any]] = {}
        for level, table in (("bar", controls.bar), ("track", controls.track)):
            for name, ctl in table.items():
                self.kinds[level, name] = ctl.kind
                if ctl.kind == "durations":
                    for dname, ids in ctl.values.items():
                        for flag, i in enumerate(ids):
                            if i is not None:
                                self.inverse[i] = (level, name, (dname, flag))
                else:
                    self.bins[level, name] = sorted(ctl.values)
                    for value, i in ctl.values.items():
                        self.inverse[i] = (level, name, value)

    def families(self, level: str) -> list[str]:
        return [name for lv, name in self.kinds if lv == level]

    def values(self, ids: Sequence[int]) -> dict[str, Any]:
        """{name: value} of AC ids (sets as frozensets)."""
        out: dict[str, Any] = {}
        for i in ids:
            entry = self.inverse.get(i)
            if entry is None:
                continue
            level, name, value = entry
            kind = self.kinds[level, name]
            if kind in ("int", "float"):
                out[name] = value
            elif kind == "set":
                out.setdefault(name, set()).add(value)
            else:
                dname, flag = value
                names = out.setdefault(name, set())
                if flag:
                    names.add(dname)
        return {k: frozenset(v) if isinstance(v, set) else v for k, v in out.items()}

    def empty_value(self, level: str, name: str) -> Any:
        """The value of a control on a bar without notes (None: undefined, a miss)."""
        if self.kinds[level, name] == "int" and name == "note_density" and 0 in self.bins[level, name]:
            return 0
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def _notes(track: Track) -> dict[str, np.ndarray]:
    return {k: v.astype(np.int64) for k, v in track.notes.numpy().items()}


@dataclass
class Analysed:
    """A score as the tokenizer sees it: preprocessed, note-only tracks by input index."""

    score: Score
    tracks: dict[int, Track]


def analyse(score: Score, tokenizer) -> Analysed:
    marked = score.copy()
    for i, track in enumerate(marked.tracks):
        track.name = str(i)
    pre = tokenizer.preprocess_score(marked)
    tracks = {}
    for track in pre.tracks:
        notes = Track(track.name, track.program, track.is_drum)
        notes.notes = track.notes.copy()
        notes.sort()
        tracks[int(track.name)] = notes
    return Analysed(pre, tracks)


def bar_ticks_of(pre: Score, num_bars: int) -> list[int]:
    """Start ticks of `num_bars` + 1 bars (the last is the end of the last bar)."""
    ticks = [int(t) for t in get_bars_ticks(pre, only_notes_onsets=True)][: num_bars + 1]
    ts = pre.time_signatures[-1] if len(pre.time_signatures) else None
    per_bar = ts.numerator * pre.tpq * 4 // ts.denominator if ts is not None else 4 * pre.tpq
    while len(ticks) < num_bars + 1:
        ticks.append(ticks[-1] + per_bar)
    return ticks


def window_score(chunk: Mapping, first: int, num_bars: int, tokenizer, vocab: Vocab) -> tuple[Score, list[int]]:
    """Bars [first, first+num_bars) of a stored chunk decoded to a Score; tracks without notes
    in the window are left out. Returns the score and the chunk track of each score track."""
    ids, kept = [], []
    for t, program in enumerate(chunk["programs"]):
        bars = [list(b) for b in chunk["bars"][t][first:first + num_bars]]
        if not any(vocab.is_note_start[i] for bar in bars for i in bar):
            continue
        if first > 0:
            carry_tempo(chunk["bars"][t][:first], bars[0], vocab)
        ids += [vocab.track_start, vocab.program_id[program], *(i for bar in bars for i in bar), vocab.track_end]
        kept.append(t)
    if not kept:
        return Score(480), []
    score = tokenizer.decode(ids)  # base ids are their own ids in model space
    if len(score.tracks) != len(kept):
        raise RuntimeError(f"decoding a test window gave {len(score.tracks)} tracks for {len(kept)}")
    return score, kept


def _span_notes(track: Track | None, start: int, end: int) -> dict[str, np.ndarray]:
    if track is None:
        return {k: np.zeros(0, dtype=np.int64) for k in ("time", "duration", "pitch", "velocity")}
    notes = _notes(track)
    inside = (notes["time"] >= start) & (notes["time"] < end)
    return {k: v[inside] for k, v in notes.items()}


def pitch_in_range(real: Track | None, generated: Track | None, start: int, end: int) -> tuple[int, int]:
    """(generated notes in [start, end) within the pitch range the track has outside that span,
    widened by 3 semitones; all generated notes there). (0, 0) when either side has no note."""
    if real is None or generated is None:
        return 0, 0
    context = _notes(real)
    outside = context["pitch"][(context["time"] < start) | (context["time"] >= end)]
    if len(outside) == 0:
        return 0, 0
    pitches = _span_notes(generated, start, end)["pitch"]
    return int(((pitches >= outside.min() - 3) & (pitches <= outside.max() + 3)).sum()), len(pitches)


def span_stats(track: Track | None, is_drum: bool, start: int, end: int, tpq: int, ticks_per_bar: int) -> dict[str, float]:
    notes = _span_notes(track, start, end)
    return musical_stats(notes["time"] - start, notes["duration"], notes["pitch"], [is_drum] * len(notes["time"]),
                         end - start, tpq, ticks_per_bar)


def structure(inp: Score, out: Any, report, tokenizer, vocab: Vocab, expected_bars: int,
              keep: Callable[[int, dict], np.ndarray], num_tracks: int) -> dict[str, bool]:
    """Checks of one API output: it decodes (and survives a MIDI round trip); exactly
    `expected_bars` bars were generated and the output has no bar beyond the input's; the
    input notes that `keep(track, notes)` selects, the tempos and time signatures are
    unchanged and the output has `num_tracks` tracks."""
    decoded = isinstance(out, Score)
    if decoded:
        try:
            again = Score.from_midi(out.dumps_midi())
            decoded = sum(len(t.notes) for t in again.tracks) == sum(len(t.notes) for t in out.tracks)
        except Exception:  # noqa: BLE001 - any failure to write/read back is "does not decode"
            decoded = False
    if not decoded:
        return {"decoded": False, "exact_bars": False, "untouched": False}
    bars = sum(sum(1 for i in step.tokens[0] if i == vocab.bar) for step in report.steps)
    exact = bars == expected_bars and count_bars(out, tokenizer) <= max(count_bars(inp, tokenizer), expected_bars)
    untouched = len(out.tracks) == num_tracks and list(out.time_signatures) == list(inp.time_signatures) \
        and list(out.tempos) == list(inp.tempos)
    for k, track in enumerate(inp.tracks):
        if not untouched:
            break
        a, b = _notes(track), _notes(out.tracks[k])
        ka, kb = keep(k, a), keep(k, b)
        untouched = all(np.array_equal(a[f][ka], b[f][kb]) for f in a)
    return {"decoded": True, "exact_bars": bool(exact), "untouched": bool(untouched)}


class Requests:
    """Runs the API requests and collects everything the report needs."""

    def __init__(self, mmm, store: Store, cfg: DictConfig) -> None:
        self.mmm, self.store, self.cfg = mmm, store, cfg
        self.tokenizer, self.vocab = mmm.tokenizer, mmm.vocab
        self.codec = ControlCodec(mmm.controls)
        self.sampling = dict(plain(cfg.sampling))
        if cfg.max_bar_tokens is not None:
            self.sampling["max_bar_tokens"] = int(cfg.max_bar_tokens)
        self.chunks = _subset(len(store), cfg.max_chunks, f"{cfg.seed}-chunks")
        self.pools = self._pools()
        self.structure: dict[str, list[dict]] = defaultdict(list)
        self.failures: list[str] = []
        self.adherence: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.stats: dict[str, dict[str, list[float]]] = {"real": defaultdict(list), "generated": defaultdict(list)}
        self.generation = {"calls": 0, "new_tokens": 0, "decode_s": 0.0, "prefill_s": 0.0}
        self.in_range = [0, 0]  # uncontrolled infills: generated notes within the track's range +-3, all notes

    def _pools(self) -> dict[tuple[str, str], list]:
        """Every value each control takes in the evaluated chunks: requests draw from them."""
        pools: dict[tuple[str, str], list] = defaultdict(list)
        for i in self.chunks:
            chunk = self.store[i]
            for t in range(len(chunk["programs"])):
                for name, value in self.codec.values([x for f in chunk["track_acs"][t] for x in f]).items():
                    pools["track", name].append(value)
                for bar in chunk["bar_acs"][t]:
                    for name, value in self.codec.values([x for f in bar for x in f]).items():
                        pools["bar", name].append(value)
        return dict(pools)

    def _call(self, fn: Callable, *args, **kwargs) -> tuple[Any, Any]:
        try:
            out = fn(*args, **kwargs, **self.sampling)
        except Exception as err:  # noqa: BLE001 - a failed generation is a structure failure, reported
            self.failures.append(f"{fn.__name__}: {type(err).__name__}: {err}")
            return None, None
        report = self.mmm.last_report
        summary = report.summary()
        self.generation["calls"] += 1
        self.generation["new_tokens"] += summary["new_tokens"]
        self.generation["decode_s"] += summary["decode_s"]
        self.generation["prefill_s"] += summary["prefill_s"]
        return out, report

    def _check(self, task: str, inp: Score, out: Any, report: Any, expected_bars: int,
               keep: Callable[[int, dict], np.ndarray], num_tracks: int) -> None:
        if out is None:
            self.structure[task].append({"decoded": False, "exact_bars": False, "untouched": False})
            return
        self.structure[task].append(structure(inp, out, report, self.tokenizer, self.vocab, expected_bars, keep,
                                                num_tracks))

    def _window(self, kind: str, r: int, max_bars: int):
        """Request r's seeded rng, test chunk and window of at most `max_bars` bars as a Score."""
        rng = random.Random(f"{self.cfg.seed}-{kind}-{r}")
        chunk = self.store[self.chunks[r % len(self.chunks)]]
        nb = len(chunk["bars"][0])
        n = min(max_bars, nb)
        first = rng.randrange(0, nb - n + 1)
        score, kept = window_score(chunk, first, n, self.tokenizer, self.vocab)
        return rng, chunk, first, n, score, kept

    # -- infill: bar controls, musical statistics -------------------------------------------------
    def infill(self, r: int) -> None:
        cfg, vocab = self.cfg, self.vocab
        rng, chunk, first, n, score, kept = self._window("infill", r, cfg.piece_bars)
        n = min(n, count_bars(score, self.tokenizer))  # trailing bars without notes do not exist for the API
        if not kept or n < 1:
            return
        k = min(cfg.infill_bars, n)
        for _ in range(20):  # a span where some track has notes
            a = rng.randrange(0, n - k + 1)
            b = a + k
            candidates = [j for j, t in enumerate(kept)
                          if any(vocab.is_note_start[i] for bar in chunk["bars"][t][first + a:first + b] for i in bar)]
            if candidates:
                break
        else:
            return
        target = rng.choice(candidates)
        seed = rng.randrange(2**31)
        real = analyse(score, self.tokenizer)
        ticks = bar_ticks_of(real.score, n)
        raw_ticks = [int(round(t * score.tpq / real.score.tpq)) for t in ticks]
        start, end = raw_ticks[a], (raw_ticks[b] if b < n else None)

        def keep(track: int, notes: dict) -> np.ndarray:
            if track != target:
                return np.ones(len(notes["time"]), dtype=bool)
            return (notes["time"] < start) | ((notes["time"] >= end) if end is not None else False)

        def run(controls: Mapping | None) -> Analysed | None:
            out, report = self._call(self.mmm.infill, score, track=target, bars=(a, b), controls=controls, seed=seed)
            self._check("infill", score, out, report, b - a, keep, len(score.tracks))
            if out is None:
                return None
            result = analyse(out, self.tokenizer)
            if result.score.tpq != real.score.tpq:
                raise RuntimeError("the output score is preprocessed to another resolution than its input")
            return result

        baseline = run(None)
        is_drum = score.tracks[target].is_drum
        per_bar = ticks[a + 1] - ticks[a]
        real_stats = span_stats(real.tracks.get(target), is_drum, ticks[a], ticks[b], real.score.tpq, per_bar)
        if baseline is not None and not is_drum:
            inside, total = pitch_in_range(real.tracks.get(target), baseline.tracks.get(target), ticks[a], ticks[b])
            self.in_range[0] += inside
            self.in_range[1] += total
        if baseline is not None:
            gen_stats = span_stats(baseline.tracks.get(target), is_drum, ticks[a], ticks[b], real.score.tpq, per_bar)
            for m in MUSICAL_STATS:
                self.stats["real"][m].append(real_stats[m])
                self.stats["generated"][m].append(gen_stats[m])
        if not cfg.controls:
            return
        without = self._bar_values(baseline, target, ticks, a, b)
        for name in self.codec.families("bar"):
            pool = self.pools.get(("bar", name))
            if not pool:
                continue
            requested = {bar: rng.choice(pool) for bar in range(a, b)}
            out = run({bar: {name: _jsonable(v)} for bar, v in requested.items()})
            achieved = self._bar_values(out, target, ticks, a, b)
            record = self.adherence["bar", name]
            for j, bar in enumerate(range(a, b)):
                record["requested"].append(requested[bar])
                record["with"].append(achieved[j].get(name, self.codec.empty_value("bar", name)) if achieved else None)
                record["without"].append(without[j].get(name, self.codec.empty_value("bar", name)) if without else None)

    def _bar_values(self, result: Analysed | None, target: int, ticks: list[int], a: int, b: int) -> list[dict] | None:
        if result is None:
            return None
        track = result.tracks.get(target)
        if track is None:
            return [{} for _ in range(a, b)]
        per_bar = bar_controls(self.tokenizer, self.vocab, track, result.score.tpq, ticks[:-1])
        return [self.codec.values([i for family in per_bar[bar] for i in family]) for bar in range(a, b)]

    # -- add track: track controls ----------------------------------------------------------------
    def add_track(self, r: int) -> None:
        cfg, vocab = self.cfg, self.vocab
        rng, chunk, first, n, full, kept = self._window("track", r, cfg.track_bars)
        if not kept:
            return
        removed = rng.randrange(len(kept))
        program = chunk["programs"][kept[removed]]
        score = full.copy()
        if len(score.tracks) > 1:  # regenerate that track; a lone track gets a second one
            del score.tracks[removed]
        n = count_bars(score, self.tokenizer)  # the bars the API writes the new track over
        if n < 1:
            return
        seed = rng.randrange(2**31)
        ticks = bar_ticks_of(analyse(score, self.tokenizer).score, n)
        new = len(score.tracks)

        def keep(track: int, notes: dict) -> np.ndarray:
            return np.ones(len(notes["time"]), dtype=bool)

        def run(track_controls: Mapping | None) -> dict | None:
            out, report = self._call(self.mmm.add_track, score, program=program, track_controls=track_controls, seed=seed)
            self._check("add_track", score, out, report, n, keep, len(score.tracks) + 1)
            if out is None:
                return None
            result = analyse(out, self.tokenizer)
            track = result.tracks.get(new)
            if track is None:
                return {}
            ids = track_controls_ids(self.tokenizer, vocab, track, result.score.tpq, ticks[:-1])
            return self.codec.values(ids)

        without = run(None)
        if not cfg.controls:
            return
        for name in self.codec.families("track"):
            pool = self.pools.get(("track", name))
            if not pool:
                continue
            value = rng.choice(pool)
            achieved = run({name: _jsonable(value)})
            record = self.adherence["track", name]
            record["requested"].append(value)
            record["with"].append(achieved.get(name) if achieved is not None else None)
            record["without"].append(without.get(name) if without is not None else None)

    # -- results ----------------------------------------------------------------------------------
    def results(self, max_failures: int) -> dict[str, Any]:
        structure_out: dict[str, Any] = {}
        everything = [c for checks in self.structure.values() for c in checks]
        for task, checks in [("all", everything), *sorted(self.structure.items())]:
            structure_out[task] = {"outputs": len(checks), **{
                key: (float(np.mean([c[key] for c in checks])) if checks else math.nan)
                for key in ("decoded", "exact_bars", "untouched")}}
        structure_out["failures"] = self.failures[:max_failures]
        controls: dict[str, Any] = {"bar": {}, "track": {}}
        for (level, name), record in sorted(self.adherence.items()):
            kind = self.codec.kinds[level, name]
            bins = self.codec.bins.get((level, name))
            controls[level][name] = {
                "kind": kind,
                "with_control": adherence(record["requested"], record["with"], kind, bins),
                "without_control": adherence(record["requested"], record["without"], kind, bins),
                "pairs": [[_jsonable(r), _jsonable(w), _jsonable(wo)]
                          for r, w, wo in zip(record["requested"], record["with"], record["without"])],
            }
        stats: dict[str, Any] = {}
        real, gen = summarize(self.stats["real"]), summarize(self.stats["generated"])
        for m in MUSICAL_STATS:
            stats[m] = {"real_mean": real.get(m, math.nan), "generated_mean": gen.get(m, math.nan),
                        "abs_diff": abs(real.get(m, math.nan) - gen.get(m, math.nan)),
                        "overlap": histogram_overlap(self.stats["real"][m], self.stats["generated"][m]),
                        "n_real": int(sum(not math.isnan(x) for x in self.stats["real"][m])),
                        "n_generated": int(sum(not math.isnan(x) for x in self.stats["generated"][m]))}
        inside, total = self.in_range
        in_range = {"generated_notes": total, "within_3_semitones": inside / total if total else math.nan}
        return {"structure": structure_out, "controls": controls, "musical_stats": stats,
                "pitch_in_context_range": in_range}


def track_controls_ids(tokenizer, vocab: Vocab, track: Track, tpq: int, ticks: Sequence[int]) -> list[int]:
    return [i for family in track_controls(tokenizer, vocab, track, tpq, ticks) for i in family]


# --- outputs ----------------------------------------------------------------------------------
def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> null, numpy scalars -> python, floats rounded to 6 decimals."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.integer | bool):
        return obj if isinstance(obj, bool) else int(obj)
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) or math.isinf(obj) else round(float(obj), 6)
    return obj


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def plot(metrics: dict, stats_values: Mapping[str, Mapping[str, list[float]]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    lik = metrics["likelihood"]
    names = [n for n in ("model", "bigram", "unigram") if n in lik]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key in zip(axes, ("bits_per_token", "bits_per_note", "bits_per_bar")):
        values = [lik[n][key] or 0 for n in names]
        ax.bar(names, values, color=["C0", "C1", "C2"][: len(names)])
        ax.set_title(key.replace("_", " "))
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"test-split likelihood ({metrics['data']['sequences']} sequences)")
    fig.tight_layout()
    fig.savefig(out_dir / "likelihood.png", dpi=100)
    plt.close(fig)
    files.append("likelihood.png")

    controls = [(level, name, c) for level in ("bar", "track") for name, c in metrics["controls"].get(level, {}).items()]
    if controls:
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(controls)), 3.5))
        x = np.arange(len(controls))
        ax.bar(x - 0.2, [c["with_control"]["exact"] or 0 for *_, c in controls], 0.4, label="with control")
        ax.bar(x + 0.2, [c["without_control"]["exact"] or 0 for *_, c in controls], 0.4, label="without (baseline)")
        ax.set_xticks(x, [f"{lv}\n{n}" for lv, n, _ in controls], fontsize=7)
        ax.set_ylabel("exact-bin accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "controls_accuracy.png", dpi=100)
        plt.close(fig)
        files.append("controls_accuracy.png")
        ordinal = [(lv, n, c) for lv, n, c in controls if c["kind"] in ("int", "float") and c["pairs"]]
        if ordinal:
            cols = min(4, len(ordinal))
            rows = -(-len(ordinal) // cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
            for ax, (lv, n, c) in zip(axes.flat, ordinal):
                req = np.array([p[0] for p in c["pairs"]], dtype=float)
                for k, label, marker in ((1, "with", "o"), (2, "without", "x")):
                    ach = np.array([np.nan if p[k] is None else p[k] for p in c["pairs"]], dtype=float)
                    jitter = (np.random.default_rng(k).random(len(req)) - 0.5) * 0.15 * (np.ptp(req) or 1) / 5
                    ax.scatter(req + jitter, ach, s=12, marker=marker, label=label, alpha=0.7)
                lo, hi = np.nanmin(req), np.nanmax(req)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.set_title(f"{lv} {n}", fontsize=9)
                ax.set_xlabel("requested", fontsize=8)
                ax.set_ylabel("achieved", fontsize=8)
            for ax in list(axes.flat)[len(ordinal):]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / "controls_scatter.png", dpi=100)
            plt.close(fig)
            files.append("controls_scatter.png")

    if any(stats_values["real"].get(m) for m in MUSICAL_STATS):
        fig, axes = plt.subplots(2, 3, figsize=(11, 6))
        legend = False
        for ax, m in zip(axes.flat, MUSICAL_STATS):
            real = [x for x in stats_values["real"].get(m, []) if not math.isnan(x)]
            gen = [x for x in stats_values["generated"].get(m, []) if not math.isnan(x)]
            both = real + gen
            if both:
                edges = np.linspace(min(both), max(both) + 1e-9, 11)
                ax.hist(real, edges, alpha=0.5, label="real", density=True)
                ax.hist(gen, edges, alpha=0.5, label="generated", density=True)
                if not legend:
                    ax.legend(fontsize=8)
                    legend = True
            ov = metrics["musical_stats"][m]["overlap"]
            ax.set_title(f"{m} (overlap {_fmt(ov, 2)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "musical_stats.png", dpi=100)
        plt.close(fig)
        files.append("musical_stats.png")
    return files


def summary_lines(metrics: dict) -> list[str]:
    """The headline: does the model beat the baselines, is every output well formed."""
    lik, st = metrics["likelihood"], metrics["structure"]["all"]
    model = lik["model"]["bits_per_note"]
    best = min(("bigram", "unigram"), key=lambda n: lik[n]["bits_per_note"] or math.inf)
    beats = model is not None and lik[best]["bits_per_note"] is not None and model < lik[best]["bits_per_note"]
    rates = [st[k] for k in ("decoded", "exact_bars", "untouched")]
    lines = [f"- bits/note: model {_fmt(model)} vs {best} {_fmt(lik[best]['bits_per_note'])}: "
             f"{'beats' if beats else 'does NOT beat'} both n-gram baselines."]
    if st["outputs"] == 0:
        return [*lines, "- structure: no API request (num_requests=0)."]
    ok = all(r == 1.0 for r in rates)
    return [*lines, f"- structure over {st['outputs']} API outputs: decode {_fmt(rates[0])}, exact bar count "
                    f"{_fmt(rates[1])}, untouched outside the span {_fmt(rates[2])}"
                    + (" (all 100%)." if ok else " (NOT all 100%: see below).")]


def report_markdown(metrics: dict, plots: list[str]) -> str:
    lik, data, ic = metrics["likelihood"], metrics["data"], metrics["likelihood"]["infill_context"]
    lines = [
        "# MMM evaluation",
        "",
        f"Checkpoint `{metrics['checkpoint']}` ({metrics['model']['parameters']:,} parameters, vocab "
        f"{metrics['model']['vocab_size']}, context {metrics['model']['max_seq_len']}); store `{data['store']}`, "
        f"split `{data['split']}`: {data['chunks']} chunks, {data['sequences']} sequences, "
        f"seed {metrics['settings']['seed']}.",
        "",
        *summary_lines(metrics),
        "",
        "## Likelihood (test sequences)",
        "",
        "| model | nats/token | bits/token | bits/note | bits/bar |",
        "|---|---|---|---|---|",
    ]
    for name in ("model", "bigram", "unigram"):
        r = lik[name]
        lines.append(f"| {name} | {_fmt(r['nats_per_token'])} | {_fmt(r['bits_per_token'])} | "
                     f"{_fmt(r['bits_per_note'])} | {_fmt(r['bits_per_bar'])} |")
    m = lik["model"]
    lines += [
        "",
        f"{m['tokens']} target tokens, {m['notes']} notes, {m['bars']} bars. Baselines fitted on "
        f"{lik['baselines']['train_sequences']} train-split sequences built like the test ones: "
        f"unigram {lik['baselines']['unigram']}; "
        f"bigram {lik['baselines']['bigram']}.",
        "",
    ]
    if "augmented" in lik:
        aug = lik["augmented"]
        lines += [
            "The same test draws with the training augmentation (pitch and velocity shifts: the model's "
            "training distribution), the baselines refitted on augmented training sequences.",
            "",
            "| augmented test sequences | bits/token | bits/note | bits/bar |",
            "|---|---|---|---|",
            *[f"| {name} | {_fmt(aug[name]['bits_per_token'])} | {_fmt(aug[name]['bits_per_note'])} | "
              f"{_fmt(aug[name]['bits_per_bar'])} |" for name in ("model", "bigram", "unigram")],
            "",
        ]
    lines += [
        "### Bar infilling: fill-section NLL with vs without the other tracks",
        "",
        f"{ic['samples']} infill samples (mean {_fmt(ic['mean_context_tracks'], 1)} context tracks); the same "
        "target bars, ACs and random choices, only the other tracks removed from the prompt.",
        "",
        "| prompt | bits/token | bits/note | bits/bar |",
        "|---|---|---|---|",
    ]
    for key in ("with_context", "without_context"):
        r = ic[key]
        lines.append(f"| {key.replace('_', ' ')} | {_fmt(r['bits_per_token'])} | {_fmt(r['bits_per_note'])} | "
                     f"{_fmt(r['bits_per_bar'])} |")
    st = metrics["structure"]
    lines += [
        "",
        "## Structure (API outputs)",
        "",
        "| task | outputs | decode | exact bar count | untouched outside the span |",
        "|---|---|---|---|---|",
    ]
    for task, s in st.items():
        if task == "failures":
            continue
        lines.append(f"| {task} | {s['outputs']} | {_fmt(s['decoded'])} | {_fmt(s['exact_bars'])} | "
                     f"{_fmt(s['untouched'])} |")
    if st["failures"]:
        lines += ["", "Failures:", *[f"- `{f}`" for f in st["failures"]]]
    lines += [
        "",
        "## Attribute-control adherence",
        "",
        "Requested values are drawn from the values each control takes in the evaluated split; the "
        "achieved value is recomputed on the output with miditok's classes. *without*: the same request "
        "(piece, span, seed) generated without the control.",
        "",
        "| level | control | n | exact (with / without) | ±1 bin (with / without) | Spearman (with / without) "
        "| Jaccard (with / without) |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in ("bar", "track"):
        for name, c in metrics["controls"].get(level, {}).items():
            w, wo = c["with_control"], c["without_control"]
            lines.append(
                f"| {level} | {name} | {w['n']} | {_fmt(w['exact'])} / {_fmt(wo['exact'])} | "
                f"{_fmt(w.get('within_1'))} / {_fmt(wo.get('within_1'))} | "
                f"{_fmt(w.get('spearman'))} / {_fmt(wo.get('spearman'))} | "
                f"{_fmt(w.get('jaccard'))} / {_fmt(wo.get('jaccard'))} |")
    lines += [
        "",
        "## Musical statistics: generated vs real bars (uncontrolled infills)",
        "",
        "| statistic | real | generated | abs diff | histogram overlap | n real / generated |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in metrics["musical_stats"].items():
        lines.append(f"| {name} | {_fmt(s['real_mean'])} | {_fmt(s['generated_mean'])} | {_fmt(s['abs_diff'])} | "
                     f"{_fmt(s['overlap'])} | {s['n_real']} / {s['n_generated']} |")
    r = metrics["pitch_in_context_range"]
    lines += ["", f"Generated notes of uncontrolled infills within the target track's pitch range around the span "
                  f"(+-3 semitones): {_fmt(r['within_3_semitones'])} of {r['generated_notes']}."]
    g = metrics["timings"]
    lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots], "",
              f"Run time {g['total_s']:.0f} s (likelihood {g['likelihood_s']:.0f} s, generation {g['generation_s']:.0f} s, "
              f"{g['generated_tokens']} tokens generated at {_fmt(g['tokens_per_s'], 0)} tokens/s).", ""]
    return "\n".join(lines)


# --- entry point ------------------------------------------------------------------------------
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt` as configured; writes metrics.json, report.md and plots to `cfg.out_dir`."""
    check_config(cfg)
    previous = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    try:  # the caller's thread count is restored: a later training in the same process keeps its numerics
        return _evaluate(cfg)
    finally:
        torch.set_num_threads(previous)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    mmm = MMM.from_pretrained(cfg.ckpt, device=cfg.device, num_threads=cfg.num_threads)
    model, vocab = mmm.model, mmm.vocab
    store = open_store(cfg, mmm.tokenizer)
    context = model.config.max_seq_len
    max_seq_len = context if cfg.max_seq_len is None else cfg.max_seq_len
    if max_seq_len > context:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model context ({context})")
    # The n-gram baselines are fitted on train-split sequences of the same builder as the test
    # sequences: the pieces as they are, unless `augment`. Without `augment`, both are also
    # measured on the training augmentation (what the model was trained on).
    train_cfg = dict(plain(cfg.data.sequences))
    augmenting = SequenceBuilder(vocab, train_cfg, max_seq_len)
    builder = augmenting if cfg.augment else SequenceBuilder(
        vocab, {**train_cfg, "pitch_shift": 0, "velocity_shift": 0}, max_seq_len)
    chunks = _subset(len(store), cfg.max_chunks, f"{cfg.seed}-chunks")
    train_store = Store(store.path, "train")
    if len(train_store) == 0:
        raise ValueError(f"the train split of {store.path} is empty: the n-gram baselines need it")
    train_chunks = _subset(len(train_store), cfg.baseline_max_chunks, f"{cfg.seed}-train-chunks")
    test_seed, train_seed = f"{cfg.seed}-{cfg.split}", f"{cfg.seed}-train"

    def sequences(b: SequenceBuilder, what: str) -> tuple[list[EvalSequence], list[tuple[np.ndarray, np.ndarray]]]:
        test = build_sequences(store, chunks, b, cfg.samples_per_chunk, test_seed, b is builder, f"{cfg.split} {what}")
        train = build_sequences(train_store, train_chunks, b, cfg.baseline_samples_per_chunk, train_seed, False,
                                f"train {what}")
        return test, [(s.ids, s.labels) for s in train]

    test, train = sequences(builder, "sequences")
    augmented = None if cfg.augment else sequences(augmenting, "sequences (augmented)")
    lik = likelihood(model, vocab, test, train, cfg.batch_size, cfg.kn_discount, augmented)
    t_lik = time.perf_counter() - t0

    requests = Requests(mmm, store, cfg)
    jobs = [(kind, r) for r in range(cfg.num_requests) for kind in ("infill", "add_track")]
    for kind, r in tqdm(jobs, desc="API requests", unit="request"):
        getattr(requests, kind)(r)
    generated = requests.results(cfg.max_failures_listed)
    t_gen = time.perf_counter() - t0 - t_lik

    metrics: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "model": {"parameters": model.num_parameters(), "vocab_size": vocab.size, "max_seq_len": context},
        "data": {"store": str(store.path), "split": cfg.split, "chunks": len(chunks), "sequences": len(test),
                 "vocab_fingerprint": store.manifest.get("vocab_fingerprint")},
        "likelihood": lik,
        **generated,
        "settings": {k: plain(cfg[k]) for k in sorted(EVAL_KEYS - {"ckpt", "out_dir"})},
    }
    gen = requests.generation
    metrics["timings"] = {
        "likelihood_s": t_lik, "generation_s": t_gen, "api_calls": gen["calls"], "generated_tokens": gen["new_tokens"],
        "tokens_per_s": gen["new_tokens"] / gen["decode_s"] if gen["decode_s"] > 0 else math.nan,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["timings"]["total_s"] = time.perf_counter() - t0
    metrics = _clean(metrics)
    plots = plot(metrics, requests.stats, out_dir)
    metrics["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out_dir / REPORT_FILE).write_text(report_markdown(metrics, plots))
    log.info("wrote %s, %s and %d plots to %s", METRICS_FILE, REPORT_FILE, len(plots), out_dir)
    return metrics


def main() -> None:
    import hydra

    @hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        metrics = evaluate(cfg)
        lik = metrics["likelihood"]
        print(json.dumps({name: {k: lik[name][k] for k in ("bits_per_token", "bits_per_note")}
                          for name in ("model", "bigram", "unigram")}))
        print(json.dumps({k: v for k, v in metrics["structure"]["all"].items()}))
        print(f"report: {Path(cfg.out_dir) / REPORT_FILE}")

    _run()


if __name__ == "__main__":
    main()
