"""Causal linear attention with BASED's 2nd-order Taylor feature map, in three equal forms.

BASED (Arora et al., ICML 2024, arXiv 2402.18668; reference `HazyResearch/based`,
based/models/mixers/linear_attention.py `TaylorExp`, `LinearAttention`):

    phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]  in R^(1 + d' + d'^2),

so that phi(q)^T phi(k) = 1 + s + s^2 / 2 with s = q^T k / sqrt(d'), the 2nd-order Taylor
expansion of exp(s) (273 features for the published d' = 16). The chunked and recurrent forms
use `taylor_feature_map_compact`, the same kernel with each pair x_i x_j (i < j) kept once
(fla's `TaylorFeatureMap`, 1 + d' + d'(d'+1)/2 = 153 features for d' = 16): the products
vec(x x^T) . vec(y y^T) = sum_i x_i^2 y_i^2 + 2 sum_{i<j} x_i x_j y_i y_j are equal term by
term, so results are unchanged while work and the recurrent state shrink by 44%. Causal linear
attention is

    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),  S_t = sum_{j<=t} phi(k_j) v_j^T,  z_t = sum_{j<=t} phi(k_j),

computed here as
- `linear_attention_quadratic`: A = tril(phi(Q) phi(K)^T), Y = A V / (A 1 + eps), the O(T^2)
  reference (the reference's `parallel_implementation="quadratic"`);
- `linear_attention_chunked`: chunks of C tokens, exact inside a chunk and through the running
  state (S, z) across chunks, O(T C F + T F d): the training form;
- `linear_attention_recurrent`: one token at a time on the state (S, z), O(F d) per token and
  constant memory: the generation form.
The quadratic reference uses the published map; the other two the compact one.
All take q, k (B, H, T, d') and v (B, H, T, d_v) and compute in fp32 (at least).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LINEAR_ATTENTION_EPS",
    "LinearAttentionState",
    "linear_attention_chunked",
    "linear_attention_quadratic",
    "linear_attention_recurrent",
    "taylor_feature_dim",
    "taylor_feature_map",
    "taylor_feature_map_compact",
    "taylor_state_dim",
]

# The reference LinearAttention's default eps (based/models/mixers/linear_attention.py).
LINEAR_ATTENTION_EPS = 1e-12

LinearAttentionState = tuple[Tensor, Tensor]  # S (B, H, F, d_v) and z (B, H, F), F = taylor_state_dim(d')


def taylor_feature_dim(feature_dim: int) -> int:
    """Size of the Taylor feature map's output, 1 + d' + d'^2 (273 for d' = 16)."""
    return 1 + feature_dim + feature_dim**2


def taylor_feature_map(x: Tensor) -> Tensor:
    """phi(x) for x (..., d'): [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))], (..., 1 + d' + d'^2)."""
    dim = x.shape[-1]
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(dim))
    return torch.cat([torch.ones_like(x[..., :1]), x / dim**0.25, second], dim=-1)


