"""HyperAttention against exact softmax attention: exact below the thresholds, a bounded and
shrinking error above them, gradients that flow, and selection as a Llama's attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.attention import HyperAttention, HyperParams, attention, hyper_attention
from models.attention.hyper import gray_code, lsh_hash
from models.llama import Llama, LlamaConfig


def _qkv(n, heads=2, kv_heads=2, dim=16, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    # Correlated keys and queries (shared directions), so that attention is not nearly uniform.
    base = torch.randn(1, 1, n, dim, generator=gen)
    q = base + 0.5 * torch.randn(1, heads, n, dim, generator=gen)
    k = base + 0.5 * torch.randn(1, kv_heads, n, dim, generator=gen)
    v = torch.randn(1, kv_heads, n, dim, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _directions(dim=16, r=4, seed=0):
    return torch.randn(dim, r, generator=torch.Generator().manual_seed(seed))


def _rel_error(approx, exact):
    return float((approx - exact).detach().norm() / exact.detach().norm())


def test_gray_code_and_lsh_buckets():
    assert gray_code(3).tolist() == [0, 1, 3, 2, 6, 7, 5, 4]
    directions = _directions(r=3)
    x = torch.randn(50, 16)
    bits = (x @ directions > 0).long()
    binary = bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2]
    assert torch.equal(lsh_hash(x, directions), gray_code(3)[binary])
    # Scaling a vector does not change its angular bucket.
    assert torch.equal(lsh_hash(3.0 * x, directions), lsh_hash(x, directions))


@pytest.mark.parametrize("causal", [True, False])
def test_exact_below_min_seq_len(causal):
    q, k, v = _qkv(64, heads=4, kv_heads=2)
    params = HyperParams(lsh_num_projs=4, block_size=16, sample_size=8, min_seq_len=64 if causal else 65)
    out, lse = hyper_attention(q, k, v, directions=_directions(), params=params, causal=causal, return_lse=True)
    want, want_lse = attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-5)


def test_full_sampling_coverage_makes_the_non_causal_estimate_exact_in_expectation():
    """With one block the block-diagonal part is all keys: the result is exact."""
    q, k, v = _qkv(48)
    params = HyperParams(lsh_num_projs=4, block_size=48, sample_size=16, min_seq_len=8)
    out = hyper_attention(q, k, v, directions=_directions(), params=params, causal=False)
    torch.testing.assert_close(out, attention(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_error_is_bounded_and_shrinks_with_sample_size(causal):
    n = 512
    q, k, v = _qkv(n, seed=1)
    exact = attention(q, k, v, causal=causal)
    errors = {}
    for sample_size in (16, 256, 4096):
        params = HyperParams(lsh_num_projs=4, block_size=64, sample_size=sample_size, min_seq_len=128)
        trials = []
        for seed in range(4):
            torch.manual_seed(seed)
            out = hyper_attention(q, k, v, directions=_directions(seed=seed), params=params, causal=causal)
            trials.append(_rel_error(out, exact))
        errors[sample_size] = sum(trials) / len(trials)
    # Uniform sampling with replacement: the error falls roughly as 1/sqrt(sample_size).
    assert errors[4096] < errors[256] < errors[16], errors
    assert errors[4096] < 0.25, errors
    no_samples = HyperParams(lsh_num_projs=4, block_size=64, sample_size=0, min_seq_len=128)
    out = hyper_attention(q, k, v, directions=_directions(), params=no_samples, causal=causal)
    assert _rel_error(out, exact) > errors[4096]


def test_causal_recursion_with_exact_parts_equals_causal_attention():
    """Odd length (padding path) and three levels of recursion, with blocks as large as the
    rectangles, so every sub-attention is exact and so must be the whole."""
    q, k, v = _qkv(101)
    params = HyperParams(lsh_num_projs=3, block_size=128, sample_size=4, min_seq_len=12)
    out, lse = hyper_attention(q, k, v, directions=_directions(r=3), params=params, causal=True, return_lse=True)
    want, want_lse = attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_padded_keys_take_no_mass():
    q, k, v = _qkv(40)  # 40 keys in blocks of 64: 24 padding keys, masked
    params = HyperParams(lsh_num_projs=3, block_size=64, sample_size=0, min_seq_len=8)
    out = hyper_attention(q, k, v, directions=_directions(r=3), params=params, causal=False)
    torch.testing.assert_close(out, attention(q, k, v, causal=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_are_those_of_the_computed_function(causal):
    """gradcheck in fp64 with the residual samples fixed: autograd through the sorted blocks,
    the samples and the LSE merges equals finite differences of the same estimator."""
    q, k, v = (t.double().detach().requires_grad_() for t in _qkv(33, heads=2, kv_heads=1, dim=8))
    params = HyperParams(lsh_num_projs=3, block_size=4, sample_size=4, min_seq_len=8)
    directions = _directions(dim=8, r=3).double()

    def fn(q, k, v):
        torch.manual_seed(0)
        return hyper_attention(q, k, v, directions=directions, params=params, causal=causal)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)
    grads = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_module_directions_are_seeded_and_not_in_the_state_dict():
    a, b = HyperAttention(16, HyperParams(), seed=3), HyperAttention(16, HyperParams(), seed=3)
    assert torch.equal(a.directions, b.directions)
    assert not torch.equal(a.directions, HyperAttention(16, HyperParams(), seed=4).directions)
    assert a.state_dict() == {}


def test_llama_selects_hyper_by_config_and_runs_a_softmax_checkpoint():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=96, max_seq_len=128)
    torch.manual_seed(0)
    softmax_model = Llama(cfg)
    tokens = torch.randint(0, 50, (2, 128))
    hyper_cfg = dataclasses.replace(
        cfg, attention="hyper", hyper_lsh_num_projs=3, hyper_block_size=16, hyper_sample_size=16, hyper_min_seq_len=32
    )
    hyper_model = Llama(hyper_cfg)
    hyper_model.load_state_dict(softmax_model.state_dict())  # strict: same keys
    exact, approx = softmax_model(tokens), hyper_model(tokens)
    assert not torch.allclose(exact, approx)
    assert _rel_error(approx, exact) < 0.1
    # Below the threshold the hyper model is the softmax model.
    short = tokens[:, :32]
    torch.testing.assert_close(hyper_model(short), softmax_model(short), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention: must be one of softmax, hyper, got 'x'"):
        dataclasses.replace(cfg, attention="x").validate()
    with pytest.raises(ValueError, match="hyper_block_size: must be at least 1"):
        dataclasses.replace(cfg, hyper_block_size=0).validate()


@pytest.mark.parametrize("causal", [True, False])
def test_shifting_the_values_shifts_the_output_by_the_same_amount(causal):
    """Like softmax attention, the estimate is a convex combination of value rows (LSE-merged
    normalised partials), so v + c gives out + c for the same samples: what lets
    benchmarks/attention.py report the error for values with a non-zero mean without a second run."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=gen) for _ in range(3))
    params = HyperParams(lsh_num_projs=3, block_size=16, sample_size=8, min_seq_len=32)
    directions = torch.randn(8, 3, generator=gen)
    shift = torch.randn(8, generator=gen)
    torch.manual_seed(0)
    out = hyper_attention(q, k, v, directions=directions, params=params, causal=causal)
    torch.manual_seed(0)
    shifted = hyper_attention(q, k, v + shift, directions=directions, params=params, causal=causal)
    torch.testing.assert_close(shifted, out + shift, atol=1e-5, rtol=1e-5)
