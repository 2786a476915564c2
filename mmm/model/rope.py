"""Rotary position embeddings (Hugging Face's "default" RoPE, split-halves convention)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, times: Tensor | None = None, time_theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Float32 rotary tables ``[..., head_dim]`` for the given absolute positions (HF "default"
    RoPE). With ``times`` (musical times, broadcastable with ``positions``), the odd frequency pairs
    turn with the time instead, at frequencies of base ``time_theta``: half of every head then
    sees distances in the sequence, the other half distances in the music."""
    # Recomputed per call (a handful of tiny ops) rather than kept as a buffer, so that
    # model.to(torch.bfloat16) cannot round the frequencies.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim
    freqs = positions.float()[..., None] * (1.0 / (theta**exponents))
    if times is not None:
        odd = torch.arange(head_dim // 2, device=positions.device) % 2 == 1
        freqs = torch.where(odd, times.float()[..., None] * (1.0 / (time_theta**exponents)), freqs)
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
