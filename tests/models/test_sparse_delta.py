"""Sparse deltas (SpIEL section 3): forward equals a dense W + scatter(delta) model, gradients are
the gather of the dense weight gradient, k follows SftModel's allocation, and deltas applied to the
base equal the fine-tuned weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.llama import Llama, LlamaConfig
from models.peft.sparse_config import SparseTargetConfig, SpielConfig
from models.peft.sparse_delta import (
    SparseDeltaLinear,
    add_sparse_deltas,
    apply_sparse_deltas,
    load_sparse_deltas,
    merge_and_unload_sparse,
    save_sparse_deltas,
    sparse_delta_modules,
    sparse_deltas,
)

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=16)


def _scatter(shape, indices, values):
    dense = torch.zeros(shape).flatten()
    for i, v in zip(indices.tolist(), values.tolist()):
        dense[i] += v
    return dense.view(shape)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_equal_dense_weight_plus_scatter(bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias)
    layer = SparseDeltaLinear(base, k=9, seed=3)
    with torch.no_grad():
        layer.delta_values.normal_()
    x = torch.randn(2, 5, 12, requires_grad=True)
    dense_w = (base.weight.detach() + _scatter(base.weight.shape, layer.delta_indices, layer.delta_values.detach())).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = F.linear(x_ref, dense_w, base.bias)
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta_values.grad, dense_w.grad.flatten()[layer.delta_indices], rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None or not layer.weight.requires_grad


def test_autocast_forward_matches_low_precision_dense():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False)
    layer = SparseDeltaLinear(base, k=10, seed=1)
    with torch.no_grad():
        layer.delta_values.normal_()
    x = torch.randn(3, 16)
    dense = (base.weight + _scatter(base.weight.shape, layer.delta_indices, layer.delta_values.detach())).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (x.bfloat16() @ dense.t()).float(), rtol=2e-2, atol=2e-2)


def test_initial_support_is_distinct_sorted_and_seeded():
    base = nn.Linear(10, 10)
    a, b, c = SparseDeltaLinear(base, k=30, seed=5), SparseDeltaLinear(base, k=30, seed=5), SparseDeltaLinear(base, k=30, seed=6)
    assert torch.equal(a.delta_indices, b.delta_indices) and not torch.equal(a.delta_indices, c.delta_indices)
    assert a.delta_indices.unique().numel() == 30 and torch.equal(a.delta_indices, a.delta_indices.sort().values)
    assert (a.delta_values == 0).all()


def test_k_follows_density_of_all_parameters_and_lora_matching():
    torch.manual_seed(0)
    model = Llama(CFG)
    total = sum(p.numel() for p in model.parameters())
    targets = ["wq", "w2"]
    counts = apply_sparse_deltas(model, SparseTargetConfig(density=0.05, target_modules=targets), seed=0)
    linears = {n: m for n, m in sparse_delta_modules(model)}
    sizes = {n: m.weight.numel() for n, m in linears.items()}
    assert set(linears) == {f"layers.{i}.{p}" for i in range(2) for p in ("attention.wq", "feed_forward.w2")}
    for name, size in sizes.items():  # SftModel.inject_adapter: int(int(total*density) * numel / sum numel)
        assert counts[name] == int(int(total * 0.05) * size / sum(sizes.values())) == linears[name].k
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.delta_values" for n in linears)

    lora_matched = Llama(CFG)
    counts = apply_sparse_deltas(lora_matched, SparseTargetConfig(match_lora_rank=4, target_modules=targets), seed=0)
    lora_params = 4 * sum(m.in_features + m.out_features for _, m in sparse_delta_modules(lora_matched))
    assert abs(sum(counts.values()) - lora_params) < len(counts)  # int() floors per weight


def test_meta_apply_then_reset_gives_valid_support():
    with torch.device("meta"):
        model = Llama(CFG)
    apply_sparse_deltas(model, SpielConfig(density=0.02), seed=1)
    model.to_empty(device="cpu")
    for _, module in sparse_delta_modules(model):
        module.reset_peft_parameters()
        assert module.delta_indices.unique().numel() == module.k
        assert (module.delta_values == 0).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^density:"):
        SpielConfig(density=0).validate()
    with pytest.raises(ValueError, match="^selection:"):
        SpielConfig(selection="xx").validate()
    with pytest.raises(ValueError, match="^selection_accumulation_steps:"):
        SpielConfig(reselection_steps=5, selection_accumulation_steps=5).validate()
    with pytest.raises(ValueError, match="^target_modules:"):
        apply_sparse_deltas(Llama(CFG), SparseTargetConfig(target_modules=["nothing"]), seed=0)


def test_deltas_applied_to_base_equal_fine_tuned_weights(tmp_path):
    torch.manual_seed(0)
    model = Llama(CFG)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_sparse_deltas(model, SpielConfig(density=0.05), seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, CFG.vocab_size, (4, 12))
    for _ in range(3):
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_sparse_deltas(tmp_path / "delta.safetensors", sparse_deltas(model))
    with torch.no_grad():
        tuned_logits = model(tokens)
    merged = merge_and_unload_sparse(model)
    assert not any(isinstance(m, SparseDeltaLinear) for m in merged.modules())
    composed = dict(base_state)
    add_sparse_deltas(composed, load_sparse_deltas(path))
    for name, weight in merged.state_dict().items():  # oracle: base + dense scatter of the trained values
        torch.testing.assert_close(composed[name], weight, rtol=0, atol=0)
    fresh = Llama(CFG)
    fresh.load_state_dict(composed)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), tuned_logits, rtol=1e-5, atol=1e-5)
    add_sparse_deltas(composed, load_sparse_deltas(path), sign=-1.0)
    for name, weight in base_state.items():
        torch.testing.assert_close(composed[name], weight, rtol=0, atol=1e-6)


def test_delta_file_holds_tensors_only(tmp_path):
    from safetensors import safe_open

    indices, values = torch.tensor([3, 1]), torch.tensor([0.5, -1.0])
    path = save_sparse_deltas(tmp_path / "d.safetensors", {"a.weight": (indices, values, (2, 3))})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["a.weight.indices", "a.weight.shape", "a.weight.values"]
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_sparse_deltas(tmp_path / "bad.safetensors")
