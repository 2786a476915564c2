"""Build what a run needs when it is missing, from the data and tokenizer sections: the token
store (`ensure_store`: `mmm.data.store_writer` returns at once when the store is complete and made
with these settings, and refuses one made otherwise) and the BPE tokenizer (`ensure_tokenizer`).
Every entry point (train, train_tokenizer, evaluate) builds its inputs through these.

BPE is learned on the bars of the *train* split of the token store, so files rejected by
preprocessing never reach it and valid/test stay unseen, each bar augmented (transposition,
velocity shift) the way training samples are.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path

from mmm.config import plain
from mmm.data.sequences import SampleSpec, SequenceBuilder
from mmm.data.store import Store, check_vocab
from mmm.data.store_writer import preprocess
from mmm.files.locks import acquire_lock
from mmm.tokenizer import (
    Vocab,
    build_tokenizer,
    check_tokenizer_cfg,
    check_tokenizer_file,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

log = logging.getLogger(__name__)


def ensure_store(data_cfg: Mapping, tokenizer_cfg: Mapping) -> Path:
    """The store's folder, preprocessed first when it is missing or incomplete. A store made from
    other files or settings is refused (`mmm.data.store_writer` compares its manifest)."""
    preprocess(data_cfg, tokenizer_cfg)
    return Path(data_cfg["store"])


def ensure_tokenizer(data_cfg: Mapping, tokenizer_cfg: Mapping) -> Path:
    """The tokenizer file of `tokenizer.path`, learned first (with the store) when it is missing.
    One that exists must have `tokenizer.vocab_size` tokens and the store's base vocabulary."""
    store = ensure_store(data_cfg, tokenizer_cfg)
    section = check_tokenizer_cfg(tokenizer_cfg)
    path = Path(section.path)
    if not path.is_file():
        log.info("no tokenizer at %s: training it first", path)
        train_tokenizer(data_cfg, tokenizer_cfg)
    check_tokenizer_file(path, section.vocab_size)
    check_vocab(store, load_tokenizer(path), path)
    return path


def prepare_data(data_cfg: Mapping, tokenizer_cfg: Mapping) -> Path:
    """`ensure_tokenizer` (the store and the tokenizer) for a training, which may share its data
    folder with other runs (the jobs of a sweep) and other processes of its job (its ranks):
    holds `<data.dir>/prepare.lock`, waiting for a holder rather than failing, so the first
    builds what is missing and the others then find it done. The lock is per process: ranks
    of one job sharing it would all write the same store at once."""
    with acquire_lock(data_cfg["dir"], "prepare", wait=None):
        return ensure_tokenizer(data_cfg, tokenizer_cfg)


def augmented_bars(store: Store, vocab: Vocab, sequences_cfg: Mapping, seed: int = 0):
    """Every bar of the store as training will show it: transposed and with shifted velocities,
    drawn as the sequence builder draws them. Learned on unshifted bars only, BPE would merge
    the corpus' usual velocities and pitches and leave the shifted forms (most training samples)
    unmerged: on a corpus with a single velocity, several times more tokens per note."""
    builder = SequenceBuilder(vocab, sequences_cfg, max_seq_len=1)
    rng = random.Random(seed)
    velocity = builder.cfg.velocity_shift
    for i in range(len(store)):
        chunk = store[i]
        for t, bars in enumerate(chunk["bars"]):
            spec = SampleSpec(
                task="track",
                tracks=[t],
                target=t,
                pitch_shift=rng.choice(builder.feasible_shifts(chunk, [t])),
                velocity_shift=rng.randint(-velocity, velocity),
            )
            yield from builder.augment_bars(bars, spec, drums=chunk["programs"][t] < 0)


def train_tokenizer(data_cfg: Mapping, tokenizer_cfg: Mapping) -> dict:
    """Train BPE as configured and write it to `tokenizer.path`; returns a summary."""
    data_cfg, tokenizer_cfg = plain(data_cfg), plain(tokenizer_cfg)
    check_tokenizer_cfg(tokenizer_cfg)
    tokenizer = build_tokenizer(tokenizer_cfg["params"])
    path = Path(tokenizer_cfg["path"])
    # One writer per tokenizer file: a second training of it fails at once, naming this one.
    with acquire_lock(path.parent, path.name):
        return _train_tokenizer(data_cfg, tokenizer_cfg, tokenizer)


def _train_tokenizer(data_cfg: dict, tokenizer_cfg: dict, tokenizer) -> dict:
    store = Store(ensure_store(data_cfg, tokenizer_cfg), "train")
    start = time.perf_counter()
    bars = list(augmented_bars(store, Vocab(tokenizer), data_cfg["sequences"]))
    if tokenizer_cfg["vocab_size"]:
        train_bpe(tokenizer, bars, tokenizer_cfg["vocab_size"])
    path = save_tokenizer(tokenizer, tokenizer_cfg["path"])
    vocab = Vocab(tokenizer)
    encoded = sum(len(vocab.encode_words([b])) for b in bars[:20000])
    result = {
        "path": str(path),
        **vocab.describe(),
        "train_bars": len(bars),
        "base_tokens_per_model_token": round(sum(len(b) for b in bars[:20000]) / max(encoded, 1), 3),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info("tokenizer: %s", result)
    return result
