"""The Llama model on its own: init, tying, FLOP accounting, validation, autocast."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models.llama import Llama, LlamaConfig, flavors

SMALL = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=160, max_seq_len=32)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("tied", [False, True])
def test_meta_build_then_init_equals_direct_build(tied):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tied, rope_scaling_factor=4.0, rope_original_max_seq_len=16)
    torch.manual_seed(7)
    direct = Llama(cfg)
    with torch.device("meta"):
        lazy = Llama(cfg)
    assert all(t.is_meta for t in _state(lazy).values())
    lazy.to_empty(device="cpu")
    torch.manual_seed(7)
    lazy.init_weights()
    expected, got = _state(direct), _state(lazy)
    assert expected.keys() == got.keys()
    assert {"rope_cos", "rope_sin"} <= got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if tied:
        assert lazy.output is None
    assert "rope_cos" not in lazy.state_dict()  # recomputed, never checkpointed


def test_init_statistics():
    cfg = dataclasses.replace(SMALL, dim=256, n_heads=4, ffn_hidden_dim=512, vocab_size=512, n_layers=8)
    torch.manual_seed(0)
    model = Llama(cfg)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    layer = model.layers[3]
    for weight, std in [
        (model.tok_embeddings.weight, cfg.init_std),
        (model.output.weight, cfg.init_std),
        (layer.attention.wq.weight, cfg.init_std),
        (layer.feed_forward.w3.weight, cfg.init_std),
        (layer.attention.wo.weight, out_std),
        (layer.feed_forward.w2.weight, out_std),
    ]:
        assert weight.mean().abs() < 3 * std / weight.numel() ** 0.5
        assert weight.std().item() == pytest.approx(std, rel=0.03)
    assert torch.equal(layer.ffn_norm.weight, torch.ones(cfg.dim))
    torch.manual_seed(0)
    assert torch.equal(Llama(cfg).layers[3].attention.wq.weight, layer.attention.wq.weight)


def test_tied_embeddings_share_one_parameter_that_gets_gradients():
    cfg = dataclasses.replace(SMALL, tie_embeddings=True)
    model = Llama(cfg)
    untied = Llama(dataclasses.replace(cfg, tie_embeddings=False))
    names = [name for name, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.dim
    assert model.num_params(exclude_embeddings=True) == model.num_params() - cfg.vocab_size * cfg.dim

    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    grad = model.tok_embeddings.weight.grad
    # Rows of tokens that never occur get gradient only through the output projection.
    unused = torch.ones(cfg.vocab_size, dtype=torch.bool)
    unused[tokens.unique()] = False
    assert unused.any() and grad[unused].abs().sum() > 0
    # The gradient is the sum of both uses: check against an untied copy of the same weights.
    untied.load_state_dict({**model.state_dict(), "output.weight": model.tok_embeddings.weight.detach()})
    F.cross_entropy(untied(tokens).flatten(0, 1), tokens.flatten()).backward()
    both = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(grad, both)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_flops_per_token_matches_flop_counter(tied, n_kv_heads, monkeypatch, reference_attention):
    """FlopCounterMode counts 2mnk per (batched) matmul, forward and backward; norms, RoPE, SiLU,
    softmax and the embedding lookup are not counted. It has no formula for CPU SDPA
    (`_scaled_dot_product_flash_attention_for_cpu` counts 0), so:
    - with SDPA it must count exactly the 6 N_matmul part;
    - with attention written as two matmuls (QK^T, AV over all T keys; 2 + 4 products fwd + bwd)
      it must count exactly the whole 6 N_matmul + 12 L dim T.
    """
    cfg = dataclasses.replace(SMALL, tie_embeddings=tied, n_kv_heads=n_kv_heads)
    model = Llama(cfg)
    batch, seq_len = 2, 32
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    def counted_per_token() -> float:
        with FlopCounterMode(display=False) as counter:
            model(tokens).float().square().mean().backward()
        return counter.get_total_flops() / (batch * seq_len)

    attention_term = 12 * cfg.n_layers * cfg.dim * seq_len
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul_weights = linear_weights + tied * cfg.vocab_size * cfg.dim  # a tied output is still a matmul
    assert model.flops_per_token(seq_len) == 6 * matmul_weights + attention_term
    assert counted_per_token() == model.flops_per_token(seq_len) - attention_term
    monkeypatch.setattr("models.attention.kinds.attention", reference_attention)
    assert counted_per_token() == model.flops_per_token(seq_len)


def test_flops_per_token_of_flavors():
    """Hand-computed 6N + 12 L d T for the 8B shape (vocab placeholder 8192), T = 8192."""
    cfg = flavors["8B"]
    with torch.device("meta"):
        model = Llama(cfg)
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    n = 32 * per_layer + 8192 * 4096
    assert model.flops_per_token(8192) == 6 * n + 12 * 32 * 4096 * 8192


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_heads=6), "n_heads: 6 does not divide dim=64"),
        (dict(n_heads=8, n_kv_heads=3), "n_kv_heads: 3 does not divide n_heads=8"),
        (dict(dim=96, n_heads=32), "n_heads: head_dim = dim / n_heads = 3 must be even for RoPE"),
        (dict(n_kv_heads=0), "n_kv_heads: must be a positive integer"),
        (dict(dim=0), "dim: must be a positive integer"),
        (dict(vocab_size=-1), "vocab_size: must be a positive integer"),
        (dict(ffn_hidden_dim=0), "ffn_hidden_dim: must be a positive integer"),
        (dict(n_layers=0), "n_layers: must be a positive integer"),
        (dict(max_seq_len=0), "max_seq_len: must be a positive integer"),
        (dict(norm_eps=0.0), "norm_eps: must be positive"),
        (dict(init_std=-1.0), "init_std: must be positive"),
        (dict(rope_theta=0.0), "rope_theta: must be positive"),
        (dict(rope_scaling_factor=-1.0), "rope_scaling_factor: must be >= 0"),
        (dict(rope_scaling_factor=8.0, rope_high_freq_factor=1.0), "rope_high_freq_factor: 1.0 must exceed"),
        (dict(rope_scaling_factor=8.0, rope_original_max_seq_len=0), "rope_original_max_seq_len: must be positive"),
    ],
)
def test_validate_names_the_field(change, message):
    cfg = dataclasses.replace(SMALL, **change)
    with pytest.raises(ValueError) as info:
        cfg.validate()
    assert str(info.value).startswith(message)
    with pytest.raises(ValueError):
        Llama(cfg)


def test_all_flavors_validate_and_are_sized_as_documented():
    for cfg in flavors.values():
        cfg.validate()
    assert flavors["tiny"].tie_embeddings and flavors["tiny"].kv_heads == 2
    with torch.device("meta"):
        assert 1e6 < Llama(flavors["tiny"]).num_params() < 1e7
        # Llama-3.2-1B: 1.236e9 parameters with its 128256-token vocabulary, tied.
        assert Llama(dataclasses.replace(flavors["1B"], vocab_size=128256)).num_params() == 1_235_814_400
        # Llama-3-8B: 8.030e9 parameters with its 128256-token vocabulary, untied.
        assert Llama(dataclasses.replace(flavors["8B"], vocab_size=128256)).num_params() == 8_030_261_248


def test_bf16_autocast_forward_backward():
    model = Llama(SMALL)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 32))
    with torch.no_grad():
        reference = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_causality_and_length_limit():
    model = Llama(SMALL).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (tokens[0, 10] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="^max_seq_len"):
        model(torch.zeros(1, SMALL.max_seq_len + 1, dtype=torch.long))
