"""Attention masks and the layout of packed rows (samples end to end, `doc_ids` numbering them)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
