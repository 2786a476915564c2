"""The miditok MMM tokenizer: built from `configs/tokenizer/*.yaml`, BPE-trained, and the
id tables that the fast paths (sequence builder, grammar, generation) need.

Two id spaces exist. *Base ids* index `tokenizer.vocab` (one id per REMI token: Pitch_60,
Bar_None, ...); the store keeps base ids. *Model ids* are what the transformer sees: BPE ids
when the tokenizer is trained, base ids otherwise. `Vocab` converts between the two.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from miditok import MMM as MMMTokenizer
from miditok import TokenizerConfig
from miditok.attribute_controls import BarAttributeControl
from miditok.constants import CHR_ID_START

from mmm.config import at_least, check_section, plain, require_keys
from mmm.files.atomic import atomic_write

TOKENIZER_FILE = "tokenizer.json"
# Keys accepted in configs/tokenizer/*.yaml: every miditok.TokenizerConfig argument, plus
# the base tokenizer that miditok reads from `additional_params`.
_CONFIG_KEYS = {
    name
    for name, p in inspect.signature(TokenizerConfig.__init__).parameters.items()
    if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self"
} | {"base_tokenizer"}
# Tokens the sequence format needs beyond REMI's.
REQUIRED_SPECIAL_TOKENS = ("PAD", "BOS", "EOS", "Infill_Bar", "FillBar_Start", "FillBar_End")


def _parse_programs(value: Any) -> list[int]:
    if isinstance(value, str):
        first, sep, last = value.partition("..")
        if not sep:
            raise ValueError(f"tokenizer.programs: expected a range 'a..b' or a list of ints, got {value!r}")
        return list(range(int(first), int(last) + 1))
    return [int(v) for v in value]


def _parse_beat_res(value: Any) -> dict[tuple[int, int], int]:
    """`{"0_1": 12, "1_2": 4, ...}` -> `{(0, 1): 12, ...}`: contiguous beat ranges from 0,
    each with a positive number of positions per beat."""
    if not isinstance(value, Mapping) or not value:
        raise ValueError(
            "tokenizer.beat_res: expected a non-empty mapping 'start_end' (beats) -> positions per "
            f"beat, e.g. {{'0_4': 8, '4_12': 4}}; got {value!r}"
        )
    beat_res = {}
    for key, res in value.items():
        try:
            start, end = (int(x) for x in str(key).split("_"))
        except ValueError:
            raise ValueError(f"tokenizer.beat_res: key {key!r} must be 'start_end' in beats, e.g. '0_1'") from None
        if isinstance(res, bool) or not isinstance(res, int) or res <= 0:
            raise ValueError(f"tokenizer.beat_res[{key!r}]: positions per beat must be a positive int, got {res!r}")
        beat_res[(start, end)] = res
    expected_start = 0
    for start, end in sorted(beat_res):
        if start != expected_start or end <= start:
            raise ValueError(
                "tokenizer.beat_res: ranges must cover beats from 0 without gaps or overlaps, "
                f"each with start < end (e.g. '0_1', '1_2', '2_4'); got {sorted(value)}"
            )
        expected_start = end
    return beat_res


def tokenizer_config(cfg: Mapping) -> TokenizerConfig:
    """Validate a tokenizer config mapping and turn it into a `miditok.TokenizerConfig`.

    Unknown keys are an error (miditok would silently keep a misspelled key and ignore it).
    """
    cfg = dict(plain(cfg))
    # miditok.TokenizerConfig's arguments plus 'base_tokenizer'
    require_keys("tokenizer.params", cfg, _CONFIG_KEYS, required=())
    if cfg.get("base_tokenizer", "REMI") != "REMI":
        raise ValueError(
            f"tokenizer.base_tokenizer: only 'REMI' is supported (got {cfg['base_tokenizer']!r}): "
            "the sequence builder and the grammar rely on REMI's Bar/Position layout"
        )
    cfg["base_tokenizer"] = "REMI"
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in cfg.get("special_tokens", [])]
    if missing:
        raise ValueError(f"tokenizer.special_tokens must contain {missing} (used by the MMM sequence format)")
    if "programs" in cfg:
        cfg["programs"] = _parse_programs(cfg["programs"])
    if "beat_res" in cfg:
        cfg["beat_res"] = _parse_beat_res(cfg["beat_res"])
    for key in ("pitch_range", "tempo_range", "drums_pitch_range", "pitch_bend_range"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    for flag in ("use_programs", "use_time_signatures"):
        if cfg.get(flag) is False:
            raise ValueError(f"tokenizer.{flag} must be true for MMM (got false)")
    return TokenizerConfig(**cfg)


def build_tokenizer(cfg: Mapping) -> MMMTokenizer:
    """A fresh (untrained) miditok MMM tokenizer from a validated config mapping."""
    return MMMTokenizer(tokenizer_config(cfg))


def load_tokenizer(path: str | Path) -> MMMTokenizer:
    """Load a tokenizer from a `tokenizer.json` file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}: run `python -m mmm.train_tokenizer` first")
    return MMMTokenizer(params=path)


