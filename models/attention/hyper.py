"""HyperAttention: near-linear approximate softmax attention (Han et al., ICLR 2024, arXiv 2310.05869).

Non-causal approximation (paper Algorithms 1-3; reference `insuhan/hyper-attn`,
models/attention/hyper_attn.py `forward_no_causal_mask`):

1. sortLSH: hash every query and key with r random hyperplanes (angular LSH), map the r-bit
   code through the reflected Gray sequence, and sort queries and keys separately by it, so
   that large q.k entries gather near the diagonal of the permuted score matrix.
2. Block-diagonal part: exact attention of each block of sorted queries against the matching
   block of `block_size` sorted keys, with its row-wise LSE.
3. Residual part: `sample_size` key columns drawn uniformly with replacement; the entries
   already covered by the query's own block are masked, and the partial LSE gets + log(n_k / m)
   (the importance weight of uniform sampling).
4. The two partials are merged by LSE (`lse.lse_merge`) and rows are put back in query order.

Causal attention is computed recursively (reference `HyperAttention.forward`): the two diagonal
halves are causal sub-problems (handled as extra heads), the bottom-left rectangle is a
non-causal approximation, and the bottom half merges the two by LSE; at most `min_seq_len` keys
the attention is exact. Below the thresholds the result is exactly softmax attention.

Differences from the reference, all on the side of exactness: padded keys (when n_k is not a
multiple of `block_size`) are masked instead of taking softmax mass, the residual's block mask
is applied on every path, and on the math (CPU) path gradients flow through the LSEs of the
merge. On the flash-attn path the kernel ignores the LSE's gradient (as the reference accepts),
so the merge weights are treated as constants in backward there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention.dispatch import attention
from models.attention.params import HyperParams
from models.attention.lse import lse_merge

__all__ = ["HyperAttention", "HyperParams", "gray_code", "hyper_attention", "lsh_hash"]


def gray_code(bits: int) -> Tensor:
    """The reflected Gray sequence of length 2^bits: entry b is b XOR (b >> 1)."""
    codes = torch.arange(2**bits)
    return codes ^ (codes >> 1)


def lsh_hash(x: Tensor, directions: Tensor) -> Tensor:
    """sortLSH bucket of every row of x (..., n, d) under hyperplanes `directions` (d, r).

    The sign bits form the binary number bin(x) = sum_i [<x, R_i> > 0] 2^i, which indexes the
    Gray sequence, as the reference does (angular_lsh.py `AngularLSH.hash`).
    """
    bits = (x.to(directions.dtype) @ directions) > 0
    weights = 2 ** torch.arange(directions.shape[1], device=x.device)
    return gray_code(directions.shape[1]).to(x.device)[(bits * weights).sum(-1)]


def _exact(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) of exact attention; `mask` (broadcast to the scores) marks keys that may be read."""
    if mask is None:
        return attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    mask = mask.expand_as(scores)
    any_key = mask.any(-1, keepdim=True)
    # Rows with no readable key are computed on zeros and then set to (0, -inf), so that no NaN
    # reaches the gradients.
    scores = scores.masked_fill(~mask & any_key, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ v.to(dtype)
    out = torch.where(any_key, out, torch.zeros_like(out))
    lse = torch.where(any_key, lse, torch.full_like(lse, float("-inf")))
    return out.to(q.dtype), lse.squeeze(-1)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, h, index[b, h, i], :] for x (B, H, n, d) and index (B, H, m)."""
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if x.shape[2] == rows else torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[2]))


def _non_causal(q: Tensor, k: Tensor, v: Tensor, scale: float, directions: Tensor, params: HyperParams) -> tuple[Tensor, Tensor]:
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    if n_q < params.min_seq_len:
        return _exact(q, k, v, scale, causal=False)

    q_order = torch.sort(lsh_hash(q, directions), dim=2, stable=True).indices
    k_order = torch.sort(lsh_hash(k, directions), dim=2, stable=True).indices
    q_sorted, k_sorted, v_sorted = _gather_rows(q, q_order), _gather_rows(k, k_order), _gather_rows(v, k_order)

    # Block-diagonal part: key blocks of `block_size`, the queries cut into as many blocks.
    key_block = params.block_size
    num_blocks = math.ceil(n_k / key_block)
    query_block = math.ceil(n_q / num_blocks)
    qb = _pad_rows(q_sorted, num_blocks * query_block).reshape(-1, 1, query_block, dim)
    kb = _pad_rows(k_sorted, num_blocks * key_block).reshape(-1, 1, key_block, dim)
    vb = _pad_rows(v_sorted, num_blocks * key_block).reshape(-1, 1, key_block, v.shape[-1])
    pad_mask = None
    if n_k % key_block:
        real = torch.arange(num_blocks * key_block, device=q.device) < n_k
        pad_mask = real.view(1, num_blocks, 1, 1, key_block).expand(batch * heads, -1, 1, 1, -1)
        pad_mask = pad_mask.reshape(-1, 1, 1, key_block)
    out, lse = _exact(qb, kb, vb, scale, causal=False, mask=pad_mask)
    out = out.reshape(batch, heads, -1, v.shape[-1])[:, :, :n_q]
    lse = lse.reshape(batch, heads, -1)[:, :, :n_q]

    # Residual part: uniformly sampled key columns outside the query's own block, weighted n_k / m.
    if params.sample_size > 0 and num_blocks > 1:
        sampled = torch.randint(n_k, (batch, heads, params.sample_size), device=q.device)
        own_block = (torch.arange(n_q, device=q.device) // query_block).view(1, 1, n_q, 1)
        outside = own_block != (sampled // key_block).unsqueeze(2)
        out_s, lse_s = _exact(
            q_sorted, _gather_rows(k_sorted, sampled), _gather_rows(v_sorted, sampled), scale, False, outside
        )
        out, lse = lse_merge(out, lse, out_s, lse_s + math.log(n_k / params.sample_size))

    inverse = torch.argsort(q_order, dim=2)
    return _gather_rows(out, inverse), torch.gather(lse, 2, inverse)


def _causal(q: Tensor, k: Tensor, v: Tensor, scale: float, directions: Tensor, params: HyperParams) -> tuple[Tensor, Tensor]:
    batch, heads, n, _ = q.shape
    if n <= params.min_seq_len:
        return _exact(q, k, v, scale, causal=True)
    odd = n % 2
    if odd:  # a zero row at the end; it is causal-last, so it changes no real row
        q, k, v = (_pad_rows(t, n + 1) for t in (q, k, v))
    half = (n + odd) // 2
    halves = [t.reshape(batch, 2 * heads, half, t.shape[-1]) for t in (q, k, v)]
    out_d, lse_d = _causal(*halves, scale, directions, params)
    out_d, lse_d = out_d.reshape(batch, heads, 2 * half, v.shape[-1]), lse_d.reshape(batch, heads, 2 * half)
    out_off, lse_off = _non_causal(q[:, :, half:], k[:, :, :half], v[:, :, :half], scale, directions, params)
    out_low, lse_low = lse_merge(out_d[:, :, half:], lse_d[:, :, half:], out_off, lse_off)
    out = torch.cat([out_d[:, :, :half], out_low], dim=2)[:, :, :n]
    lse = torch.cat([lse_d[:, :, :half], lse_low], dim=2)[:, :, :n]
    return out, lse


def hyper_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    directions: Tensor,
    params: HyperParams,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """HyperAttention of q (B, H, T, D) over k, v (B, H_kv, T_k, D); (out[, lse (B, H, T)]).

    Same layout and GQA convention as `models.attention.attention`; `directions` (D, r) are the
    LSH hyperplanes. Causal attention needs T_q = T_k. Draws the residual samples from torch's
    RNG on q's device.
    """
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"hyper_attention: causal needs T_q = T_k, got {q.shape[2]} and {k.shape[2]}")
    exact = q.shape[2] <= params.min_seq_len if causal else q.shape[2] < params.min_seq_len
    if exact and not return_lse:  # below the thresholds: plain exact attention, no LSE needed
        return attention(q, k, v, causal=causal, scale=scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = _causal if causal else _non_causal
    out, lse = fn(q.contiguous(), k.contiguous(), v.contiguous(), scale, directions, params)
    return (out, lse) if return_lse else out


class HyperAttention(nn.Module):
    """HyperAttention as a module holding its LSH hyperplanes (a non-persistent buffer).

    The hyperplanes are drawn from a private generator seeded with `seed`, so they are the same
    on every rank and after every reload, draw nothing from the global RNG, and add nothing to
    the state dict (a model trained with softmax attention loads unchanged).
    """

    def __init__(self, head_dim: int, params: HyperParams, *, seed: int = 0) -> None:
        super().__init__()
        params.validate()
        self.params = params
        self.seed = seed
        self.register_buffer("directions", torch.empty(head_dim, params.lsh_num_projs), persistent=False)
        if not self.directions.is_meta:
            self.init_weights()

    def init_weights(self) -> None:
        """(Re)draw the hyperplanes N(0, 1) from the module's seed."""
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.directions.copy_(torch.randn(self.directions.shape, generator=gen))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
        """Approximate softmax attention, exact up to `params.min_seq_len` keys."""
        return hyper_attention(q, k, v, directions=self.directions, params=self.params, causal=causal, scale=scale)
