"""Lizard's two attention branches as tensor functions (no parameters).

Gated linear attention (Lizard, arXiv:2507.09025, section 3; recurrent form, its eq. for S_i):

    S_i = gamma_i S_{i-1} + phi_k(k_i) v_i^T,      z_i = gamma_i z_{i-1} + phi_k(k_i)
    y_i = phi_q(q_i)^T S_i / phi_q(q_i)^T z_i

with a scalar gate gamma_i in (0, 1) per head and token. Both forms below carry the normaliser z
as one extra value column (v_aug = [v, 1]), so S is (F, E + 1) per head.

- `gla_recurrent`: the recurrence token by token (generation).
- `gla_chunked`: the chunkwise-parallel form (training). Within a chunk the decay between query
  i and key j is exp(b_i - b_j) with b the chunk-local cumulative log gate, so every exponent is
  <= 0; this is the paper's log-space reparameterisation (section 3.3, Q~ = phi(Q) * C,
  K~ = phi(K) / C) taken relative to the chunk start, which keeps 1 / c_j from overflowing. The
  state crosses chunk boundaries as in the recurrence.

Sliding-window attention with meta-memory (Lizard section 3, "anchor window attention"):

    y_i = sum_{t=i-w+1}^{i} exp(s_it) v_t / (sum_{j<m} exp(t_j) + sum_{t=i-w+1}^{i} exp(s_it))

with s_it = scale q_i . k_t and m learnable logits t_j per head: sinks that take probability mass
and contribute no value. `window_attention` computes it blockwise in O(T w) memory and accepts
the previous w keys (the generation cache) as a prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gla_chunked", "gla_recurrent", "hedgehog", "window_attention"]

# LoLCATs' SoftmaxDim clamps the feature map at 1e-12 so no kernel value is exactly zero
# (HazyResearch/lolcats, src/model/feature_map.py).
FEATURE_EPS = 1e-12


def hedgehog(x: Tensor, weight: Tensor) -> Tensor:
    """The Hedgehog feature map [softmax(x W) , softmax(-x W)] per head (Zhang et al. 2024, arXiv:2402.04347).

    x is (B, H, T, d), weight (H, d, F); returns (B, H, T, 2F), every entry >= FEATURE_EPS.
    """
    proj = torch.einsum("bhtd,hdf->bhtf", x, weight)
    return torch.cat((proj.softmax(-1), (-proj).softmax(-1)), dim=-1).clamp(min=FEATURE_EPS)


def _augment(v: Tensor) -> Tensor:
    return torch.cat((v, torch.ones_like(v[..., :1])), dim=-1)


def _normalise(out: Tensor) -> Tensor:
    return out[..., :-1] / out[..., -1:]


def gla_recurrent(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gated linear attention by the recurrence, one token at a time.

    phi_q, phi_k: (B, H, T, F) features; v: (B, H, T, E); log_gate: (B, H, T), log gamma <= 0;
    state: (B, H, F, E + 1) from earlier tokens or None. Computes in fp32; returns
    (y (B, H, T, E) in v's dtype, the new state in fp32).
    """
    batch, heads, seq_len, features = phi_q.shape
    v_aug = _augment(v.float())
    if state is None:
        state = v_aug.new_zeros(batch, heads, features, v_aug.shape[-1])
    outs = []
    for t in range(seq_len):
        state = log_gate[:, :, t, None, None].float().exp() * state + phi_k[:, :, t, :, None].float() * v_aug[:, :, t, None, :]
        outs.append(torch.einsum("bhf,bhfe->bhe", phi_q[:, :, t].float(), state))
    return _normalise(torch.stack(outs, dim=2)).to(v.dtype), state


