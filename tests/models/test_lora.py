"""LoRA against Hugging Face `peft` (the oracle) on the same base weights: outputs, gradients, merges."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.llama import Llama, LlamaConfig
from models.peft import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128, max_seq_len=32)
TARGETS = ["wq", "wv", "w2"]


def _pair(dropout: float = 0.0, rank: int = 4, alpha: float = 8.0):
    """A wren-LoRA model and a peft-LoRA model on identical base weights and identical adapters."""
    torch.manual_seed(0)
    base = Llama(CFG)
    ours = copy.deepcopy(base)
    apply_lora(ours, LoraConfig(rank=rank, alpha=alpha, dropout=dropout, target_modules=TARGETS))
    with torch.no_grad():  # a non-zero B, so the adapter changes outputs and A gets gradients
        for module in ours.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.05)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS), copy.deepcopy(base)
    )
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                other = theirs.get_submodule(name)
                other.lora_A["default"].weight.copy_(module.lora_A)
                other.lora_B["default"].weight.copy_(module.lora_B)
    return ours, theirs


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_outputs_and_gradients_match_peft(dropout):
    ours, theirs = _pair(dropout=dropout)
    tokens = torch.randint(0, CFG.vocab_size, (3, 17))
    torch.manual_seed(1)  # same dropout masks: both draw one mask per adapted layer, in layer order
    loss = _loss(ours, tokens)
    torch.manual_seed(1)
    ref = _loss(theirs, tokens)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    loss.backward()
    ref.backward()
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            other = theirs.get_submodule(name)
            torch.testing.assert_close(module.lora_A.grad, other.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(module.lora_B.grad, other.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == CFG.n_layers * len(TARGETS)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in ours.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


def test_merge_unmerge_and_unload_match_peft_merge():
    ours, theirs = _pair()
    ours.eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        adapted = ours(tokens)
        base_weight = ours.layers[0].attention.wq.weight.clone()
        merge_lora(ours)
        assert ours.layers[0].attention.wq.merged
        torch.testing.assert_close(ours(tokens), adapted, rtol=1e-5, atol=1e-5)
        unmerge_lora(ours)
        torch.testing.assert_close(ours.layers[0].attention.wq.weight, base_weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(tokens), adapted, rtol=1e-6, atol=1e-6)

        merge_and_unload(ours)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        assert type(ours.layers[1].feed_forward.w2) is nn.Linear
        for name, module in theirs.named_modules():
            if isinstance(module, peft.tuners.lora.Linear):
                module.merge()
                torch.testing.assert_close(
                    ours.get_submodule(name).weight, module.base_layer.weight, rtol=1e-6, atol=1e-7
                )
        torch.testing.assert_close(ours(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_new_adapter_leaves_the_model_unchanged_and_keeps_base_keys():
    torch.manual_seed(0)
    base = Llama(CFG)
    model = copy.deepcopy(base)
    names = apply_lora(model, LoraConfig(rank=2, target_modules=["layers.0.*"], trainable_modules=["norm"]))
    assert names == [f"layers.0.{m}" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                               "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    torch.testing.assert_close(model(tokens), base(tokens), rtol=0, atol=0)
    assert set(base.state_dict()) <= set(model.state_dict())
    adapter = lora_state_dict(model)
    assert set(adapter) == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    assert adapter["layers.0.attention.wq.lora_A"].shape == (2, CFG.dim)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter) | {"norm.weight"}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^rank:"):
        LoraConfig(rank=0).validate()
    with pytest.raises(ValueError, match="^dropout:"):
        LoraConfig(dropout=1.0).validate()
    with pytest.raises(ValueError, match="^target_modules:"):
        apply_lora(Llama(CFG), LoraConfig(target_modules=["q_proj"]))
