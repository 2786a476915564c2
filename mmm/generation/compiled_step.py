"""A decode step whose shapes never change, for `torch.compile`.

`MMMTransformer.forward` with a `KVCache` slices the cache up to its Python-int length, so every
step has new shapes and a compiled graph would be rebuilt per token. `StaticDecoder` instead
keeps, per layer, keys/values of a fixed number of slots S (and one spare, never written), and
the position as a 0-d tensor: one step writes its key/value at slot ``position % S`` and attends
over the slots written so far, ``min(S, position + 1)`` of them (a size the compiled graph takes
as a symbol, so it is not recompiled per step). Slots are filled in order, so those are exactly
the first ones and no mask is needed, and a step never pays for the part of the budget the
generation has not reached (an infill allocates its whole token budget; most rows end well
before it). With a sliding window W smaller than the context, S = W and the cache is a ring: a
slot is overwritten by the position W later, exactly when that position leaves the window, so a
step costs O(W) however long the sequence grows. Softmax does not care about key order and keys
carry their rotary position already, so the ring needs no reordering.

The step runs eager (`compile=False`, the reference the tests compare with) or through
`torch.compile`; `enable_compile(model)` keeps one compiled step per model, so the compile is
paid once per model and process, not per generation: every size (slots, written slots, batch
rows) is a symbol of the graph. The prefill stays the model's own eager forward (prompts change
length every call) and its cache is copied into the slots.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mmm.model.rope import apply_rope, rope_cos_sin
from mmm.model.transformer import MMMTransformer

# model -> its compiled step; weak so that a dropped model frees its graphs.
_COMPILED: weakref.WeakKeyDictionary[MMMTransformer, Callable] = weakref.WeakKeyDictionary()


def num_slots(model: MMMTransformer, total: int) -> int:
    """Cache slots for a sequence of `total` tokens: all of them, or the window when it is shorter."""
    window = model.config.sliding_window
    return total if window is None else min(total, window)


def decode_step(
    model: MMMTransformer,
    ids: Tensor,
    position: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    cos_table: Tensor,
    sin_table: Tensor,
    written: int,
    times: Tensor | None = None,
) -> Tensor:
    """Float32 logits ``[B, V]`` after the tokens ``ids [B]`` at ``position`` (0-d int64 tensor).

    Writes their keys/values into slot ``position % S`` of the per-layer ``keys``/``values``
    ``[B, kv_heads, S + 1, head_dim]`` (S slots and a spare), attends over the first ``written``
    slots (``min(S, position + 1)``, the new one included) and advances ``position`` by one, in
    place. The grammar mask stays outside: one masked_fill per step, and a mask input would be
    one more graph per model. A model with alignment signals takes the tokens' musical ``times``
    ``[B]``; every generated token belongs to the target (its flag is 1).
    """
    config = model.config
    B = ids.shape[0]
    S = keys[0].shape[2] - 1  # the last slot is a spare, never written (StaticDecoder)
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    groups = heads // kv_heads
    h = model.embed_tokens(ids)[:, None]  # [B, 1, H]
    if config.target_embedding:
        h = h + model.target_embedding
    at = position.view(1)
    if config.time_rope is None:
        cos, sin = cos_table.index_select(0, at).to(h.dtype), sin_table.index_select(0, at).to(h.dtype)
    else:
        tables = rope_cos_sin(at, head_dim, config.rope_theta, times.view(B, 1), config.time_rope_theta)
        cos, sin = (table.to(h.dtype) for table in tables)
    slot = at % S
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = apply_rope(attn.q_proj(x).view(B, 1, heads, head_dim), cos, sin)
        k = apply_rope(attn.k_proj(x).view(B, 1, kv_heads, head_dim), cos, sin)
        v = attn.v_proj(x).view(B, 1, kv_heads, head_dim)
        keys[i].index_copy_(2, slot, k.transpose(1, 2))
        values[i].index_copy_(2, slot, v.transpose(1, 2))
        # Grouped-query attention without repeating K/V: the query heads of one KV head form a
        # [groups, head_dim] block against that head's [S, head_dim] keys.
        q = q.view(B, kv_heads, groups, head_dim)
        scores = (q @ keys[i][:, :, :written].transpose(-2, -1)) * attn.scale  # [B, kv_heads, groups, written]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ values[i][:, :, :written]).reshape(B, 1, heads * head_dim)
        h = h + attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    position.add_(1)
    return model.lm_head(model.norm(h))[:, 0].float()


def enable_compile(model: MMMTransformer, mode: str | None = None, options: dict | None = None) -> None:
    """Make `generate_ids(compile=None)` decode this model with a compiled step.

    ``mode`` / ``options`` go to `torch.compile`; the defaults are ``"reduce-overhead"`` on CUDA
    (the step replays as a CUDA graph) and, on the CPU, Inductor's default mode with
    ``cpp_wrapper`` (the step's kernels called from C++ rather than Python: several times faster
    than without it on small models, experiments/generation_speed). Compiling is lazy: the first decode step pays it, once per
    model (its sizes are dynamic; a batch of one row and one of several are two graphs).
    Calling again with other settings replaces the compiled step.
    """
    on_cuda = model.embed_tokens.weight.device.type == "cuda"
    if mode is None and on_cuda:
        mode = "reduce-overhead"
    if mode is None and options is None and not on_cuda:
        options = {"cpp_wrapper": True}
    # fullgraph: a graph break would silently bring back the per-op Python overhead. dynamic:
    # the number of written slots changes every step; compiled as a symbol from the first call.
    _COMPILED[model] = torch.compile(decode_step, mode=mode, options=options, fullgraph=True, dynamic=True)


def is_compile_enabled(model: MMMTransformer) -> bool:
    """Whether `enable_compile` (or a `compile=True` generation) gave this model a compiled step."""
    return model in _COMPILED


def compiled_step(model: MMMTransformer) -> Callable:
    """The model's compiled `decode_step`, enabled with the default settings if it has none."""
    if model not in _COMPILED:
        enable_compile(model)
    return _COMPILED[model]


