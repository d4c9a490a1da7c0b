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
- `linear_attention_chunked`: chunks of C tokens, exact inside a chunk (through the kernel
  1 + s + s^2 / 2 on q^T k, which is the feature map's inner product) and through the running
  state (S, z) across chunks, O(T C (d' + d) + T F d): the training form;
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
    scaled = x / math.sqrt(dim)
    # Row i of the upper triangle, x_i x_j for j > i, as one broadcast product per row (cheaper
    # than gathering index pairs, in the forward and in the backward).
    pairs = [x[..., i : i + 1] * scaled[..., i + 1 :] for i in range(dim - 1)]
    return torch.cat([torch.ones_like(x[..., :1]), x / dim**0.25, x * scaled / math.sqrt(2), *pairs], dim=-1)


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

    Within a chunk the causal scores come from the kernel itself, phi(q)^T phi(k) = 1 + s + s^2 / 2
    with s = q^T k / sqrt(d'), a (C x C) product over d' instead of the F features; each chunk
    also reads the state of all earlier chunks, an exclusive prefix sum of the chunks' phi(K)^T V.
    V carries a column of ones, so the same products give the normaliser phi(q)^T z; padded
    tokens have an all-zero row there and add nothing.
    """
    batch, heads, seq_len, feature_dim = q.shape
    dtype = _compute_dtype(q)
    pad = (-seq_len) % chunk_size
    n_chunks = (seq_len + pad) // chunk_size
    qq, kk = (F.pad(t.to(dtype), (0, 0, 0, pad)).view(batch, heads, n_chunks, chunk_size, -1) for t in (q, k))
    v_aug = torch.cat((v.to(dtype), torch.ones_like(v[..., :1], dtype=dtype)), dim=-1)
    vv = F.pad(v_aug, (0, 0, 0, pad)).view(batch, heads, n_chunks, chunk_size, -1)
    fq, fk = taylor_feature_map_compact(qq), taylor_feature_map_compact(kk)

    kv_chunks = fk.transpose(-2, -1) @ vv  # (B, H, N, F, d_v + 1): last column the chunk's sum of phi(k)
    kv_prev = F.pad(kv_chunks[:, :, :-1].cumsum(2), (0, 0, 0, 0, 1, 0))  # exclusive prefix sum
    if state is not None:
        kv_prev = kv_prev + torch.cat((state[0].to(dtype), state[1].to(dtype).unsqueeze(-1)), dim=-1).unsqueeze(2)
    s = (qq @ kk.transpose(-2, -1)) / math.sqrt(feature_dim)  # (B, H, N, C, C)
    scores = torch.tril(1 + s + 0.5 * s * s)
    out = fq @ kv_prev + scores @ vv
    out = (out[..., :-1] / (out[..., -1:] + eps)).view(batch, heads, seq_len + pad, -1)[:, :, :seq_len]
    final = kv_prev[:, :, -1] + kv_chunks[:, :, -1]
    return out.to(v.dtype), (final[..., :-1], final[..., -1])


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
