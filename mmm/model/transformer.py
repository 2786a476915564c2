"""The MMM decoder-only transformer, in plain PyTorch, and its training objective.

The architecture is Mistral's: pre-norm blocks of RMSNorm -> grouped-query attention with rotary
position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual, no biases anywhere. It is kept
numerically identical to Hugging Face's ``MistralForCausalLM`` so that trained weights can be
exported to (and imported from) the HF ecosystem with ``to_hf_mistral`` / ``from_hf_mistral``.
Module and parameter names mirror HF's on purpose: conversion is then a key-prefix rename.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmm.model.config import ModelConfig
from mmm.model.kv_cache import KVCache
from mmm.model.masks import attention_mask, packed_mask, packed_positions, varlen_offsets
from mmm.model.packed_attention import packed_attention
from mmm.model.rope import apply_rope, rope_cos_sin


@functools.cache
def _load_flash_attn() -> Any:
    """The flash_attn module, or None when it is not installed."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


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
                out = (
                    _load_flash_attn()
                    .flash_attn_varlen_func(
                        q.flatten(0, 1),
                        k.flatten(0, 1),
                        v.flatten(0, 1),
                        offsets,
                        offsets,
                        longest,
                        longest,
                        softmax_scale=self.scale,
                        causal=True,
                        window_size=window,
                    )
                    .view(B, T, self.num_heads, self.head_dim)
                )
            else:
                out = _load_flash_attn().flash_attn_func(
                    q, k, v, softmax_scale=self.scale, causal=True, window_size=window
                )
        elif doc_ids is not None and backend == "sdpa" and mask is None:  # on a CPU
            out = packed_attention(q, k, v, doc_ids, self.sliding_window or 0, self.scale)[0]
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)
            if backend == "eager":
                out = self._eager(q, k, v, mask)
            elif mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=self.scale, enable_gqa=True)
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
        if config.target_embedding:
            # Starts at zero (1-D: left so by _init_weights): the model begins as if it had none.
            self.target_embedding = nn.Parameter(torch.zeros(config.hidden_size))
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

    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        doc_ids: Tensor | None = None,
        times: Tensor | None = None,
        flags: Tensor | None = None,
    ) -> Tensor:
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

        ``times`` and ``flags`` (``[B, T]`` integers, `mmm.data.timing.sequence_timing`) are each
        token's musical time and target flag: required when the config's alignment signals
        (``time_rope``, ``target_embedding``) are on, ignored otherwise.
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

        config = self.config
        for name, value, needed in (("times", times, config.time_rope), ("flags", flags, config.target_embedding)):
            if needed and (value is None or value.shape != input_ids.shape):
                raise ValueError(
                    f"this model reads each token's {name} (time_rope={config.time_rope}, target_embedding="
                    f"{config.target_embedding}): pass {name} shaped like input_ids {tuple(input_ids.shape)} "
                    "(mmm.data.timing.sequence_timing)"
                )
        h = self.embed_tokens(input_ids)
        if config.target_embedding:
            h = h + flags[..., None].to(h.dtype) * self.target_embedding
        dtype = _compute_dtype(h)
        if cache is not None and cache.dtype != dtype:
            raise ValueError(f"cache dtype {cache.dtype} differs from the attention dtype {dtype}")
        backend = self._backend(h.device, dtype)
        if doc_ids is None:
            mask, is_causal = self._mask(backend, start, T, h.device)
            positions = torch.arange(start, start + T, device=h.device)
        else:
            # flash-attn (CUDA) and SDPA on a CPU attend sample by sample (flash_attn_varlen_func,
            # packed_attention); the eager reference and SDPA elsewhere take a block-diagonal mask.
            per_sample = backend == "flash" or (backend == "sdpa" and h.device.type == "cpu")
            mask = None if per_sample else packed_mask(doc_ids, self.config.sliding_window)
            is_causal = False
            positions = packed_positions(doc_ids)
        if config.time_rope is None:
            cos, sin = (t[positions].to(dtype) for t in self._rope_tables(start + T, h.device))
        else:
            cos, sin = (
                t.to(dtype)
                for t in rope_cos_sin(positions, config.head_dim, config.rope_theta, times, config.time_rope_theta)
            )

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


# --- the training objective ------------------------------------------------------------------


def next_token_nll(
    model: MMMTransformer,
    input_ids: Tensor,
    labels: Tensor,
    ignore_index: int,
    reduction: str = "none",
    doc_ids: Tensor | None = None,
    times: Tensor | None = None,
    flags: Tensor | None = None,
) -> Tensor:
    """NLL (nats, float32) of each next token: the logits of ``input_ids[:, :-1]`` scored against
    ``labels[:, 1:]``, positions labelled ``ignore_index`` (prompt, padding) excluded.

    ``reduction="none"``: ``[B, T-1]``, 0 at excluded positions; ``"sum"``: the total over the
    batch (training and validation divide it by the number of targets). Batches are right-padded
    (``mmm.data.datamodule.collate``), which causal attention never lets reach a real position,
    or packed (``doc_ids``, ``mmm.data.datamodule.pack``), whose labels never ask a sample's last
    token to predict the next sample's first. ``times``/``flags``: the tokens' musical times and
    target flags, for a model with alignment signals (`MMMTransformer.forward`).
    """
    inputs = [None if x is None else x[:, :-1] for x in (doc_ids, times, flags)]
    logits = model(input_ids[:, :-1], doc_ids=inputs[0], times=inputs[1], flags=inputs[2])
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction=reduction
    )
    return nll.view(targets.shape) if reduction == "none" else nll
