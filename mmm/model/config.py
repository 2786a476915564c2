"""`ModelConfig`: the hyper-parameters of `MMMTransformer`, checked, and the size presets."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

ATTENTION_CHOICES = ("auto", "sdpa", "flash", "eager")
TIME_ROPE_CHOICES = (None, "bar", "onset")


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`MMMTransformer`.

    ``attention`` picks the attention kernel: "auto" uses flash-attn when it is installed and the
    inputs are CUDA fp16/bf16, PyTorch SDPA otherwise; "flash" is the same but fails at model
    construction if flash-attn is missing; "sdpa" never uses flash-attn; "eager" is the plain
    matmul/softmax reference (slow, useful for debugging). ``sliding_window`` limits each token to
    attending to itself and the ``sliding_window - 1`` tokens before it (Mistral's convention).

    The alignment signals (all off by default: the model is then Hugging Face's Mistral) tell each
    token where it sits in the music (`mmm.data.timing`):

    - ``time_rope``: every other rotary frequency pair turns with the token's musical time instead
      of its place in the sequence, so a query meets the keys of other tracks that sound at the
      same time under the same angle. ``"bar"``: the time is the token's bar index in the sample;
      ``"onset"``: its bar and its onset in the bar (in positions). ``time_rope_theta`` is the
      base of those pairs' frequencies.
    - ``target_embedding``: a learned vector added to the tokens of the track being written (its
      block in the prompt and the fill section).
    - ``fill_program``: the fill section opens with the target track's ``Program`` token
      (``FillBar_Start Program_p``), naming what it writes where it writes it. A sequence format
      setting: the data pipeline and the generation prompt follow it.
    - ``target_last``: in an infill sample the target track's block comes last among the tracks,
      right before the fill section, so its own bars (the closest context of what is written)
      sit next to it whatever the number of other tracks; otherwise the tracks are in random
      order (training) or the piece's order (prompts). A sequence format setting too.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention: str = "auto"
    init_std: float = 0.02
    time_rope: str | None = None
    time_rope_theta: float = 10000.0
    target_embedding: bool = False
    fill_program: bool = False
    target_last: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def timing(self) -> str | None:
        """The kind of musical time (`mmm.data.timing`) the model reads beside the ids, with the
        target flags; None when it reads neither."""
        if self.time_rope is None and not self.target_embedding:
            return None
        return self.time_rope or "onset"

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field and how to fix it."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "max_seq_len",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps", "init_std", "time_rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); change one of them so that hidden_size / num_heads is an integer"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"ModelConfig.hidden_size / num_heads = {self.head_dim} must be even for rotary "
                "embeddings; change hidden_size or num_heads"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}); pick num_kv_heads among the divisors of num_heads"
            )
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.time_rope not in TIME_ROPE_CHOICES:
            raise ValueError(f"ModelConfig.time_rope must be one of {TIME_ROPE_CHOICES}, got {self.time_rope!r}")
        for name in ("target_embedding", "fill_program", "target_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be true or false, got {getattr(self, name)!r}")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
            raise ValueError(
                f"ModelConfig.sliding_window must be a positive integer or None (full attention), got {window!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON/YAML serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict()`` output; unknown or missing keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig key(s): {unknown}; valid keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"Missing ModelConfig key(s): {missing}")
        return cls(**data)


# Architecture sizes; vocab_size and max_seq_len come from the tokenizer and the data pipeline.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU demos and tests: ~0.8M parameters without the embeddings.
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "small": dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=768),
    # The size of the published MMM model.
    "base": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536),
}


def model_config_from_preset(name: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> ModelConfig:
    """Config of preset ``name`` with the given vocabulary/context size; overrides win over the preset."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; available presets: {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], "vocab_size": vocab_size, "max_seq_len": max_seq_len, **overrides})
