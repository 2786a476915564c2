"""The MMM decoder-only transformer, in plain PyTorch.

The architecture is Mistral's: pre-norm blocks of RMSNorm -> grouped-query attention with rotary
position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual, no biases anywhere. It is kept
numerically identical to Hugging Face's ``MistralForCausalLM`` so that trained weights can be
exported to (and imported from) the HF ecosystem with ``to_hf_mistral`` / ``from_hf_mistral``.
Module and parameter names mirror HF's on purpose: conversion is then a key-prefix rename.
"""

from __future__ import annotations

import functools
import math
from dataclasses import MISSING, asdict, dataclass, fields
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import MistralConfig, MistralForCausalLM

ATTENTION_CHOICES = ("auto", "sdpa", "flash", "eager")


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`MMMTransformer`.

    ``attention`` picks the attention kernel: "auto" uses flash-attn when it is installed and the
    inputs are CUDA fp16/bf16, PyTorch SDPA otherwise; "flash" is the same but fails at model
    construction if flash-attn is missing; "sdpa" never uses flash-attn; "eager" is the plain
    matmul/softmax reference (slow, useful for debugging). ``sliding_window`` limits each token to
    attending to itself and the ``sliding_window - 1`` tokens before it (Mistral's convention).
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

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
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
            raise ValueError(
                f"ModelConfig.attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}"
            )
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
    return ModelConfig.from_dict(
        {**PRESETS[name], "vocab_size": vocab_size, "max_seq_len": max_seq_len, **overrides}
    )


@functools.cache
def _load_flash_attn() -> Any:
    """The flash_attn module, or None when it is not installed."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


class KVCache:
    """Preallocated per-layer keys/values ``[B, kv_heads, max_len, head_dim]`` plus a shared length.

    All rows have the same length (N variations of one prompt), so positions and masks are shared
    across the batch and no per-row padding bookkeeping is needed. Create with
    :meth:`MMMTransformer.new_cache`.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int = 0) -> None:
        self.keys = keys
        self.values = values
        self.length = length

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v [B, kv_heads, T, D]`` after the cached prefix; return the keys/values up to them.

        ``length`` is not advanced here: every layer writes at the same offset, and the model moves
        the length once after the last layer.
        """
        end = self.length + k.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        self.length = length

    def repeat(self, n: int) -> KVCache:
        """New cache with each row repeated ``n`` times (row i -> rows i*n .. i*n+n-1).

        Typical use: prefill one prompt with batch size 1, then decode ``n`` variations from it.
        The storage is copied, not expanded, because the variations then write different tokens.
        """
        return KVCache(
            [k.repeat_interleave(n, dim=0) for k in self.keys],
            [v.repeat_interleave(n, dim=0) for v in self.values],
            self.length,
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, exactly like HF's MistralRMSNorm."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Squares of bf16 activations lose too much precision, hence the float32 detour.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """Float32 rotary tables ``[T, head_dim]`` for the given absolute positions (HF "default" RoPE)."""
    # Recomputed per call (a handful of tiny ops) rather than kept as a buffer, so that
    # model.to(torch.bfloat16) cannot round the frequencies.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, heads, D]`` by position; HF's split-halves (not interleaved) convention.
    ``cos``/``sin`` are ``[T, D]`` (every row at the same positions) or ``[B, T, D]`` (packed rows)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


def attention_mask(q_start: int, q_len: int, kv_len: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean ``[q_len, kv_len]`` mask, True = may attend: causal, and within ``window`` if set.

    Query i sits at absolute position ``q_start + i``; keys at ``0 .. kv_len - 1``. As in HF, a
    window W keeps keys with ``q - W < k <= q``, i.e. the token itself and the W - 1 before it.
    """
    q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def packed_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token within its sample, for rows of samples packed end to end:
    ``doc_ids [B, T]`` numbers the samples of a row (equal ids are one contiguous sample)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def packed_mask(doc_ids: Tensor, window: int | None) -> Tensor:
    """Boolean ``[B, 1, T, T]`` mask of packed rows: causal, within ``window``, and never across
    samples (block-diagonal), so each sample sees exactly what it would see alone."""
    T = doc_ids.shape[1]
    mask = attention_mask(0, T, T, window, doc_ids.device)[None]
    return (mask & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


class Packing(NamedTuple):
    """Where the samples of packed rows lie in the flattened batch (``B * T`` tokens): flash-attn's
    cumulative lengths (``offsets``, int32, from 0 to ``B * T``), the ``longest`` sample, and the
    same offsets as Python ints (``bounds``) for attention computed sample by sample."""

    offsets: Tensor
    longest: int
    bounds: list[int]


def varlen_offsets(doc_ids: Tensor) -> Packing:
    """The variable-length layout of packed rows ``doc_ids [B, T]`` (see :class:`Packing`)."""
    B, T = doc_ids.shape
    flat = (doc_ids + torch.arange(B, device=doc_ids.device)[:, None] * (T + 1)).flatten()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    offsets = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])
    bounds = offsets.tolist()
    return Packing(offsets.to(torch.int32), max(b - a for a, b in zip(bounds, bounds[1:])), bounds)


