"""SLTrain's sparse part, the lean autograd of LowRankLinear, the merge for export and the FLOP count."""

import math

import pytest
import torch
import transformers

from models.llama import Llama, LlamaConfig, hf_adapter
from optim.galore import ProjectedAdamW
from optim.lowrank import (
    LowRankConfig,
    factorise,
    factorised_flops_per_token,
    merge_low_rank,
)
from optim.lowrank_linear import LowRankLinear
from trainer.memory import saved_activation_bytes

TINY = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    ffn_hidden_dim=96,
    vocab_size=97,
    max_seq_len=16,
)


def sparse_layer(density=0.1, seed=0) -> LowRankLinear:
    torch.manual_seed(seed)
    layer = LowRankLinear(20, 30, rank=4, alpha=8.0, density=density).double()
    with torch.no_grad():  # B starts at 0 (SLTrain); make it non-zero so every term is exercised
        layer.factor_b.normal_()
    return layer


def dense_reference(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ (s B A + S)^T with S built by plain (differentiable) indexing."""
    s = torch.zeros(layer.out_features * layer.in_features, dtype=x.dtype)
    s = s.index_put((layer.sparse_index,), layer.sparse_values).view(layer.out_features, layer.in_features)
    return x @ (layer.scaling * layer.factor_b @ layer.factor_a + s).t()


def test_sltrain_init_support_and_values():
    torch.manual_seed(0)
    layer = LowRankLinear(50, 40, rank=4, alpha=32.0, density=0.03)
    assert layer.nnz == int(0.03 * 40 * 50)  # splora_linear.py: int(sp_ratio * total)
    index = layer.sparse_index
    assert index.dtype == torch.long and torch.equal(index, index.unique())  # sorted, distinct
    assert 0 <= index.min() and index.max() < 40 * 50
    assert not layer.factor_b.any()  # SLTrain: B = 0
    assert layer.sparse_values.abs().max() <= 1 / math.sqrt(50)
    assert "sparse_values" in dict(layer.named_parameters())
    assert "sparse_index" in layer.state_dict() and "sparse_index" not in dict(layer.named_parameters())


@pytest.mark.parametrize("density", [0.0, 0.1])
def test_forward_and_gradients_equal_the_dense_reference(density):
    layer = sparse_layer(density)
    x = torch.randn(3, 5, 20, dtype=torch.float64, requires_grad=True)
    weights = [p for p in layer.parameters()]
    got = layer(x)
    if density:
        want = dense_reference(layer, x)
    else:
        want = x @ (layer.scaling * layer.factor_b @ layer.factor_a).t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [x, *weights], grad_out)
    want_grads = torch.autograd.grad(want, [x, *weights], grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_only_the_support_entries_change_in_training():
    layer = sparse_layer(0.1)
    index = layer.sparse_index.clone()
    off_support = torch.ones(30 * 20, dtype=torch.bool)
    off_support[index] = False
    optimizer = ProjectedAdamW([{"params": list(layer.parameters())}], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    x = torch.randn(8, 20, dtype=torch.float64)
    before = layer.dense_weight().double() - layer.scaling * (layer.factor_b @ layer.factor_a).detach()
    for _ in range(5):
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    sparse = layer.dense_weight().double() - layer.scaling * (layer.factor_b @ layer.factor_a).detach()
    assert torch.equal(layer.sparse_index, index)
    assert sparse.flatten()[off_support].abs().max() < 1e-6  # float32 merge of a float64 layer
    assert (sparse - before).flatten()[index].abs().min() > 0  # every support entry was trained


def test_factorised_model_saves_no_more_activations_than_the_dense_model():
    """Backward recomputes A x: a factorised layer keeps only its input, as a dense linear does."""
    torch.manual_seed(0)
    dense = Llama(TINY)
    factored = Llama(TINY)
    done, _ = factorise(factored, LowRankConfig(rank=8, sparse_density=0.05))
    assert done
    tokens = torch.randint(0, TINY.vocab_size, (2, TINY.max_seq_len + 1))
    assert saved_activation_bytes(factored, tokens, torch.float32) == saved_activation_bytes(
        dense, tokens, torch.float32
    )


def test_config_rejects_a_bad_density_and_counts_the_support_in_the_size_check():
    with pytest.raises(ValueError, match="lowrank.sparse_density"):
        LowRankConfig(rank=4, sparse_density=1.0).validate()
    model = Llama(TINY)  # wk, wv are 32 x 64: rank 12 factors hold 1152 < 2048, plus 0.5 of 2048 is not
    _, skipped = factorise(model, LowRankConfig(rank=12, sparse_density=0.5))
    assert {name.rsplit(".", 1)[1] for name in skipped} == {"wk", "wv"}


@pytest.mark.parametrize("density", [0.0, 0.05])
def test_merged_model_gives_the_factorised_logits_in_transformers(density):
    torch.manual_seed(0)
    model = Llama(TINY).eval()
    factorise(model, LowRankConfig(rank=8, sparse_density=density))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.factor_b.normal_(0, 0.3)
    tokens = torch.randint(
        0,
        TINY.vocab_size,
        (2, TINY.max_seq_len),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        factorised_logits = model(tokens)
    merge_low_rank(model)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert set(model.state_dict()) == set(Llama(TINY).state_dict())
    hf_cfg = hf_adapter.to_hf_config(TINY)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    result = hf.load_state_dict(hf_adapter.to_hf_state_dict(model.state_dict(), TINY), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    torch.testing.assert_close(hf_logits, factorised_logits, rtol=1e-4, atol=1e-4)


def test_flops_per_token_count_the_factors_instead_of_the_dense_weights():
    seq_len = 16
    model = Llama(TINY)
    dense = model.flops_per_token(seq_len)
    factorise(model, LowRankConfig(rank=8, sparse_density=0.05))
    # Oracle: 6 FLOPs per matmul weight actually applied (PaLM appendix B) plus the attention term.
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul += sum(
        m.factor_a.numel() + m.factor_b.numel() + m.sparse_values.numel()
        for m in model.modules()
        if isinstance(m, LowRankLinear)
    )
    attention = 12 * TINY.n_layers * TINY.dim * seq_len
    assert factorised_flops_per_token(model, dense) == pytest.approx(6 * matmul + attention, rel=1e-12)
    assert factorised_flops_per_token(model, dense) < dense
