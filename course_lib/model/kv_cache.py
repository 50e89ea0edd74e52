"""The contiguous KV cache of lesson 01: keys and values of every past token, kept so each decode step
computes only the new token's K and V instead of recomputing the whole prefix."""
from __future__ import annotations

import torch

from course_lib.model.attention import attention
from course_lib.model.config import ModelConfig
from course_lib.device import DEVICE


def kv_cache_bytes(config: ModelConfig, num_tokens: int, batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of K and V for ``num_tokens`` tokens of ``batch_size`` sequences:
    2 (K and V) · L · Hkv · D · tokens · batch · bytes per element."""
    return (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
            * num_tokens * batch_size * bytes_per_element)


class KVCache:
    """Preallocated K/V for a batch of sequences that advance in lockstep.

    k[layer], v[layer]: [B, Hkv, max_seq_len, D]. ``length`` tokens are filled. During a forward pass each
    layer calls ``attend`` (``update`` with its new keys and values, then attention over all of them); the
    model calls ``advance`` once at the end.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        device = DEVICE if device is None else device   # the course's device: where the models live by default
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_seq_len = max_seq_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v [B, Hkv, S, D] after the cached tokens; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache full: {start} cached + {k.shape[2]} new > max_seq_len={self.max_seq_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new k, v, then causal attention of q [B, Hq, S, D] over every cached key: [B, Hq, S, D]."""
        k_all, v_all = self.update(layer, k, v)
        return attention(q, k_all, v_all, causal=True)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        """Forget everything after ``length`` tokens (speculative decoding rolls back rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
