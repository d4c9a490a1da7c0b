"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv:2104.09864) as Hugging Face Llama has them.

The layout is the "rotate half" one of Hugging Face's `LlamaForCausalLM`: a head vector's first
half is paired with its second half, so q/k projection weights map one-to-one between wren and
Hugging Face with no permutation. Frequencies are computed in fp32 with the same operations, in the
same order, as transformers, so that the cos/sin tables agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.llama.rope_scaling import Llama3RopeScaling

__all__ = ["Llama3RopeScaling", "apply_rope", "llama3_scale", "rope_cos_sin", "rope_inv_freq"]


def llama3_scale(inv_freq: Tensor, scaling: Llama3RopeScaling) -> Tensor:
    """Apply Llama-3.1 scaling to fp32 inverse frequencies."""
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    long = wavelen > low_freq_wavelen
    short = wavelen < high_freq_wavelen
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(long, inv_freq / scaling.factor, inv_freq)
    return torch.where(~short & ~long, interpolated, scaled)


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None = None, *, device: torch.device | None = None
) -> Tensor:
    """fp32 inverse frequencies theta^(-2i/head_dim), i < head_dim/2, optionally Llama-3.1-scaled."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    return inv_freq if scaling is None else llama3_scale(inv_freq, scaling)


def rope_cos_sin(inv_freq: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """fp32 tables cos, sin of shape (seq_len, head_dim) for positions 0 .. seq_len - 1."""
    positions = torch.arange(seq_len, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, D) and k (B, H_kv, T, D) by the first T rows of cos/sin (T_max, D).

    The tables are cast to q's dtype first, as Hugging Face casts them to the activations' dtype.
    """
    seq_len = q.shape[-2]
    cos = cos[:seq_len].to(q.dtype)
    sin = sin[:seq_len].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