def save_tokenizer(tokenizer: MMMTokenizer, path: str | Path) -> Path:
    """Write `tokenizer.json` atomically (a killed run never leaves a truncated file)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / TOKENIZER_FILE
    return atomic_write(path, tokenizer.save)


class _Words:
    """Sized iterable of BPE training words (the HF trainer wants `len`)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = words

    def __len__(self) -> int:
        return len(self.words)

    def __iter__(self):
        return iter(self.words)


def bpe_words(word: Sequence[int], bar_id: int) -> tuple[Sequence[int], ...]:
    """The BPE words of one layout word: a bar's header (`Bar_None TimeSig`) is a word of its
    own, apart from the bar's body.

    Why: bar ACs sit between the header and the first `Position`, and BPE never merges an AC,
    so a bar with ACs always started with a header-only id while the same bar without ACs
    merged its header into its first notes. In training, a header-only id with no AC after
    it then almost always meant an empty bar, and a model asked for bars without controls
    (no ACs follow the header it writes) closed half of them empty. Split, a bar opens with
    the same id whether controlled or not (experiments/sparse_infills)."""
    if len(word) > 2 and word[0] == bar_id:
        return word[:2], word[2:]
    return (word,)


def train_bpe(tokenizer: MMMTokenizer, bars: Iterable[Sequence[int]], vocab_size: int) -> None:
    """Learn BPE merges in place from bars of base ids (each bar's header and body are two
    words, as `Vocab.encode_words` encodes them: `bpe_words`).

    We train our own HF BPE model without miditok's Metaspace pre-tokenizer: with it, every
    word boundary costs a "▁" token that decodes to nothing. Bars are given without
    attribute controls, so no merge ever contains an AC token: each AC keeps its own id
    after encoding, which keeps the loss mask exact in BPE space.
    """
    from tokenizers import models

    if vocab_size <= len(tokenizer.vocab):
        raise ValueError(f"tokenizer.vocab_size ({vocab_size}) must exceed the {len(tokenizer.vocab)} base tokens")
    table = _id_chars(tokenizer)
    bar_id = tokenizer.vocab["Bar_None"]
    words = _Words(["".join(table[i] for i in word) for bar in bars if len(bar) > 0 for word in bpe_words(bar, bar_id)])
    if len(words) == 0:
        raise ValueError("no bars to train BPE on: the training split is empty")
    alphabet = {table[i]: i for i in range(len(tokenizer.vocab))}
    model = models.BPE(vocab=alphabet, merges=[], continuing_subword_prefix="", end_of_word_suffix="")
    tokenizer.train(vocab_size=vocab_size, model=model, iterator=words)
    tokenizer._model.pre_tokenizer = None
    tokenizer._model.decoder = None


def _id_chars(tokenizer: MMMTokenizer) -> list[str]:
    return [chr(i + CHR_ID_START) for i in range(len(tokenizer.vocab))]


