"""`mmm::packed_attention`: causal attention within each sample of packed rows on a CPU.

One call of SDPA's causal CPU kernel per sample. A single call over whole rows would need a
block-diagonal mask, which costs more in attention and computes scores across samples only to
mask them. The loop lives inside one custom op so that torch.compile sees an opaque call with
fixed output shapes instead of a per-batch list of sample bounds to specialise on (a recompile
per batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mmm.model.masks import attention_mask, varlen_offsets


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
def packed_attention(
    q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor, window: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Causal attention within each sample of packed rows (``doc_ids [B, T]``), ``window`` tokens
    back at most (0: unlimited). ``q [B, T, heads, D]``, ``k``/``v [B, T, kv_heads, D]``; returns
    the output like ``q`` and the float32 log-sum-exp ``[heads, B * T]`` its backward needs."""
    outs, lses = [], []
    for q_s, k_s, v_s in _segments(q, k, v, doc_ids=doc_ids):
        mask = _window_mask(q_s.shape[2], window, q)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_s, k_s, v_s, 0.0, mask is None, attn_mask=mask, scale=scale
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs).view(q.shape), torch.cat(lses, dim=1)


@packed_attention.register_fake
def _(q, k, v, doc_ids, window, scale):
    return torch.empty_like(q), q.new_empty((q.shape[2], q.shape[0] * q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mmm::packed_attention_backward", mutates_args=())
def packed_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, doc_ids: Tensor, window: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    grads: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    at = 0
    for grad_s, q_s, k_s, v_s, out_s in _segments(grad, q, k, v, out, doc_ids=doc_ids):
        length = q_s.shape[2]
        mask = _window_mask(length, window, q)
        parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_s, q_s, k_s, v_s, out_s, lse[None, :, at : at + length], 0.0, mask is None, attn_mask=mask, scale=scale
        )
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