def gla_chunked(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor | None = None, *, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Gated linear attention in chunkwise-parallel form; the same arguments and result as `gla_recurrent`."""
    batch, heads, seq_len, features = phi_q.shape
    v_aug = _augment(v.float())
    width = v_aug.shape[-1]
    if state is None:
        state = v_aug.new_zeros(batch, heads, features, width)
    pad = (-seq_len) % chunk_size
    q, k, g = phi_q.float(), phi_k.float(), log_gate.float()
    if pad:  # zero keys add nothing; log gate 0 (gamma = 1) leaves the state alone
        q, k, v_aug = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v_aug))
        g = F.pad(g, (0, pad))
    n_chunks = q.shape[2] // chunk_size
    q, k, v_aug = (t.unflatten(2, (n_chunks, chunk_size)) for t in (q, k, v_aug))
    b = g.unflatten(2, (n_chunks, chunk_size)).cumsum(-1)  # (B, H, N, C): log of prod_{l<=i} gamma_l in the chunk
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    intra = ((q @ k.transpose(-1, -2)) * decay) @ v_aug
    q_decayed = q * b[..., None].exp()
    k_decayed = k * (b[..., -1:] - b)[..., None].exp()
    chunk_kv = k_decayed.transpose(-1, -2) @ v_aug  # (B, H, N, F, E + 1)
    chunk_decay = b[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)
    # The recurrence over chunks visits each chunk once through `unbind` views: indexing
    # `t[:, :, c]` instead would make autograd allocate a full-size zero gradient per chunk,
    # O(N^2) time in the number of chunks (it made 32k tokens 7x slower than 16k).
    states = []
    for decay_c, kv_c in zip(chunk_decay.unbind(2), chunk_kv.unbind(2)):
        states.append(state)
        state = decay_c * state + kv_c
    out = intra + q_decayed @ torch.stack(states, dim=2)
    return _normalise(out.flatten(2, 3)[:, :, :seq_len]).to(v.dtype), state


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta_logits: Tensor,
    *,
    window: int,
    scale: float,
    k_prefix: Tensor | None = None,
    v_prefix: Tensor | None = None,
) -> Tensor:
    """Causal sliding-window softmax attention with meta-memory sinks, blockwise.

    q: (B, H, T, d); k, v: (B, H, T, d) (heads already matched to q); meta_logits: (H, m).
    k_prefix / v_prefix: (B, H, P, d) with P <= window, the keys and values of the P positions
    just before q's first (generation); None = the sequence starts at q. Query i sees its own
    key and the window - 1 before it. Returns (B, H, T, d) in q's dtype (softmax in fp32).
    """
    batch, heads, seq_len, _head_dim = q.shape
    prefix = 0 if k_prefix is None else k_prefix.shape[2]
    if prefix > window:
        raise ValueError(f"window_attention: a prefix of {prefix} keys exceeds the window {window}")
    keys, values = k.float(), v.float()
    if prefix:
        keys = torch.cat((k_prefix.float(), keys), dim=2)
        values = torch.cat((v_prefix.float(), values), dim=2)
    # Key index j (in the padded sequence) holds position j - window; query i sits at key index window + i.
    pad_front, pad_back = window - prefix, (-seq_len) % window
    keys = F.pad(keys, (0, 0, pad_front, pad_back))
    values = F.pad(values, (0, 0, pad_front, pad_back))
    queries = F.pad(q.float(), (0, 0, 0, pad_back))
    n_blocks = queries.shape[2] // window
    real_key = torch.ones(keys.shape[2], dtype=torch.bool, device=q.device)
    real_key[:pad_front] = False
    # Block c's queries (window of them) read key indices [c w, c w + 2 w).
    k_blocks = torch.cat((keys[:, :, :-window].unflatten(2, (n_blocks, window)), keys[:, :, window:].unflatten(2, (n_blocks, window))), dim=3)
    v_blocks = torch.cat((values[:, :, :-window].unflatten(2, (n_blocks, window)), values[:, :, window:].unflatten(2, (n_blocks, window))), dim=3)
    real_blocks = torch.cat((real_key[:-window].view(n_blocks, window), real_key[window:].view(n_blocks, window)), dim=1)
    row = torch.arange(window, device=q.device)[:, None]
    col = torch.arange(2 * window, device=q.device)[None, :]
    in_window = (col > row) & (col <= row + window)  # key c w + s for query c w + r: r < s <= r + w
    visible = in_window[None] & real_blocks[:, None, :]  # (N, w, 2w)
    scores = (queries.unflatten(2, (n_blocks, window)) @ k_blocks.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    meta = meta_logits.float()[None, :, None, None, :].expand(batch, heads, n_blocks, window, meta_logits.shape[-1])
    probs = torch.cat((scores, meta), dim=-1).softmax(dim=-1)[..., : 2 * window]
    out = probs @ v_blocks
    return out.flatten(2, 3)[:, :, :seq_len].to(q.dtype)