# Attention of packed rows on a CPU: one call of SDPA's causal CPU kernel per sample. A single call
# over whole rows would need a block-diagonal mask, which costs ~1.6x in attention and computes
# scores across samples only to mask them. The loop lives inside one custom op so that
# torch.compile sees an opaque call with fixed output shapes instead of a per-batch list of sample
# bounds to specialise on (a recompile per batch).


def _window_mask(length: int, window: int, like: Tensor) -> Tensor | None:
    """None where the causal kernel suffices, else the additive causal + window mask of a sample
    (the CPU kernel takes masks of the query's dtype)."""
    if window == 0 or length <= window:
        return None
    allowed = attention_mask(0, length, length, window, like.device)
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, float("-inf"))


def _segments(*tensors: Tensor, doc_ids: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Per sample: each tensor ``[B, T, heads, D]`` sliced to that sample as ``[1, heads, L, D]``."""
    bounds = varlen_offsets(doc_ids).bounds
    flat = [t.flatten(0, 1) for t in tensors]
    for start, end in zip(bounds, bounds[1:]):
        yield tuple(t[start:end].transpose(0, 1)[None] for t in flat)


@torch.library.custom_op("mmm::packed_attention", mutates_args=())
def packed_attention(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention within each sample of packed rows (``doc_ids [B, T]``), ``window`` tokens
    back at most (0: unlimited). ``q [B, T, heads, D]``, ``k``/``v [B, T, kv_heads, D]``; returns
    the output like ``q`` and the float32 log-sum-exp ``[heads, B * T]`` its backward needs."""
    outs, lses = [], []
    for q_s, k_s, v_s in _segments(q, k, v, doc_ids=doc_ids):
        mask = _window_mask(q_s.shape[2], window, q)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_s, k_s, v_s, 0.0, mask is None, attn_mask=mask, scale=scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs).view(q.shape), torch.cat(lses, dim=1)


