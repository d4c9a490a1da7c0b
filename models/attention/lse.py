"""Merging partial softmax attentions by their log-sum-exp.

For disjoint key sets K1, K2 with O_k = softmax(S_k) V_k and L_k = LSE(S_k) row-wise,
O = (e^L1 O1 + e^L2 O2) / (e^L1 + e^L2) and L = log(e^L1 + e^L2); this is
`add_self_attentions` of the HyperAttention reference (Han et al. 2024, insuhan/hyper-attn,
models/attention/utils.py), written in the stable max-shifted form and differentiable in both
the outputs and the LSEs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lse_merge"]


def lse_merge(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint keys: returns (out, lse).

    out_k is (..., T, D), lse_k is (..., T). The weights are computed in fp32 (fp64 for fp64 inputs); the output keeps
    out1's dtype. Rows where both LSEs are -inf (no key at all) get out = 0, lse = -inf.
    """
    dtype = torch.promote_types(out1.dtype, torch.float32)
    lse1, lse2 = lse1.to(dtype), lse2.to(dtype)
    top = torch.maximum(lse1, lse2)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w1, w2 = torch.exp(lse1 - safe_top), torch.exp(lse2 - safe_top)
    total = w1 + w2
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (w1.unsqueeze(-1) * out1.to(dtype) + w2.unsqueeze(-1) * out2.to(dtype)) / denom.unsqueeze(-1)
    lse = safe_top + torch.log(total)
    return out.to(out1.dtype), lse
