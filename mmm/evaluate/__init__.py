"""`python -m mmm.evaluate ckpt=<folder|.ckpt> data=<source>`: evaluate a checkpoint on the
test split of a token store; writes `metrics.json`, `report.md` and PNG plots to `out_dir`.

1. Likelihood of test sequences built like training samples (same SequenceBuilder, seeded):
   nats and bits per token, bits per note (total NLL / notes of the predicted targets:
   comparable across tokenizers) and per bar, beside unigram and bigram baselines fitted on
   train-split sequences of the same builder (`mmm.evaluate.metrics`). Test pieces are taken as they
   are; the same draws with the training augmentation are measured too. For the bar-infill
   samples, the NLL of the fill section (the bars after FillBar_Start) after four prompts: the
   real one, the other tracks shifted one bar later, the other tracks of another piece, the
   target track alone (the same target ids, ACs and random choices each time).
2. Generation through the `mmm.MMM` API on test pieces: infill requests (a span of bars of
   one track) and add-track requests (one track regenerated over a window of bars), each
   once without controls and once per attribute-control family with a value drawn from
   the test split's own AC values. Every output is checked for structure (decodes, exact
   bar count, every note outside the span untouched); each control family is scored by
   recomputing it on the output with miditok's classes (`mmm.controls.measure`), beside the
   output of the same request without the control; the generated spans of the uncontrolled
   infills are compared with the real bars they replace (musical statistics).
3. Listening: bars in the middle of every track of each test piece infilled without controls
   by the model (the real prompt, with and without the decoding constraints that keep the
   track's range and monophony; the other tracks shifted a bar; the track alone) and by naive
   baselines, each judged against the real piece: onset F1 against the original bars,
   consonance with the real other tracks, pitches in range (`mmm.evaluate.listening`).

Modules: `likelihood` (1.), `requests` (2.), `listening` (3.), `analysis` (scores and musical
statistics), `report` (plots and Markdown); this one checks the config, opens the store and
runs them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from mmm.config import at_least, check_section, plain, within
from mmm.data.datamodule import DataConfig
from mmm.data.prepare import ensure_store
from mmm.data.sequences import SequenceBuilder
from mmm.data.store import Store, setting_changes, tokenizer_settings
from mmm.evaluate.likelihood import EvalSequence, Pairs, build_sequences, likelihood
from mmm.evaluate.listening import Listening, ListeningConfig
from mmm.evaluate.report import json_safe, plot, report_markdown
from mmm.evaluate.requests import Requests
from mmm.generation.api import MMM
from mmm.generation.request import SamplingConfig
from mmm.tokenizer import check_tokenizer_cfg, vocab_fingerprint

log = logging.getLogger(__name__)

METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"


# --- config and inputs ------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """configs/evaluate.yaml without its groups (`data` is a `DataConfig`, `tokenizer` a
    `TokenizerSection`; `paths` and `hydra` are Hydra's)."""

    ckpt: str
    split: Literal["test", "valid", "train"]
    seed: int = field(metadata=at_least(0))
    out_dir: str
    device: str
    num_threads: int | None = field(metadata=at_least(1))
    max_chunks: int | None = field(metadata=at_least(1))
    max_seq_len: int | None = field(metadata=at_least(1))
    samples_per_chunk: int = field(metadata=at_least(1))
    augment: bool
    batch_size: int = field(metadata=at_least(1))
    baseline_samples_per_chunk: int = field(metadata=at_least(1))
    baseline_max_chunks: int | None = field(metadata=at_least(1))
    kn_discount: float = field(metadata=within(0, 1))
    num_requests: int = field(metadata=at_least(0))
    infill_bars: int = field(metadata=at_least(1))
    piece_bars: int = field(metadata=at_least(1))
    track_bars: int = field(metadata=at_least(1))
    measure_controls: bool  # one more generation per control family and request
    sampling: SamplingConfig
    max_bar_tokens: int | None = field(metadata=at_least(4))
    max_failures_listed: int = field(metadata=at_least(0))
    listening: ListeningConfig

    def check(self) -> None:
        if self.infill_bars > self.piece_bars:
            raise ValueError(f"infill_bars={self.infill_bars} exceeds piece_bars={self.piece_bars}")


_GROUPS = ("data", "tokenizer", "paths", "hydra")


def check_config(cfg: DictConfig) -> EvalConfig:
    """Fail before any work on settings that cannot run, naming the key."""
    check_section("data", cfg.data, DataConfig)
    check_tokenizer_cfg(cfg.tokenizer)
    return check_section("evaluate", {k: v for k, v in cfg.items() if k not in _GROUPS}, EvalConfig)


def open_store(cfg: DictConfig, tokenizer) -> Store:
    """The store split to evaluate; preprocessed first when missing. Its base vocabulary must
    be the checkpoint's (vocab fingerprints); if not, the error names the settings that differ."""
    path = ensure_store(cfg.data, cfg.tokenizer)
    store = Store(path, cfg.split)
    ours, theirs = vocab_fingerprint(tokenizer), store.manifest.get("vocab_fingerprint")
    if ours != theirs:
        changes = setting_changes(
            store.manifest.get("tokenizer", {}), tokenizer_settings(tokenizer), "tokenizer.params."
        )
        what = (
            f"settings that differ (store -> checkpoint): {'; '.join(changes)}"
            if changes
            else "same settings, another miditok version?"
        )
        raise ValueError(
            f"vocabulary mismatch: the store at {path} was tokenized with base vocabulary {theirs}, but the "
            f"checkpoint {cfg.ckpt} has base vocabulary {ours} ({what}). Evaluate on a store made with the checkpoint's "
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
    layout = model.config.fill_program, model.config.target_last
    augmenting = SequenceBuilder(vocab, train_cfg, max_seq_len, *layout)
    plain_cfg = {**train_cfg, "pitch_shift": 0, "velocity_shift": 0}
    builder = augmenting if cfg.augment else SequenceBuilder(vocab, plain_cfg, max_seq_len, *layout)
    chunks = _subset(len(store), cfg.max_chunks, f"{cfg.seed}-chunks")
    train_store = Store(store.path, "train")
    if len(train_store) == 0:
        raise ValueError(f"the train split of {store.path} is empty: the n-gram baselines need it")
    train_chunks = _subset(len(train_store), cfg.baseline_max_chunks, f"{cfg.seed}-train-chunks")
    test_seed, train_seed = f"{cfg.seed}-{cfg.split}", f"{cfg.seed}-train"

    def sequences(b: SequenceBuilder, what: str) -> tuple[list[EvalSequence], Pairs]:
        test = build_sequences(store, chunks, b, cfg.samples_per_chunk, test_seed, b is builder, f"{cfg.split} {what}")
        train = build_sequences(
            train_store, train_chunks, b, cfg.baseline_samples_per_chunk, train_seed, False, f"train {what}"
        )
        return test, [(s.ids, s.labels) for s in train]

    test, train = sequences(builder, "sequences")
    augmented = None if cfg.augment else sequences(augmenting, "sequences (augmented)")
    lik = likelihood(model, vocab, test, train, cfg.batch_size, cfg.kn_discount, augmented)
    t_lik = time.perf_counter() - t0

    requests = Requests(mmm, store, chunks, cfg)
    jobs = [(kind, r) for r in range(cfg.num_requests) for kind in ("infill", "add_track")]
    for kind, r in tqdm(jobs, desc="API requests", unit="request"):
        getattr(requests, kind)(r)
    generated = requests.results(cfg.max_failures_listed)
    t_gen = time.perf_counter() - t0 - t_lik

    settings = check_config(cfg)
    listening = Listening(mmm, store, chunks, settings.listening, settings.sampling).run()
    t_listening = time.perf_counter() - t0 - t_lik - t_gen

    metrics: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "model": {"parameters": model.num_parameters(), "vocab_size": vocab.size, "max_seq_len": context},
        "data": {
            "store": str(store.path),
            "split": cfg.split,
            "chunks": len(chunks),
            "sequences": len(test),
            "vocab_fingerprint": store.manifest.get("vocab_fingerprint"),
        },
        "likelihood": lik,
        **generated,
        "listening": listening,
        "settings": {
            k: plain(cfg[k]) for k in sorted(f.name for f in fields(EvalConfig)) if k not in ("ckpt", "out_dir")
        },
    }
    gen = requests.generation
    metrics["timings"] = {
        "likelihood_s": t_lik,
        "generation_s": t_gen,
        "listening_s": t_listening,
        "api_calls": gen["calls"],
        "generated_tokens": gen["new_tokens"],
        "tokens_per_s": gen["new_tokens"] / gen["decode_s"] if gen["decode_s"] > 0 else math.nan,
    }
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["timings"]["total_s"] = time.perf_counter() - t0
    metrics = json_safe(metrics)
    plots = plot(metrics, requests.stats, out_dir)
    metrics["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out_dir / REPORT_FILE).write_text(report_markdown(metrics, plots))
    log.info("wrote %s, %s and %d plots to %s", METRICS_FILE, REPORT_FILE, len(plots), out_dir)
    return metrics
