"""Lizard attention against the paper's formulas written out densely, and generation against the full forward.

Oracles: gated linear attention as the explicit sum over all earlier tokens with the product of
gates between them (Lizard, arXiv:2507.09025, section 3), and window attention as a dense masked
softmax whose denominator also holds exp(t_j) of the meta-memory logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import models.lizard  # noqa: F401  (registers "lizard")
from models import get_model_spec
from models.lizard import Lizard, LizardConfig, parallelize_lizard
from models.lizard.ops import gla_chunked, gla_recurrent, hedgehog, window_attention
from models.llama.rope import apply_rope

CFG = LizardConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128, max_seq_len=96,
    window_size=8, n_meta_tokens=4, feature_dim=16, chunk_size=16,
)


def gla_oracle(phi_q, phi_k, v, log_gate):
    """y_i = sum_{t<=i} (prod_{l=t+1}^{i} gamma_l) phi_q_i.phi_k_t v_t / (same without v_t), densely."""
    seq_len = phi_q.shape[2]
    cum = log_gate.double().cumsum(-1)  # sum_{l<=i} log gamma_l
    log_decay = cum[..., :, None] - cum[..., None, :]  # sum_{l=t+1}^{i} log gamma_l
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    weights = (phi_q.double() @ phi_k.double().transpose(-1, -2)) * log_decay.exp().masked_fill(~causal, 0)
    return (weights @ v.double()) / weights.sum(-1, keepdim=True)


def window_oracle(q, k, v, meta_logits, window, scale):
    """Dense softmax over keys t in (i - w, i] plus m sinks exp(t_j) that carry no value."""
    seq_len = q.shape[2]
    i = torch.arange(seq_len)[:, None]
    t = torch.arange(seq_len)[None, :]
    band = (t <= i) & (t > i - window)
    scores = (q.double() @ k.double().transpose(-1, -2) * scale).masked_fill(~band, float("-inf"))
    numerator = scores.exp() @ v.double()
    denominator = scores.exp().sum(-1, keepdim=True) + meta_logits.double().exp().sum(-1)[None, :, None, None]
    return numerator / denominator


def _features(batch=2, heads=3, seq_len=45, features=8, dim=5, gate_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    phi_q = torch.rand(batch, heads, seq_len, features, generator=gen) + 0.01
    phi_k = torch.rand(batch, heads, seq_len, features, generator=gen) + 0.01
    v = torch.randn(batch, heads, seq_len, dim, generator=gen)
    log_gate = F.logsigmoid(gate_scale * torch.randn(batch, heads, seq_len, generator=gen))
    return phi_q, phi_k, v, log_gate


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
@pytest.mark.parametrize("gate_scale", [1.0, 8.0])
def test_chunked_and_recurrent_gla_equal_the_dense_formula(chunk_size, gate_scale):
    phi_q, phi_k, v, log_gate = _features(gate_scale=gate_scale)
    want = gla_oracle(phi_q, phi_k, v, log_gate).float()
    chunked, chunked_state = gla_chunked(phi_q, phi_k, v, log_gate, chunk_size=chunk_size)
    recurrent, recurrent_state = gla_recurrent(phi_q, phi_k, v, log_gate)
    torch.testing.assert_close(chunked, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recurrent, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_state, recurrent_state, rtol=1e-5, atol=1e-5)


def test_gla_continues_from_a_state():
    phi_q, phi_k, v, log_gate = _features(seq_len=40)
    whole, _ = gla_chunked(phi_q, phi_k, v, log_gate, chunk_size=8)
    first, state = gla_chunked(phi_q[:, :, :13], phi_k[:, :, :13], v[:, :, :13], log_gate[:, :, :13], chunk_size=8)
    rest, _ = gla_recurrent(phi_q[:, :, 13:], phi_k[:, :, 13:], v[:, :, 13:], log_gate[:, :, 13:], state)
    torch.testing.assert_close(torch.cat((first, rest), dim=2), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len, window, n_meta", [(45, 8, 4), (16, 16, 1), (5, 8, 0), (33, 1, 2)])
def test_window_attention_equals_the_dense_formula(seq_len, window, n_meta):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, seq_len, 8, generator=gen) for _ in range(3))
    meta = torch.randn(3, n_meta, generator=gen)
    got = window_attention(q, k, v, meta, window=window, scale=0.35)
    torch.testing.assert_close(got, window_oracle(q, k, v, meta, window, 0.35).float(), rtol=1e-5, atol=1e-5)


def test_window_attention_with_a_cached_prefix_equals_the_tail_of_the_whole():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    meta = torch.randn(2, 3, generator=gen)
    whole = window_attention(q, k, v, meta, window=8, scale=0.3)
    for start in (1, 8, 21):
        prefix = slice(max(0, start - 8), start)
        tail = window_attention(
            q[:, :, start:], k[:, :, start:], v[:, :, start:], meta, window=8, scale=0.3,
            k_prefix=k[:, :, prefix], v_prefix=v[:, :, prefix],
        )
        torch.testing.assert_close(tail, whole[:, :, start:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_rope", [False, True])
def test_attention_layer_is_gla_plus_alpha_times_window(window_rope):
    torch.manual_seed(0)
    model = Lizard(dataclasses.replace(CFG, window_rope=window_rope))
    attn = model.layers[0].attention
    with torch.no_grad():
        attn.gate.weight.normal_(std=0.3)
        attn.meta_logits.normal_()
        attn.window_factor.uniform_(0.5, 1.5)
    x = torch.randn(2, 40, CFG.dim)
    q = attn.wq(x).view(2, 40, 4, 16).transpose(1, 2)
    k = attn.wk(x).view(2, 40, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 40, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    log_gate = F.logsigmoid(attn.gate(x)).transpose(1, 2)
    y_gate = gla_oracle(hedgehog(q, attn.feature_map_q), hedgehog(k, attn.feature_map_k), v, log_gate)
    q_w, k_w = apply_rope(q, k, model.rope_cos, model.rope_sin) if window_rope else (q, k)
    y_window = window_oracle(q_w, k_w, v, attn.meta_logits, CFG.window_size, CFG.head_dim**-0.5)
    want = y_gate + attn.window_factor.double()[None, :, None, None] * y_window
    torch.testing.assert_close(attn.attend(x, model.rope_cos, model.rope_sin), want.float(), rtol=1e-5, atol=1e-5)


def _trained_looking(cfg: LizardConfig) -> Lizard:
    torch.manual_seed(0)
    model = Lizard(cfg)
    with torch.no_grad():  # move the Lizard parameters off their symmetric init
        for layer in model.layers:
            layer.attention.gate.weight.normal_(std=0.5)
            layer.attention.meta_logits.normal_()
    return model


@pytest.mark.parametrize("window_rope", [False, True])
def test_token_by_token_generation_equals_the_full_forward(window_rope):
    model = _trained_looking(dataclasses.replace(CFG, window_rope=window_rope))
    tokens = torch.randint(0, CFG.vocab_size, (2, 50))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 64)
        steps = [model.forward_cached(tokens[:, :1], cache)]
        steps += [model.forward_cached(tokens[:, i : i + 1], cache) for i in range(1, 50)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        prefilled = model.make_cache(2, 64)
        prompt = model.forward_cached(tokens[:, :21], prefilled)
        rest = [model.forward_cached(tokens[:, i : i + 1], prefilled) for i in range(21, 50)]
        torch.testing.assert_close(torch.cat([prompt, *rest], dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == prefilled.seq_len == 50


def test_generation_state_memory_is_constant_in_the_context_length():
    model = _trained_looking(CFG)
    cache = model.make_cache(1, 10_000)
    sizes = {}
    with torch.no_grad():
        for position in range(4 * CFG.window_size):
            model.forward_cached(torch.randint(0, CFG.vocab_size, (1, 1)), cache)
            sizes[position + 1] = cache.nbytes()
    assert sizes[CFG.window_size] == sizes[2 * CFG.window_size] == sizes[4 * CFG.window_size]


def test_gradients_reach_every_parameter_and_checkpointing_changes_nothing():
    model = _trained_looking(CFG)
    checkpointed = parallelize_lizard(_trained_looking(CFG), None, activation_checkpointing=True)
    tokens = torch.randint(0, CFG.vocab_size, (2, 33))
    grads = []
    for m in (model, checkpointed):
        F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7)


def test_registered_with_valid_flavors():
    spec = get_model_spec("lizard")
    assert spec.model_cls is Lizard and spec.parallelize is parallelize_lizard
    for flavor in spec.flavors.values():
        flavor.validate()
    with pytest.raises(ValueError, match="^window_size:"):
        dataclasses.replace(CFG, window_size=0).validate()
    with pytest.raises(ValueError, match="^n_meta_tokens:"):
        dataclasses.replace(CFG, n_meta_tokens=-1).validate()
