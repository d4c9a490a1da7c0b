"""LT-SFT (Ansell et al. 2022): the mask is the top-K |theta_1 - theta_0| of a plain full fine-tune
(the oracle), the rewind restores the base model, the sparse phase moves only masked entries, and
the saved sparse file applied to the base equals the fine-tuned weights."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig
from models.peft.lt_sft import LtSftLinear, apply_lt_sft, lt_sft_modules
from models.peft.sparse_config import LtSftConfig
from models.peft.sparse_delta import DELTA_FILE, add_sparse_deltas, load_sparse_deltas

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=16)
FULL, STEPS, LR = 3, 6, 1e-2
TARGETS = ["wq", "wv", "w2"]


def _ctx(tmp_path, cfg):
    return SimpleNamespace(
        cfg=SimpleNamespace(finetune=SimpleNamespace(lt_sft=cfg), training=SimpleNamespace(steps=STEPS), run=SimpleNamespace(run_dir=tmp_path)),
        env=SimpleNamespace(is_main=True),
        log=lambda *a, **k: None,
        step_hooks=[],
        checkpoint_state={},
        optimizer=None,
    )


def _loss(model, step):
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(50 + step))
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _full_finetune_oracle(base: Llama, names: list[str]) -> dict[str, torch.Tensor]:
    """theta_1 - theta_0 of a plain model whose targeted weights train with the same AdamW."""
    model = copy.deepcopy(base)
    for name, param in model.named_parameters():
        param.requires_grad_(name.removesuffix(".weight") in names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    for step in range(FULL):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: (model.get_submodule(n).weight - base.get_submodule(n).weight).detach() for n in names}


def test_lt_sft_mask_rewind_sparse_phase_and_saved_delta(tmp_path):
    torch.manual_seed(0)
    base = Llama(CFG)
    model = copy.deepcopy(base)
    cfg = LtSftConfig(density=0.01, target_modules=TARGETS, full_finetune_steps=FULL)
    ctx = _ctx(tmp_path, cfg)
    apply_lt_sft(model, ctx)
    modules = dict(lt_sft_modules(model))
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(f"{n}.delta" for n in modules)
    k = int(sum(p.numel() for p in base.parameters()) * 0.01)
    ctx.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    oracle = _full_finetune_oracle(base, list(modules))
    probe = torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(7))
    for step in range(STEPS):
        _loss(model, step).backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad()
        if step + 1 == FULL:
            for name, module in modules.items():
                torch.testing.assert_close(module.delta.detach(), oracle[name], rtol=1e-4, atol=1e-6)
        for hook in ctx.step_hooks:
            hook(step + 1)
        if step + 1 == FULL:  # rewound: exactly the base model, fresh optimizer state
            with torch.no_grad():
                assert torch.equal(model(probe), base(probe))
            for module in modules.values():
                assert all(not v.any() for v in ctx.optimizer.state[module.delta].values() if v.ndim)

    everything = torch.cat([oracle[n].abs().flatten() for n in modules])
    threshold = everything.topk(k).values[-1]
    assert sum(int(m.mask.sum()) for m in modules.values()) == k
    for name, module in modules.items():
        assert torch.equal(module.mask, oracle[name].abs() >= threshold), name
        assert not module.delta[~module.mask].any()  # unmasked entries never moved in the sparse phase
        assert module.delta[module.mask].count_nonzero() > 0

    deltas = load_sparse_deltas(tmp_path / DELTA_FILE)
    assert sum(v.numel() for _, v, _ in deltas.values()) == k
    composed = {n: t.clone() for n, t in base.state_dict().items()}
    add_sparse_deltas(composed, deltas)
    for name, module in modules.items():
        assert torch.equal(composed[f"{name}.weight"], module.unload_peft().weight), name
    restored = Llama(CFG)
    restored.load_state_dict(composed)
    with torch.no_grad():
        torch.testing.assert_close(restored(probe), model(probe), rtol=1e-5, atol=1e-5)


def test_lt_sft_config_errors(tmp_path):
    with pytest.raises(ValueError, match="^full_finetune_steps:"):
        apply_lt_sft(Llama(CFG), _ctx(tmp_path, LtSftConfig(full_finetune_steps=STEPS)))
    with pytest.raises(ValueError, match="^full_finetune_steps:"):
        LtSftConfig(full_finetune_steps=0).validate()


def test_meta_apply_then_reset():
    with torch.device("meta"):
        model = Llama(CFG)
    ctx = _ctx(None, LtSftConfig(target_modules=TARGETS, full_finetune_steps=FULL))
    apply_lt_sft(model, ctx)
    model.to_empty(device="cpu")
    for module in model.modules():
        if isinstance(module, LtSftLinear):
            module.reset_peft_parameters()
            assert not module.delta.any() and module.mask.all() and not module.masked


def test_autocast_forward_matches_low_precision_dense():
    torch.manual_seed(0)
    layer = LtSftLinear(torch.nn.Linear(16, 8, bias=True))
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, 16)
    dense = (layer.weight + layer.delta).detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.bfloat16() @ dense.t() + layer.bias.detach().bfloat16()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
