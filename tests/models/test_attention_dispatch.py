"""The attention dispatch against plain softmax attention written out by hand."""

from __future__ import annotations

import pytest
import torch

from models.attention import attention, get_attention_backend, set_attention_backend


@pytest.fixture
def restore_backend():
    before = get_attention_backend()
    yield
    set_attention_backend(before)


def _qkv(heads: int, kv_heads: int, dtype=torch.float32, device="cpu", seq_len=24, head_dim=16, requires_grad=False):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    shapes = [(2, heads, seq_len, head_dim), (2, kv_heads, seq_len, head_dim), (2, kv_heads, seq_len, head_dim)]
    return [
        torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad) for s in shapes
    ]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_sdpa_equals_plain_softmax_attention(heads, kv_heads, causal, reference_attention, restore_backend):
    set_attention_backend("sdpa")
    q, k, v = _qkv(heads, kv_heads, requires_grad=True)
    out = attention(q, k, v, causal=causal)
    expected = reference_attention(q, k, v, causal=causal)
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_explicit_scale_is_the_softmax_temperature(reference_attention):
    q, k, v = _qkv(4, 2)
    head_dim = q.shape[-1]
    out = attention(q, k, v, causal=True, scale=1.0 / head_dim)  # muP's 1/d attention
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True, scale=1.0 / head_dim), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, attention(q, k, v, causal=True), atol=1e-4)


def test_causal_flag_matters(reference_attention):
    q, k, v = _qkv(4, 2)
    assert not torch.allclose(attention(q, k, v, causal=True), attention(q, k, v, causal=False))
    # The first query sees only the first key when causal: its output is v[:, kv head, 0].
    torch.testing.assert_close(attention(q, k, v, causal=True)[:, :, 0], v[:, [0, 0, 1, 1], 0])


def test_auto_falls_back_to_sdpa_on_cpu(reference_attention, restore_backend):
    set_attention_backend("auto")
    q, k, v = _qkv(4, 2, dtype=torch.bfloat16)
    expected = reference_attention(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(attention(q, k, v).float(), expected, atol=2e-2, rtol=2e-2)


def test_bad_inputs_and_names(restore_backend):
    q, k, v = _qkv(4, 3)
    with pytest.raises(ValueError, match="3 kv heads do not divide 4 query heads"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="4-d"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; known: auto, sdpa, flash, math"):
        set_attention_backend("nope")


def test_flash_is_refused_where_it_cannot_run(restore_backend):
    try:
        set_attention_backend("flash")
    except ValueError as err:
        assert "not installed" in str(err)
        return
    with pytest.raises(ValueError, match="cannot run on torch.float32 tensors on cpu"):
        attention(*_qkv(4, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(8, 8), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
def test_flash_equals_sdpa_in_bf16(heads, kv_heads, causal, restore_backend):
    pytest.importorskip("flash_attn")
    q, k, v = _qkv(heads, kv_heads, dtype=torch.bfloat16, device="cuda", seq_len=256, head_dim=64)
    set_attention_backend("sdpa")
    expected = attention(q, k, v, causal=causal).float()
    set_attention_backend("flash")
    got = attention(q, k, v, causal=causal).float()
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    set_attention_backend("auto")
    torch.testing.assert_close(attention(q, k, v, causal=causal).float(), got, atol=0, rtol=0)