@packed_attention.register_fake
def _(q, k, v, doc_ids, window, scale):
    return torch.empty_like(q), q.new_empty((q.shape[2], q.shape[0] * q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mmm::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              doc_ids: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    grads: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    at = 0
    for grad_s, q_s, k_s, v_s, out_s in _segments(grad, q, k, v, out, doc_ids=doc_ids):
        length = q_s.shape[2]
        mask = _window_mask(length, window, q)
        parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_s, q_s, k_s, v_s, out_s, lse[None, :, at : at + length], 0.0, mask is None, attn_mask=mask, scale=scale)
        for into, part in zip(grads, parts):
            into.append(part[0].transpose(0, 1))
        at += length
    return tuple(torch.cat(g).view(t.shape) for g, t in zip(grads, (q, k, v)))  # type: ignore[return-value]


@packed_attention_backward.register_fake
def _(grad, q, k, v, out, lse, doc_ids, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _packed_attention_setup(ctx, inputs, output) -> None:
    q, k, v, doc_ids, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_ids)
    ctx.window, ctx.scale = window, scale


def _packed_attention_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse, doc_ids = ctx.saved_tensors
    return *packed_attention_backward(grad, q, k, v, out, lse, doc_ids, ctx.window, ctx.scale), None, None, None


packed_attention.register_autograd(_packed_attention_grad, setup_context=_packed_attention_setup)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, dispatching to flash-attn, SDPA or an eager reference."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        backend: str,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)

        if backend == "flash":
            if cache is not None:
                k, v = cache.update(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            # flash-attn takes [B, T, heads, D], handles GQA natively and aligns the causal
            # triangle bottom-right, so a cached prefix needs no mask. Its window is inclusive on
            # both ends, hence W - 1 to match HF's "itself plus W - 1 before".
            window = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
            if doc_ids is not None:  # packed rows: each sample is its own sequence
                offsets, longest, _ = varlen_offsets(doc_ids)
                out = _load_flash_attn().flash_attn_varlen_func(
                    q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), offsets, offsets, longest, longest,
                    softmax_scale=self.scale, causal=True, window_size=window,
                ).view(B, T, self.num_heads, self.head_dim)
            else:
                out = _load_flash_attn().flash_attn_func(q, k, v, softmax_scale=self.scale, causal=True, window_size=window)
        elif doc_ids is not None and backend == "sdpa" and mask is None:  # on a CPU
            out = packed_attention(q, k, v, doc_ids, self.sliding_window or 0, self.scale)[0]
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            if backend == "eager":
                out = self._eager(q, k, v, mask)
            elif mask is None:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=is_causal, scale=self.scale, enable_gqa=True
                )
            else:
                # With an explicit mask, CUDA SDPA only has GQA support in its slow math kernel, so
                # expand K/V to all heads to keep the memory-efficient kernel (HF does the same).
                groups = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return probs @ v


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        backend: str,
        mask: Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, mask, is_causal, cache, doc_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype linear layers will produce from ``x``: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MMMTransformer(nn.Module):
    """Decoder-only transformer language model over MIDI tokens (Mistral architecture)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Checked again here because dataclass fields may have been mutated since construction.
        config.validate()
        self.config = config
        # Looked up once here: a cached import inside forward would break torch.compile's graph.
        self._flash_installed = _load_flash_attn() is not None
        if config.attention == "flash" and not self._flash_installed:
            raise ImportError(
                "ModelConfig.attention='flash' needs the flash-attn package: `pip install mmm[gpu]` "
                "(or use attention='auto' to fall back to PyTorch SDPA)"
            )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Each layer adds two branches (attention, MLP) to the residual stream, so its variance grows
        # with 2 * num_layers at init; shrinking the std of the projections that write into the
        # stream by 1/sqrt(2 * num_layers) keeps it ~constant with depth (GPT-2 scheme).
        residual_std = self.config.init_std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if param.dim() == 1:
                continue  # RMSNorm weights stay at 1
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else self.config.init_std
            nn.init.normal_(param, mean=0.0, std=std)

    def _rope_tables(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Float32 cos/sin for positions 0..length-1, computed once per device: a decode step
        then slices them instead of recomputing (~5% of a tiny model's step). A plain attribute,
        not a buffer, so that model.to(torch.bfloat16) cannot round them."""
        tables = self.__dict__.get("_rope")
        if tables is None or tables[0].device != device or tables[0].shape[0] < length:
            # Made outside inference mode even when first needed there (a validation or a
            # generation before training): inference tensors cannot enter autograd later.
            with torch.inference_mode(False), torch.no_grad():
                positions = torch.arange(max(length, self.config.max_seq_len), device=device)
                tables = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
            self.__dict__["_rope"] = tables
        return tables

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters; ``exclude_embeddings`` drops the vocab-sized matrices
        (token embedding and, when untied, the output head) to give the size of the transformer body."""
        params = {id(p): p for p in self.parameters()}  # a tied weight counts once
        if exclude_embeddings:
            params.pop(id(self.embed_tokens.weight))
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Empty KV cache for ``batch_size`` rows of up to ``max_len`` (default: max_seq_len) tokens.

        ``dtype`` defaults to the parameters' dtype; it must be the dtype attention runs in (the
        autocast dtype when decoding under autocast).
        """
        ref = self.embed_tokens.weight
        shape = (batch_size, self.config.num_kv_heads, max_len or self.config.max_seq_len, self.config.head_dim)
        device, dtype = device or ref.device, dtype or ref.dtype

        def zeros() -> list[Tensor]:
            return [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.config.num_layers)]

        return KVCache(zeros(), zeros())

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, last_only: bool = False,
                doc_ids: Tensor | None = None) -> Tensor:
        """Logits ``[B, T, vocab]`` for ``input_ids [B, T]`` (``[B, 1, vocab]`` with ``last_only``,
        which spares a prompt prefill the vocabulary projection of every other position).

        ``doc_ids [B, T]`` marks rows packed with several samples end to end
        (``mmm.data.datamodule.pack``): positions restart at each sample and attention never
        crosses from one sample to another, so every sample gets the logits it would get alone.

        Without a cache the tokens sit at positions 0..T-1. No attention mask is taken: training
        batches are right-padded, and with causal attention padding at the end can never influence
        the earlier (real) positions, whose logits are therefore exact. With a cache the tokens sit at
        positions ``cache.length .. cache.length + T - 1``, attend to the cached prefix, and their
        keys/values are appended to the cache.
        """
        B, T = input_ids.shape
        start = 0
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (doc_ids) are for training: they cannot use a KV cache")
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, input_ids {tuple(input_ids.shape)}")
        if cache is not None:
            start = cache.length
            if cache.batch_size != B:
                raise ValueError(f"cache has batch size {cache.batch_size} but input_ids has {B}")
            if start + T > cache.max_len:
                raise ValueError(f"cache overflow: {start} cached + {T} new tokens > max_len {cache.max_len}")

        h = self.embed_tokens(input_ids)
        dtype = _compute_dtype(h)
        if cache is not None and cache.dtype != dtype:
            raise ValueError(f"cache dtype {cache.dtype} differs from the attention dtype {dtype}")
        backend = self._backend(h.device, dtype)
        tables = self._rope_tables(start + T, h.device)
        if doc_ids is None:
            mask, is_causal = self._mask(backend, start, T, h.device)
            cos, sin = (t[start : start + T].to(dtype) for t in tables)
        else:
            # flash-attn (CUDA) and SDPA on a CPU attend sample by sample (flash_attn_varlen_func,
            # packed_attention); the eager reference and SDPA elsewhere take a block-diagonal mask.
            per_sample = backend == "flash" or (backend == "sdpa" and h.device.type == "cpu")
            mask = None if per_sample else packed_mask(doc_ids, self.config.sliding_window)
            is_causal = False
            positions = packed_positions(doc_ids)
            cos, sin = (t[positions].to(dtype) for t in tables)

        for layer in self.layers:
            h = layer(h, cos, sin, backend, mask, is_causal, cache, doc_ids)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.norm(h))

    def _backend(self, device: torch.device, dtype: torch.dtype) -> str:
        # flash-attn only runs on CUDA in half precision. An explicit "flash" also falls back to SDPA
        # elsewhere, so that a checkpoint trained with it still loads and runs on CPU / in fp32.
        use_flash = self.config.attention in ("auto", "flash") and self._flash_installed
        if use_flash and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "eager" if self.config.attention == "eager" else "sdpa"

    def _mask(self, backend: str, start: int, T: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """(explicit mask or None, is_causal) for SDPA; flash-attn needs neither.

        SDPA's ``is_causal`` aligns the triangle top-left, which is only right when queries and keys
        start together (no cached prefix). A single new query may see the whole prefix, so it needs
        no mask at all. Everything else gets an explicit mask. Avoiding masks matters: only the
        mask-free call reaches SDPA's flash kernel.
        """
        window = self.config.sliding_window
        kv_len = start + T
        window_inactive = window is None or kv_len <= window
        if backend == "flash" or (backend == "sdpa" and window_inactive and (start == 0 or T == 1)):
            return None, start == 0
        return attention_mask(start, T, kv_len, window, device), False


# --- Hugging Face Mistral conversion (transformers is an optional dependency, imported lazily) ---


def _import_transformers() -> Any:
    import transformers

    # The config layout (rope_theta inside rope_parameters) is transformers 5's; 4.x would silently
    # ignore it and use its default theta.
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"the Mistral converters need transformers>=5, found {transformers.__version__}")
    return transformers


