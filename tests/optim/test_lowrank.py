"""Low-rank factorisation, weight refactorization and momentum reset with its lr recovery."""

import math

import pytest
import torch
from torch import nn

from models.llama import Llama, LlamaConfig
from optim.galore import RECOVERY_START, ProjectedAdamW
from optim.lowrank import LowRankConfig, LowRankLinear, balanced_factors, factorise, refactorize

TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, vocab_size=97, max_seq_len=32)


def test_factorise_replaces_the_matching_linears_and_computes_s_b_a_x():
    torch.manual_seed(0)
    model = Llama(TINY)
    done, skipped = factorise(model, LowRankConfig(rank=8))
    assert len(done) == 2 * 7 and not skipped
    layer = model.layers[0].attention.wq
    assert isinstance(layer, LowRankLinear) and layer.factor_b.shape == (64, 8) and layer.factor_a.shape == (8, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), (32 / 8) * x @ (layer.factor_b @ layer.factor_a).t())
    assert isinstance(model.output, nn.Linear)  # not an attention / MLP weight


def test_factorise_leaves_layers_dense_where_factors_are_not_smaller():
    model = Llama(TINY)
    done, skipped = factorise(model, LowRankConfig(rank=24))  # wk, wv (32 x 64): 24 * 96 >= 32 * 64
    assert {name.rsplit(".", 1)[1] for name in skipped} == {"wk", "wv"}
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in skipped)
    assert done


def test_refactorization_keeps_the_product_and_balances_the_factors():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(40, 6, generator=generator) * 3.0
    a = torch.randn(6, 25, generator=generator) * 0.1
    new_b, new_a = balanced_factors(b, a)
    torch.testing.assert_close(new_b @ new_a, b @ a, rtol=1e-5, atol=1e-5)
    # The reference (SpLoRaLinear.merge_and_reinit): thin SVD of W = B A, B = U sqrt(S), A = sqrt(S) V^T.
    _, s, _ = torch.linalg.svd(b @ a, full_matrices=False)
    torch.testing.assert_close(new_b.t() @ new_b, torch.diag(s[:6]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_a @ new_a.t(), torch.diag(s[:6]), rtol=1e-4, atol=1e-5)


def test_refactorize_in_place_keeps_the_layer_function():
    torch.manual_seed(0)
    layer = LowRankLinear(20, 30, rank=5, alpha=10.0)
    with torch.no_grad():
        layer.factor_b.mul_(7.0)
    x = torch.randn(4, 20)
    before = layer(x)
    refactorize(layer)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.factor_b.norm(), layer.factor_a.norm(), rtol=1e-4, atol=0)


def adam(params, **kwargs):
    return ProjectedAdamW([{"params": params, "weight_decay": 0.0}], lr=0.1, betas=(0.9, 0.999), eps=1e-8, **kwargs)


def test_momentum_reset_zeroes_moments_and_step_and_ramps_the_lr():
    param = nn.Parameter(torch.zeros(4))
    optimizer = adam([param], reset_every_steps=3, reset_warmup_steps=3)
    moves = []
    for _ in range(6):
        before = param.detach().clone()
        param.grad = torch.ones(4)
        optimizer.step()
        moves.append((param.detach() - before).abs().max().item())
        if len(moves) == 3:  # the reset happens at the end of step 3
            state = optimizer.state[param]
            assert state["step"].item() == 0 and state["age"].item() == 3
            assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0
    # Adam's bias-corrected first step on a constant gradient moves by lr (eps aside); after the reset
    # the lr ramps linearly from 0.001x over 3 steps (reference "quick recovery").
    ramp = [RECOVERY_START + (1 - RECOVERY_START) * k / 2 for k in range(3)]
    for got, factor in zip(moves[3:], ramp):
        assert math.isclose(got, 0.1 * factor, rel_tol=1e-3)  # float32 weights near 0.3
    assert all(math.isclose(m, 0.1, rel_tol=1e-4) for m in moves[:3])


def test_refactorization_runs_on_its_period_through_the_optimizer():
    torch.manual_seed(0)
    layer = LowRankLinear(12, 16, rank=3, alpha=3.0)
    optimizer = adam(list(layer.parameters()), refactor_every_steps=2)
    optimizer.track_low_rank([layer])
    x = torch.randn(5, 12)
    for step in range(1, 5):
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        gram_b, gram_a = layer.factor_b.t() @ layer.factor_b, layer.factor_a @ layer.factor_a.t()
        balanced = torch.allclose(gram_b, gram_a, rtol=1e-3, atol=1e-5)
        assert balanced == (step % 2 == 0), step


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lowrank.rank"):
        LowRankConfig(rank=-1).validate()
    with pytest.raises(ValueError, match="lowrank.target_patterns"):
        LowRankConfig(rank=4, target_patterns=[]).validate()
