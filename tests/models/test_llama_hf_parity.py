"""wren's Llama against Hugging Face `LlamaForCausalLM` (the numerics oracle), fp32, both directions."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.llama import Llama, LlamaConfig, hf_adapter
from models.llama.rope import rope_inv_freq

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
BASE = dict(dim=64, n_layers=2, n_heads=4, vocab_size=96, ffn_hidden_dim=160, max_seq_len=64, norm_eps=1e-5)
# Scaling with original context 32 < sequence 64, head_dim 16: wavelengths 6.3 (kept, < 32/4),
# 19.9 (interpolated) and >= 62.8 (divided by the factor), so every branch of the scaling is used.
LLAMA3 = dict(
    rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_seq_len=32
)
CASES = {
    "mha-untied": LlamaConfig(**BASE),
    "gqa-tied": LlamaConfig(**BASE, n_kv_heads=2, tie_embeddings=True),
    "mqa-untied": LlamaConfig(**BASE, n_kv_heads=1),
    "gqa-llama3-tied": LlamaConfig(**BASE, n_kv_heads=2, tie_embeddings=True, rope_theta=500.0, **LLAMA3),
    "mha-llama3-untied": LlamaConfig(**BASE, **LLAMA3),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations and non-unit norm gains, so that a swapped or mis-mapped weight shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.3 * noise if param.ndim == 1 else noise * param.shape[-1] ** -0.5)


def _hf_model(cfg: LlamaConfig) -> torch.nn.Module:
    hf_cfg = hf_adapter.to_hf_config(cfg)
    hf_cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_cfg).eval()


def _tokens(cfg: LlamaConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CASES)
def test_wren_weights_into_hf_give_same_logits(case):
    cfg = CASES[case]
    model = Llama(cfg).eval()
    _randomize(model, seed=0)
    hf = _hf_model(cfg)
    result = hf.load_state_dict(hf_adapter.to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    print(f"{case}: wren->HF max |logits diff| = {err:.2e} (logits std {theirs.std():.2f})")
    assert theirs.std() > 0.5
    assert err <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_hf_weights_into_wren_give_same_logits(case):
    cfg = CASES[case]
    hf = _hf_model(cfg)
    _randomize(hf, seed=2)
    converted = hf_adapter.from_hf_config(hf.config)
    assert converted == cfg
    model = Llama(converted).eval()
    model.load_state_dict(hf_adapter.from_hf_state_dict(hf.state_dict(), converted), strict=True)
    tokens = _tokens(cfg)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    err = (ours - theirs).abs().max().item()
    print(f"{case}: HF->wren max |logits diff| = {err:.2e}")
    assert err <= ATOL


def test_rope_scaling_changes_frequencies_and_matches_hf_bitwise():
    cfg = CASES["gqa-llama3-tied"]
    hf_cfg = hf_adapter.to_hf_config(cfg)
    hf_inv_freq, scaling = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    unscaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    assert scaling == 1.0
    assert torch.equal(ours, hf_inv_freq)
    assert ours[0] == unscaled[0]  # the highest frequency is kept
    assert torch.allclose(ours[-1], unscaled[-1] / cfg.rope_scaling_factor)  # the lowest is divided
    assert (ours < unscaled).sum() == len(ours) - 1


@pytest.mark.parametrize("flavor", ["1B", "8B"])
def test_flavor_rope_matches_hf_bitwise(flavor):
    from models.llama import flavors

    cfg = flavors[flavor]
    hf_inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_adapter.to_hf_config(cfg))
    assert torch.equal(rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), hf_inv_freq)


@pytest.mark.parametrize("case", CASES)
def test_config_round_trip(case):
    cfg = dataclasses.replace(CASES[case], init_std=0.01, rope_theta=12345.0, norm_eps=1e-6)
    hf_cfg = hf_adapter.to_hf_config(cfg)
    assert hf_cfg.num_key_value_heads == cfg.kv_heads
    assert hf_cfg.tie_word_embeddings == cfg.tie_embeddings
    assert hf_adapter.from_hf_config(hf_cfg) == cfg
    # and through config.json, as a checkpoint directory stores it
    reloaded = transformers.LlamaConfig.from_dict(hf_cfg.to_dict())
    assert hf_adapter.from_hf_config(reloaded) == cfg


def test_from_hf_config_reads_pre_v5_rope_attributes():
    """transformers 4.x configs carry `rope_theta` and `rope_scaling` (with "type" in old files)."""
    from types import SimpleNamespace

    expected = CASES["gqa-llama3-tied"]
    hf_cfg = hf_adapter.to_hf_config(expected).to_dict()
    del hf_cfg["rope_parameters"]
    legacy = SimpleNamespace(
        **hf_cfg,
        rope_theta=expected.rope_theta,
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )
    assert hf_adapter.from_hf_config(legacy) == expected
    legacy.rope_scaling = None
    unscaled = dataclasses.replace(expected, rope_scaling_factor=0.0, rope_original_max_seq_len=8192)
    assert hf_adapter.from_hf_config(legacy) == unscaled  # scaling fields at their defaults


def test_from_hf_config_rejects_unsupported_features():
    hf_cfg = hf_adapter.to_hf_config(CASES["mha-untied"])
    hf_cfg.mlp_bias = True
    with pytest.raises(ValueError, match="^mlp_bias"):
        hf_adapter.from_hf_config(hf_cfg)
    hf_cfg = hf_adapter.to_hf_config(CASES["mha-untied"])
    hf_cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="^rope_parameters: rope_type 'yarn'"):
        hf_adapter.from_hf_config(hf_cfg)


@pytest.mark.parametrize("case", ["mha-untied", "gqa-tied"])
def test_state_dict_round_trip_and_names(case):
    cfg = CASES[case]
    sd = Llama(cfg).state_dict()
    hf_sd = hf_adapter.to_hf_state_dict(sd, cfg)
    assert "model.layers.1.self_attn.q_proj.weight" in hf_sd
    assert hf_sd["model.layers.0.mlp.gate_proj.weight"] is sd["layers.0.feed_forward.w1.weight"]
    assert ("lm_head.weight" in hf_sd) != cfg.tie_embeddings
    back = hf_adapter.from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)


def test_state_dict_errors_name_the_keys():
    cfg = CASES["gqa-tied"]
    sd = Llama(cfg).state_dict()
    del sd["norm.weight"]
    with pytest.raises(ValueError, match="missing keys \\['norm.weight'\\]"):
        hf_adapter.to_hf_state_dict(sd, cfg)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_bias"):
        hf_adapter.from_hf_state_dict({"model.layers.0.self_attn.q_bias": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_matches_hf_bitwise_in_bf16(weight_dtype):
    """Cast order matters only below fp32: normalise in fp32, cast back, then scale (as HF)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from models.llama.model import RMSNorm

    ours, theirs = RMSNorm(64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    weight = 1 + 0.3 * torch.randn(64)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    ours.to(weight_dtype), theirs.to(weight_dtype)
    x = (3 * torch.randn(4, 64)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
