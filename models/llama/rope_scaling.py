"""`Llama3RopeScaling`, the parameters of Llama-3.1 RoPE scaling: torch-free, for configs.

The scaling itself is `models.llama.rope.llama3_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Llama3RopeScaling"]


@dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency scaling ("llama3" rope_type in Hugging Face).

    Wavelengths shorter than `original_max_seq_len / high_freq_factor` are kept, those longer than
    `original_max_seq_len / low_freq_factor` are divided by `factor`, and the band between them is
    interpolated smoothly (Meta's Llama 3.1 reference code; defaults there: factor 8,
    low_freq_factor 1, high_freq_factor 4, original_max_seq_len 8192).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_seq_len: int