class StaticDecoder:
    """Static-shape decoding of `batch_size` rows of one prompt, up to `total` tokens in all.

    ``compile``: True runs the model's compiled step (`enable_compile`), False `decode_step`
    eagerly. Use `prefill` once, then `step` per token.
    """

    def __init__(self, model: MMMTransformer, batch_size: int, total: int, compile: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < total <= model.config.max_seq_len:
            raise ValueError(f"total must be in [1, {model.config.max_seq_len}] (the model context), got {total}")
        config = model.config
        ref = model.embed_tokens.weight
        self.model = model
        self.total = total
        self.slots = num_slots(model, total)
        # One tensor per layer, not one stacked tensor: a compiled step can then update each in
        # place, where a write into a view of a stacked input makes Inductor copy all of it.
        # One spare slot past the S used: the attended slots are then never the whole tensor,
        # whose contiguous view would make a second graph once all S are written.
        shape = (batch_size, config.num_kv_heads, self.slots + 1, config.head_dim)
        self.keys = [torch.zeros(shape, device=ref.device, dtype=ref.dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=ref.device, dtype=ref.dtype) for _ in range(config.num_layers)]
        self.position = torch.zeros((), dtype=torch.long, device=ref.device)
        self.length = 0
        self.cos, self.sin = model._rope_tables(total, ref.device)
        if compile and ref.device.type == "cuda":
            # A CUDA graph may then update these in place (inputs it mutates must keep their
            # address); a new decoder's buffers make it re-record the graph, not recompile.
            for t in (*self.keys, *self.values, self.position):
                torch._dynamo.mark_static_address(t, guard=False)
        self._step = compiled_step(model) if compile else decode_step

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def prefill(self, prompt: Sequence[int], times: Tensor | None = None, flags: Tensor | None = None) -> Tensor:
        """Run the prompt (``times``/``flags`` ``[1, P]``: its timing, for a model with alignment
        signals) through the model's eager forward; float32 logits ``[1, V]`` of its last token."""
        P = len(prompt)
        if not 0 < P < self.total:
            raise ValueError(f"the prompt must hold 1 to {self.total - 1} tokens, got {P}")
        model = self.model
        cache = model.new_cache(1, max_len=P)
        ids = torch.tensor([list(prompt)], device=self.position.device)
        logits = model(ids, cache, last_only=True, times=times, flags=flags)[:, -1].float()
        # Only the last `slots` positions can still be attended to; each goes to its ring slot.
        src = torch.arange(max(0, P - self.slots), P, device=self.position.device)
        dst = src % self.slots
        for i in range(model.config.num_layers):
            self.keys[i][:, :, dst] = cache.keys[i][:, :, src]
            self.values[i][:, :, dst] = cache.values[i][:, :, src]
        self.position.fill_(P)
        self.length = P
        return logits

    def step(self, ids: Tensor, times: Tensor | None = None) -> Tensor:
        """Float32 logits ``[B, V]`` after ``ids [B]`` (at musical ``times [B]``, for a model with
        alignment signals)."""
        if ids.shape != (self.batch_size,):
            raise ValueError(f"ids must have shape ({self.batch_size},), got {tuple(ids.shape)}")
        if self.length >= self.total:
            raise ValueError(f"the decoder holds {self.total} tokens; it is full")
        written = min(self.slots, self.length + 1)
        self.length += 1  # a Python copy of `position`: reading the tensor would sync a GPU
        return self._step(self.model, ids, self.position, self.keys, self.values, self.cos, self.sin, written, times)
