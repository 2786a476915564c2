"""`python -m mmm.train_tokenizer data=<source> tokenizer.vocab_size=N`: learn BPE, write tokenizer.json.

BPE is learned on the bars of the *train* split of the token store (preprocessed first if
missing), so files rejected by preprocessing never reach it and valid/test stay unseen, each
bar augmented (transposition, velocity shift) the way training samples are.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mmm.config import at_least, check_section, plain
from mmm.data.sequences import SampleSpec, SequenceBuilder
from mmm.data.store import Store
from mmm.locking import acquire_lock
from mmm.preprocess import preprocess
from mmm.tokenizer import Vocab, build_tokenizer, save_tokenizer, train_bpe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerSection:
    """The `tokenizer` section (configs/tokenizer/mmm.yaml): miditok settings and the BPE size."""

    vocab_size: int | None = field(metadata=at_least(0))  # null or 0: no BPE
    path: str
    params: dict  # miditok.TokenizerConfig arguments, checked by `mmm.tokenizer.tokenizer_config`


def check_tokenizer_cfg(tokenizer_cfg: Mapping) -> TokenizerSection:
    return check_section("tokenizer", tokenizer_cfg, TokenizerSection)


def ensure_store(data_cfg: Mapping, tokenizer_cfg: Mapping) -> Store:
    """The train split of the store, preprocessing first when it is missing or incomplete. A store
    made from other files or settings is refused (`mmm.preprocess` compares its manifest)."""
    preprocess(data_cfg, tokenizer_cfg)
    return Store(Path(data_cfg["store"]), "train")


def augmented_bars(store: Store, vocab: Vocab, sequences_cfg: Mapping, seed: int = 0):
    """Every bar of the store as training will show it: transposed and with shifted velocities,
    drawn as the sequence builder draws them. Learned on unshifted bars only, BPE would merge
    the corpus' usual velocities and pitches and leave the shifted forms (most training samples)
    unmerged: on a corpus with a single velocity, ~3x more tokens per note."""
    builder = SequenceBuilder(vocab, sequences_cfg, max_seq_len=1)
    rng = random.Random(seed)
    velocity = builder.cfg.velocity_shift
    for i in range(len(store)):
        chunk = store[i]
        for t, bars in enumerate(chunk["bars"]):
            spec = SampleSpec(task="track", tracks=[t], target=t,
                              pitch_shift=rng.choice(builder.feasible_shifts(chunk, [t])),
                              velocity_shift=rng.randint(-velocity, velocity))
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
    store = ensure_store(data_cfg, tokenizer_cfg)
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


def main() -> None:
    import hydra

    @hydra.main(config_path="../configs", config_name="tokenizer", version_base="1.3")
    def _run(cfg) -> None:
        print(train_tokenizer(cfg.data, cfg.tokenizer))

    _run()


if __name__ == "__main__":
    main()
