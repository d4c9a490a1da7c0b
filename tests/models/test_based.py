"""BASED: the Taylor feature map against its closed form, the three linear-attention forms
against each other and against the kernel 1 + s + s^2/2 written out, the mixers against plain
oracles, and cached generation against the full forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from models.attention.linear import (
    linear_attention_chunked,
    linear_attention_quadratic,
    linear_attention_recurrent,
    taylor_feature_dim,
    taylor_feature_map,
    taylor_feature_map_compact,
    taylor_state_dim,
)
from models.based import Based, BasedConfig, flavors
from models.based.model import BaseConv, SlidingWindowAttention

TINY = BasedConfig(
    dim=32, n_layers=5, n_heads=2, vocab_size=61, ffn_hidden_dim=64, feature_dim=4,
    linear_attention_layers=[1], sliding_window_layers=[2], window_tokens=5, chunk_size_tokens=8, max_seq_len=96,
)


def _qkv(seq_len, feature_dim=16, head_dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, seq_len, feature_dim, generator=gen, dtype=dtype)
    k = torch.randn(2, 3, seq_len, feature_dim, generator=gen, dtype=dtype)
    v = torch.randn(2, 3, seq_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v


def _empty_state(q, v):
    features = taylor_state_dim(q.shape[-1])
    return (torch.zeros(*q.shape[:2], features, v.shape[-1]), torch.zeros(*q.shape[:2], features))


def test_taylor_feature_map_is_the_second_order_expansion_of_exp():
    x, y = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 16, dtype=torch.float64)
    phi_x, phi_y = taylor_feature_map(x), taylor_feature_map(y)
    assert phi_x.shape[-1] == taylor_feature_dim(16) == 273  # BASED's 1 + 16 + 256
    s = (x * y).sum(-1) / 16**0.5
    torch.testing.assert_close((phi_x * phi_y).sum(-1), 1 + s + s**2 / 2, atol=1e-12, rtol=1e-12)
    # The compact form (each x_i x_j, i < j, once) has the same kernel with 153 features.
    compact_x, compact_y = taylor_feature_map_compact(x), taylor_feature_map_compact(y)
    assert compact_x.shape[-1] == taylor_state_dim(16) == 153
    torch.testing.assert_close((compact_x * compact_y).sum(-1), 1 + s + s**2 / 2, atol=1e-12, rtol=1e-12)


def test_quadratic_form_equals_the_kernel_written_out():
    """fla's naive_parallel_based: A = tril(1 + s + s^2/2), s = q k^T / sqrt(d'), Y = A V / rowsum(A)."""
    q, k, v = _qkv(20, dtype=torch.float64)
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = torch.tril(1 + s + s**2 / 2)
    want = (scores @ v) / scores.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention_quadratic(q, k, v), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seq_len, chunk_size", [(64, 16), (50, 16), (7, 16), (33, 1)])
def test_three_forms_agree_in_fp32(seq_len, chunk_size):
    q, k, v = _qkv(seq_len)
    quadratic = linear_attention_quadratic(q, k, v)
    chunked, chunked_state = linear_attention_chunked(q, k, v, chunk_size=chunk_size)
    recurrent, recurrent_state = linear_attention_recurrent(q, k, v, _empty_state(q, v))
    torch.testing.assert_close(chunked, quadratic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recurrent, quadratic, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked_state, recurrent_state):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_chunked_form_continues_from_a_state():
    q, k, v = _qkv(40)
    whole, _ = linear_attention_chunked(q, k, v, chunk_size=16)
    first, state = linear_attention_chunked(q[:, :, :13], k[:, :, :13], v[:, :, :13], chunk_size=16)
    second, _ = linear_attention_chunked(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], chunk_size=16, state=state)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, atol=1e-5, rtol=1e-5)


def test_chunked_form_gradients_equal_the_quadratic_form():
    q, k, v = (t.requires_grad_() for t in _qkv(24, feature_dim=4))
    grads = torch.autograd.grad(linear_attention_chunked(q, k, v, chunk_size=8)[0].square().sum(), (q, k, v))
    want = torch.autograd.grad(linear_attention_quadratic(q, k, v).square().sum(), (q, k, v))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sliding_window_mixer_reads_only_the_window():
    torch.manual_seed(0)
    mixer = SlidingWindowAttention(TINY)
    mixer.init_weights(std=0.2, out_std=0.2)
    model = Based(TINY)
    x = torch.randn(1, 30, TINY.dim)
    out = mixer(x, model.rope_cos, model.rope_sin)
    x2 = x.clone()
    x2[:, 10] += 3.0  # position 10 is read by queries 10 .. 10 + window_tokens only
    out2 = mixer(x2, model.rope_cos, model.rope_sin)
    changed = (out2 - out).abs().amax(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(10, 10 + TINY.window_tokens + 1))


def test_base_conv_equals_a_causal_convolution_written_out():
    torch.manual_seed(0)
    conv = BaseConv(TINY)
    conv.init_weights(std=0.2, out_std=0.2)
    x = torch.randn(2, 9, TINY.dim)
    u1, u2 = conv.in_proj(x).chunk(2, dim=-1)
    weight = conv.conv.weight[:, 0]  # (inner, kernel)
    taps = weight.shape[1]
    conv_out = torch.zeros_like(u1)
    for t in range(9):
        for j in range(taps):
            src = t - (taps - 1) + j
            if src >= 0:
                conv_out[:, t] += weight[:, j] * u1[:, src]
    want = conv.out_proj(torch.nn.functional.silu(conv_out) * u2)
    torch.testing.assert_close(conv(x, None, None), want, atol=1e-5, rtol=1e-5)


def _model(seed=0, **changes):
    torch.manual_seed(seed)
    return Based(dataclasses.replace(TINY, **changes))


@pytest.mark.parametrize("prompt_len", [1, 11])
def test_cached_generation_equals_the_full_forward(prompt_len):
    model = _model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 64)
        steps = [model.forward_cached(tokens[:, :prompt_len], cache)]
        steps += [model.forward_cached(tokens[:, t : t + 1], cache) for t in range(prompt_len, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seq_len == 40


def test_state_memory_is_constant_in_the_context_length():
    model = _model()
    sizes = {}
    with torch.no_grad():
        cache = model.make_cache(1, 96)
        for t in range(90):
            model.forward_cached(torch.tensor([[t % TINY.vocab_size]]), cache)
            sizes[t + 1] = cache.nbytes()
    window_full = TINY.window_tokens + 1
    assert sizes[window_full] == sizes[30] == sizes[90]
    assert sizes[1] < sizes[window_full]  # only the sliding window's keys grow, up to window_tokens + 1


def test_meta_build_then_init_equals_direct_build():
    direct = _model(seed=3)
    with torch.device("meta"):
        meta = Based(TINY)
    meta.to_empty(device="cpu")
    torch.manual_seed(3)
    meta.init_weights()
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_step_reduces_the_loss():
    model = _model()
    tokens = torch.randint(0, TINY.vocab_size, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_registry_and_published_shapes():
    spec = models.get_model_spec("based")
    assert spec.model_cls is Based and spec.hf_adapter is None
    m360, m1b = flavors["360M"], flavors["1.3B"]
    assert (m360.dim, m360.n_layers, m360.n_heads, m360.feature_dim, m360.ffn_hidden_dim) == (1024, 27, 16, 16, 2048)
    assert m360.linear_attention_layers == [1, 6, 11, 16, 21] and m360.sliding_window_layers == [2, 7, 12, 17, 22]
    assert [m360.mixer_kind(i) for i in range(27)].count("conv") == 17
    assert (m1b.dim, m1b.n_layers) == (1792, 36)
    assert m1b.linear_attention_layers == [1, 6, 11, 16, 21, 27, 33]
    assert m1b.sliding_window_layers == [2, 7, 12, 17, 22, 28, 34]
    assert m360.window_tokens == 128  # the reference's window_size 256 -> flash-attn (128, 0)


def test_flops_per_token_counts_the_linears():
    model = _model()
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = model.flops_per_token(32)
    extra = 12 * TINY.n_heads * taylor_state_dim(TINY.feature_dim) * TINY.head_dim + 12 * TINY.dim * (TINY.window_tokens + 1)
    assert per_token == 6 * (linears + TINY.vocab_size * TINY.dim) + extra


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_heads=3), "n_heads: 3 does not divide dim=32"),
        (dict(linear_attention_layers=[7]), r"linear_attention_layers: layer indices \[7\] are outside"),
        (dict(sliding_window_layers=[1]), r"sliding_window_layers: layers \[1\] are also"),
        (dict(conv_expand=3), "conv_expand: must be an even integer"),
        (dict(window_tokens=-1), "window_tokens: must be 0 or positive"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes).validate()
