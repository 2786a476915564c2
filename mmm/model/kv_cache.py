"""The KV cache of eager generation: preallocated keys/values per layer and a shared length."""

from __future__ import annotations

import torch
from torch import Tensor


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