def taylor_state_dim(feature_dim: int) -> int:
    """Size of the compact Taylor map, 1 + d' + d'(d'+1)/2 (153 for d' = 16): the state's F."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_feature_map_compact(x: Tensor) -> Tensor:
    """The Taylor map with symmetric pairs kept once: [1, x / d'^(1/4), x_i^2 / (sqrt(2) sqrt(d')),
    x_i x_j / sqrt(d') for i < j]; the same kernel as `taylor_feature_map`, (..., taylor_state_dim(d'))."""
    dim = x.shape[-1]
    rows, cols = torch.triu_indices(dim, dim, offset=1, device=x.device)
    diagonal = x * x / (math.sqrt(2) * math.sqrt(dim))
    pairs = x[..., rows] * x[..., cols] / math.sqrt(dim)
    return torch.cat([torch.ones_like(x[..., :1]), x / dim**0.25, diagonal, pairs], dim=-1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def linear_attention_quadratic(q: Tensor, k: Tensor, v: Tensor, *, eps: float = LINEAR_ATTENTION_EPS) -> Tensor:
    """The O(T^2) form: (tril(phi(Q) phi(K)^T) V) / (tril(phi(Q) phi(K)^T) 1 + eps)."""
    dtype = _compute_dtype(q)
    fq, fk = taylor_feature_map(q.to(dtype)), taylor_feature_map(k.to(dtype))
    scores = torch.tril(fq @ fk.transpose(-2, -1))
    out = (scores @ v.to(dtype)) / (scores.sum(-1, keepdim=True) + eps)
    return out.to(v.dtype)


def linear_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_size: int = 64,
    state: LinearAttentionState | None = None,
    eps: float = LINEAR_ATTENTION_EPS,
) -> tuple[Tensor, LinearAttentionState]:
    """The chunked form; returns (y, final state). `state` continues a previous call's context.

    Within a chunk the causal scores are materialised (C x C); each chunk also reads the state
    of all earlier chunks, an exclusive prefix sum of the chunks' phi(K)^T V and phi(K) sums.
    """
    batch, heads, seq_len, _ = q.shape
    dtype = _compute_dtype(q)
    pad = (-seq_len) % chunk_size
    fq = taylor_feature_map_compact(F.pad(q.to(dtype), (0, 0, 0, pad)))
    fk = taylor_feature_map_compact(F.pad(k.to(dtype), (0, 0, 0, pad)))
    fk = fk * (torch.arange(seq_len + pad, device=q.device) < seq_len).unsqueeze(-1).to(dtype)  # padded keys
    vv = F.pad(v.to(dtype), (0, 0, 0, pad))
    n_chunks = (seq_len + pad) // chunk_size
    fq, fk = (t.view(batch, heads, n_chunks, chunk_size, -1) for t in (fq, fk))
    vv = vv.view(batch, heads, n_chunks, chunk_size, -1)

    kv_chunks = fk.transpose(-2, -1) @ vv  # (B, H, N, F, d_v)
    k_chunks = fk.sum(-2)  # (B, H, N, F)
    kv_prev = kv_chunks.cumsum(2) - kv_chunks
    k_prev = k_chunks.cumsum(2) - k_chunks
    if state is not None:
        kv_prev = kv_prev + state[0].to(dtype).unsqueeze(2)
        k_prev = k_prev + state[1].to(dtype).unsqueeze(2)
    scores = torch.tril(fq @ fk.transpose(-2, -1))  # (B, H, N, C, C)
    numerator = fq @ kv_prev + scores @ vv
    denominator = (fq @ k_prev.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)
    out = (numerator / (denominator.unsqueeze(-1) + eps)).view(batch, heads, seq_len + pad, -1)[:, :, :seq_len]
    final = (kv_prev[:, :, -1] + kv_chunks[:, :, -1], k_prev[:, :, -1] + k_chunks[:, :, -1])
    return out.to(v.dtype), final


def linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, state: LinearAttentionState, *, eps: float = LINEAR_ATTENTION_EPS
) -> tuple[Tensor, LinearAttentionState]:
    """Token-by-token form: for each t, S += phi(k_t) v_t^T, z += phi(k_t), y_t = phi(q_t) S / (phi(q_t) z + eps).

    `state` is (S (B, H, F, d_v), z (B, H, F)); returns (y (B, H, T, d_v), new state). Memory
    does not grow with the context.
    """
    dtype = _compute_dtype(q)
    kv_state, k_state = state[0].to(dtype), state[1].to(dtype)
    fq, fk, vv = taylor_feature_map_compact(q.to(dtype)), taylor_feature_map_compact(k.to(dtype)), v.to(dtype)
    outputs = []
    for t in range(q.shape[2]):
        kv_state = kv_state + fk[:, :, t].unsqueeze(-1) * vv[:, :, t].unsqueeze(-2)
        k_state = k_state + fk[:, :, t]
        numerator = (fq[:, :, t].unsqueeze(-2) @ kv_state).squeeze(-2)
        denominator = (fq[:, :, t] * k_state).sum(-1, keepdim=True)
        outputs.append(numerator / (denominator + eps))
    return torch.stack(outputs, dim=2).to(v.dtype), (kv_state, k_state)
