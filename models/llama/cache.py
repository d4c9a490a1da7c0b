"""The KV cache of a Llama decoder for incremental generation (`Llama.forward_cached`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KVCache"]


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated to `max_seq_len` positions.

    Attributes:
        keys: per layer, (B, H_kv, max_seq_len, head_dim); RoPE already applied.
        values: per layer, (B, H_kv, max_seq_len, head_dim).
        seq_len: positions filled so far (the next token's position).
    """

    keys: list[Tensor]
    values: list[Tensor]
    seq_len: int = 0

    @classmethod
    def allocate(
        cls, n_layers: int, batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, *,
        dtype: torch.dtype, device: torch.device,
    ) -> KVCache:
        """An empty cache of zeros."""
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
        )

    @property
    def max_seq_len(self) -> int:
        """Positions the cache can hold."""
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        """Bytes of cached context: the filled positions, which grow linearly with the context."""
        per_position = sum(t[:, :, :1].nbytes for t in (*self.keys, *self.values))
        return per_position * self.seq_len
