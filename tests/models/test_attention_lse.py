"""The dispatch's masks and log-sum-exp against an oracle written row by row, and LSE merging."""

from __future__ import annotations

import pytest
import torch

from models.attention import (
    attention,
    get_attention_backend,
    lse_merge,
    set_attention_backend,
)


@pytest.fixture(params=["sdpa", "math"])
def backend(request):
    before = get_attention_backend()
    set_attention_backend(request.param)
    yield request.param
    set_attention_backend(before)


def _rowwise_oracle(q, k, v, *, causal, window=None, document_ids=None, scale=None):
    """For every (batch, head, query) the softmax over exactly the keys the definition allows."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    groups = heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, heads, q_len, v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(batch, heads, q_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                pos = i + k_len - q_len  # bottom-right alignment
                keys = [
                    j for j in range(k_len)
                    if (not causal or j <= pos)
                    and (window is None or j >= pos - window)
                    and (document_ids is None or document_ids[b, j] == document_ids[b, i])
                ]
                s = (k[b, h // groups, keys].double() @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // groups, keys].double()
    return out, lse


def _qkv(q_len, k_len, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, heads, q_len, dim, generator=gen),
        torch.randn(2, kv_heads, k_len, dim, generator=gen),
        torch.randn(2, kv_heads, k_len, dim, generator=gen),
    )


@pytest.mark.parametrize("q_len, k_len", [(12, 12), (3, 12), (1, 12)])
def test_causal_is_bottom_right_aligned_and_lse_is_the_row_logsumexp(backend, q_len, k_len):
    q, k, v = _qkv(q_len, k_len)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    want_out, want_lse = _rowwise_oracle(q, k, v, causal=True)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(attention(q, k, v, causal=True), out)


@pytest.mark.parametrize("window", [0, 3, 100])
def test_sliding_window_reads_the_last_window_plus_one_keys(backend, window):
    q, k, v = _qkv(14, 14)
    out = attention(q, k, v, causal=True, window=window)
    torch.testing.assert_close(out.double(), _rowwise_oracle(q, k, v, causal=True, window=window)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_document_ids_keep_packed_documents_apart(backend, causal):
    q, k, v = _qkv(10, 10)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 3]])
    out, lse = attention(q, k, v, causal=causal, document_ids=ids, return_lse=True)
    want_out, want_lse = _rowwise_oracle(q, k, v, causal=causal, document_ids=ids)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    # A document's output does not change when another document's tokens change.
    k2 = k.clone()
    k2[:, :, 7:] += 5.0
    torch.testing.assert_close(attention(q, k2, v, causal=causal, document_ids=ids)[0, :, :7], out[0, :, :7])


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_flow_through_both_the_output_and_the_lse(backend, causal):
    """On "sdpa" this is the fused CPU kernel with the LSE gradient folded into its backward."""
    q, k, v = (t.requires_grad_() for t in _qkv(6, 6))
    weights = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    grads = torch.autograd.grad((out * weights[0]).sum() + (lse * weights[1]).sum(), (q, k, v))
    qkv64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = _rowwise_oracle(*qkv64, causal=causal)
    want = torch.autograd.grad((want_out * weights[0]).sum() + (want_lse * weights[1]).sum(), qkv64)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_merging_split_keys_by_lse_equals_attention_over_all_keys():
    q, k, v = _qkv(5, 16, heads=2, kv_heads=2)
    full_out, full_lse = attention(q, k, v, causal=False, return_lse=True)
    o1, l1 = attention(q, k[:, :, :6], v[:, :, :6], causal=False, return_lse=True)
    o2, l2 = attention(q, k[:, :, 6:], v[:, :, 6:], causal=False, return_lse=True)
    out, lse = lse_merge(o1, l1, o2, l2)
    torch.testing.assert_close(out, full_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-5)
    # An empty side (LSE = -inf) leaves the other unchanged; two empty sides give zeros.
    empty = torch.full_like(l1, float("-inf"))
    out, lse = lse_merge(o1, l1, torch.zeros_like(o1), empty)
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)
    out, lse = lse_merge(o1, empty, o2, empty)
    assert torch.equal(out, torch.zeros_like(o1)) and torch.isneginf(lse).all()


def test_bad_masks_are_refused():
    q, k, v = _qkv(12, 4)
    with pytest.raises(ValueError, match="T_q <= T_k"):
        attention(q, k, v, causal=True)
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="window needs causal=True"):
        attention(q, k, v, causal=False, window=2)
    with pytest.raises(ValueError, match="document_ids must be"):
        attention(q, k, v, document_ids=torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flash_masks_and_lse_match_math_in_bf16(causal):
    pytest.importorskip("flash_attn")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 128, 64, generator=gen).cuda().bfloat16()
    k = torch.randn(2, 2, 128, 64, generator=gen).cuda().bfloat16()
    v = torch.randn(2, 2, 128, 64, generator=gen).cuda().bfloat16()
    ids = (torch.arange(128, device="cuda") // 40).expand(2, -1).contiguous()
    before = get_attention_backend()
    try:
        results = {}
        for name in ("math", "flash"):
            set_attention_backend(name)
            results[name] = [
                attention(q, k, v, causal=causal, return_lse=True),
                attention(q, k, v, causal=causal, document_ids=ids, return_lse=True),
            ]
            if causal:
                results[name].append(attention(q, k, v, causal=True, window=16, return_lse=True))
                results[name].append(attention(q[:, :, -5:], k, v, causal=True, return_lse=True))
    finally:
        set_attention_backend(before)
    for (out_m, lse_m), (out_f, lse_f) in zip(results["math"], results["flash"]):
        torch.testing.assert_close(out_f.float(), out_m.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse_f.float(), lse_m.float(), atol=2e-2, rtol=2e-2)
