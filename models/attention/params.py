"""What a model config may say about its attention, torch-free: the kind names and HyperAttention's knobs.

The kinds themselves (modules) are `models.attention.kinds.ATTENTION_KINDS`, whose keys must be
`ATTENTION_KIND_NAMES`; HyperAttention is `models.attention.hyper`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ATTENTION_KIND_NAMES", "HyperParams"]

# "softmax": exact attention through the dispatch; "hyper": HyperAttention (Han et al., ICLR 2024).
ATTENTION_KIND_NAMES = ("softmax", "hyper")


@dataclass(frozen=True, kw_only=True)
class HyperParams:
    """HyperAttention's knobs; the defaults are the reference's (insuhan/hyper-attn README).

    Attributes:
        lsh_num_projs: random hyperplanes of the angular LSH (2^r buckets).
        block_size: keys per block of the block-diagonal part.
        sample_size: residual key columns sampled per (batch, head).
        min_seq_len: sequences up to this many keys use exact attention.
    """

    lsh_num_projs: int = 7
    block_size: int = 256
    sample_size: int = 256
    min_seq_len: int = 4096

    def validate(self) -> None:
        """Raise ValueError naming the field if a value is impossible."""
        for name in ("lsh_num_projs", "block_size", "min_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.sample_size < 0:
            raise ValueError(f"sample_size: must be 0 or positive, got {self.sample_size}")