class Vocab:
    """Id facts of a tokenizer, computed once: special ids, Pitch/Velocity/Program tables,
    attribute-control ids, and the base <-> model (BPE) id conversions."""

    def __init__(self, tokenizer: MMMTokenizer) -> None:
        self.tokenizer = tokenizer
        vocab: dict[str, int] = tokenizer.vocab
        self.base_size = len(vocab)
        self.token_of = {i: t for t, i in vocab.items()}
        self.pad = vocab["PAD_None"]
        self.bos = vocab["BOS_None"]
        self.eos = vocab["EOS_None"]
        self.infill_bar = vocab["Infill_Bar"]
        self.fill_start = vocab["FillBar_Start"]
        self.fill_end = vocab["FillBar_End"]
        self.track_start = vocab["Track_Start"]
        self.track_end = vocab["Track_End"]
        self.bar = vocab["Bar_None"]
        # value tables (index = value, entry = base id or -1)
        self.pitch_id = self._table(vocab, "Pitch", 128)
        self.program_id = {int(t.split("_")[1]): i for t, i in vocab.items() if t.startswith("Program_")}
        velocities = sorted((int(t.split("_")[1]), i) for t, i in vocab.items() if t.startswith("Velocity_"))
        self.velocity_values = np.array([v for v, _ in velocities])
        self.velocity_ids = np.array([i for _, i in velocities])
        # base id -> pitch value (for Pitch tokens) / velocity index, -1 elsewhere
        self.pitch_of = np.full(self.base_size, -1, dtype=np.int64)
        for pitch, i in enumerate(self.pitch_id):
            if i >= 0:
                self.pitch_of[i] = pitch
        self.velocity_index_of = np.full(self.base_size, -1, dtype=np.int64)
        self.velocity_index_of[self.velocity_ids] = np.arange(len(self.velocity_ids))
        self.is_tempo = np.array([self.token_of[i].startswith("Tempo_") for i in range(self.base_size)])
        self.is_time_sig = np.array([self.token_of[i].startswith("TimeSig_") for i in range(self.base_size)])
        self.is_note_start = np.array(
            [self.token_of[i].startswith(("Pitch_", "PitchDrum_")) for i in range(self.base_size)]
        )
        self.position_zero = vocab["Position_0"]
        self.is_ac = np.array([self.token_of[i].startswith("AC") for i in range(self.base_size)])
        self.bar_acs = [i for i, ac in enumerate(tokenizer.attribute_controls) if isinstance(ac, BarAttributeControl)]
        self.track_acs = [i for i, ac in enumerate(tokenizer.attribute_controls) if i not in self.bar_acs]
        # model (BPE) ids
        self._chars = _id_chars(tokenizer)
        if tokenizer.is_trained:
            model = tokenizer._model
            self.size = model.get_vocab_size()
            learned = tokenizer._vocab_learned_bytes_to_tokens
            self.model_to_base = [tuple(vocab[t] for t in learned[model.id_to_token(i)]) for i in range(self.size)]
        else:
            self.size = self.base_size
            self.model_to_base = [(i,) for i in range(self.size)]
        # The special/AC/structure tokens keep their base id in model space (they never merge);
        # checked here because the loss mask and the grammar rely on it.
        for i in (
            self.pad,
            self.bos,
            self.eos,
            self.infill_bar,
            self.fill_start,
            self.fill_end,
            self.track_start,
            self.track_end,
        ):
            if self.model_to_base[i] != (i,):
                raise ValueError(f"tokenizer: special token {self.token_of[i]} lost its id after BPE")
        self.is_ac_model = np.array([len(b) == 1 and self.is_ac[b[0]] for b in self.model_to_base])
        # Program tokens are words of their own (never merged): model id == base id.
        self.is_program = np.array(
            [len(b) == 1 and self.token_of[b[0]].startswith("Program_") for b in self.model_to_base]
        )
        # Notes carried by each model id (a BPE token may hold several): for loss per note.
        self.notes_per_model_id = np.array(
            [sum(int(self.is_note_start[b]) for b in bases) for bases in self.model_to_base]
        )
        # Tokens that only ever appear in prompts: never a training target.
        self.prompt_only_model = self.is_ac_model.copy()
        self.prompt_only_model[[self.pad, self.infill_bar, self.fill_start]] = True

    @staticmethod
    def _table(vocab: Mapping[str, int], kind: str, n: int) -> np.ndarray:
        table = np.full(n, -1, dtype=np.int64)
        for token, i in vocab.items():
            k, _, v = token.partition("_")
            if k == kind:
                table[int(v)] = i
        return table

    def ac_id(self, token: str) -> int:
        return self.tokenizer.vocab[token]

    def encode_words(self, words: Sequence[Sequence[int]]) -> list[int]:
        """Base-id words -> model ids; BPE never merges across words, nor a bar's header
        with its body (`bpe_words`)."""
        if not self.tokenizer.is_trained:
            return [i for w in words for i in w]
        # The BPE model itself, word by word: same ids as `Tokenizer.encode(words,
        # is_pretokenized=True)` (tested) without its pipeline, which costs several times more.
        chars, bpe, bar = self._chars, self.tokenizer._model.model, self.bar
        return [
            t.id
            for w in words
            if len(w)
            for piece in bpe_words(w, bar)
            for t in bpe.tokenize("".join(map(chars.__getitem__, piece)))
        ]

    def to_base(self, ids: Iterable[int]) -> list[int]:
        """Model ids -> base ids (decoding BPE ids directly: never through `.tokens`)."""
        table = self.model_to_base
        return [b for i in ids for b in table[i]]

    def describe(self) -> dict[str, Any]:
        return {"base_vocab_size": self.base_size, "vocab_size": self.size, "bpe": self.tokenizer.is_trained}


def vocab_fingerprint(tokenizer: MMMTokenizer) -> str:
    """Hash of the base vocabulary: a store made with another base vocab is incompatible."""
    import hashlib

    payload = json.dumps(sorted(tokenizer.vocab.items(), key=lambda kv: kv[1]))
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenizerSection:
    """The `tokenizer` section (configs/tokenizer/mmm.yaml): miditok settings and the BPE size."""

    vocab_size: int | None = field(metadata=at_least(0))  # null or 0: no BPE
    path: str
    params: dict  # miditok.TokenizerConfig arguments, checked by `tokenizer_config`


def check_tokenizer_cfg(tokenizer_cfg: Any) -> TokenizerSection:
    return check_section("tokenizer", tokenizer_cfg, TokenizerSection)


def check_tokenizer_file(path: str | Path, vocab_size: int | None) -> None:
    """Refuse a trained tokenizer file whose size is not `tokenizer.vocab_size`."""
    trained = Vocab(load_tokenizer(path))
    expected = vocab_size or trained.base_size
    if trained.size != expected:
        raise ValueError(
            f"the tokenizer at {path} has {trained.size} tokens but tokenizer.vocab_size={expected}: "
            "delete that file to retrain it, or set tokenizer.vocab_size to match"
        )