def to_hf_config(config: ModelConfig, attn_implementation: str = "sdpa") -> MistralConfig:
    """Equivalent ``transformers.MistralConfig`` (``attn_implementation``: "eager" or "sdpa")."""
    transformers = _import_transformers()
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    return transformers.MistralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        # transformers 5 keeps rope_theta inside rope_parameters (there is no config.rope_theta).
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        # Must be passed explicitly: MistralConfig defaults to a 4096-token window, not None.
        sliding_window=config.sliding_window,
        # MistralConfig defaults to Mistral-7B's tokenizer ids (bos=1, eos=2); they mean nothing
        # for MIDI tokens. A pad id would also make HF's nn.Embedding freeze that row's gradient.
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=attn_implementation,
    )


def from_hf_config(hf_config: MistralConfig) -> ModelConfig:
    """``ModelConfig`` for a ``MistralConfig``; rejects settings this model cannot reproduce.

    Attention dropout is not carried over (this model has none); it does not change inference.
    """
    rope = hf_config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported, got rope_type={rope['rope_type']!r}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"only SiLU (SwiGLU) MLPs are supported, got hidden_act={hf_config.hidden_act!r}")
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    if hf_config.head_dim != head_dim:
        raise ValueError(
            f"head_dim must equal hidden_size / num_attention_heads = {head_dim}, got {hf_config.head_dim}"
        )
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        intermediate_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", ModelConfig.rope_theta)),
        rms_norm_eps=hf_config.rms_norm_eps,
        sliding_window=hf_config.sliding_window,
        tie_word_embeddings=hf_config.tie_word_embeddings,
        init_std=hf_config.initializer_range,
    )


def to_hf_mistral(model: MMMTransformer, attn_implementation: str = "sdpa") -> MistralForCausalLM:
    """Copy ``model`` into a new ``transformers.MistralForCausalLM`` with the same device and dtype."""
    transformers = _import_transformers()
    ref = model.embed_tokens.weight
    # Built directly in the target dtype rather than cast with .to(dtype): casting would also round
    # HF's float32 RoPE inv_freq buffer (e.g. to bf16) and make its outputs drift from ours.
    hf_config = to_hf_config(model.config, attn_implementation)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=ref.dtype).to(ref.device)
    hf_model.load_state_dict({_to_hf_key(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf_model.train(model.training)


def from_hf_mistral(hf_model: MistralForCausalLM) -> MMMTransformer:
    """Copy a ``transformers.MistralForCausalLM`` into a new ``MMMTransformer`` (same device and dtype)."""
    ref = hf_model.model.embed_tokens.weight
    model = MMMTransformer(from_hf_config(hf_model.config)).to(ref.device, ref.dtype)
    model.load_state_dict({_from_hf_key(k): v for k, v in hf_model.state_dict().items()}, strict=True)
    return model.train(hf_model.training)


def _to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else f"model.{key}"


def _from_hf_key(key: str) -> str:
    return key.removeprefix("model.")


# --- the training objective ------------------------------------------------------------------


def next_token_nll(model: MMMTransformer, input_ids: Tensor, labels: Tensor, ignore_index: int,
                   reduction: str = "none", doc_ids: Tensor | None = None) -> Tensor:
    """NLL (nats, float32) of each next token: the logits of ``input_ids[:, :-1]`` scored against
    ``labels[:, 1:]``, positions labelled ``ignore_index`` (prompt, padding) excluded.

    ``reduction="none"``: ``[B, T-1]``, 0 at excluded positions; ``"sum"``: the total over the
    batch (training and validation divide it by the number of targets). Batches are right-padded
    (``mmm.data.datamodule.collate``), which causal attention never lets reach a real position,
    or packed (``doc_ids``, ``mmm.data.datamodule.pack``), whose labels never ask a sample's last
    token to predict the next sample's first.
    """
    logits = model(input_ids[:, :-1], doc_ids=None if doc_ids is None else doc_ids[:, :-1])
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                          reduction=reduction)
    return nll.view(targets.shape) if reduction == "none" else nll
