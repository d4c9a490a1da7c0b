"""muP against the `mup` package: same init, forward and Adam updates; identity at the base width; FSDP2.

The reference model is the same Llama built the way the mup README prescribes: its readout is a
`mup.MuReadout` (or `MuSharedReadout` when tied), base shapes come from `mup.set_base_shapes`
with a base and a delta model, weights are drawn with `mup.init.normal_`, attention uses
sqrt(d_base) / d (the README's 8 / d), and the optimizer is `mup.MuAdamW`.
"""

import dataclasses
import math
import types

import mup
import pytest
import torch
import torch.nn.functional as F

from models.llama.model import Llama, LlamaConfig
from optim.builder import OptimizerConfig, build_optimizer
from optim.mup import MupConfig, apply_mup
from trainer.extensions import BuildContext

BASE_DIM = 32


def llama_config(dim: int, tied: bool) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=3 * dim, vocab_size=96,
                       max_seq_len=32, tie_embeddings=tied, init_std=0.05)


def wren_mup(dim: int, tied: bool, seed: int = 0, **mup_fields):
    torch.manual_seed(seed)
    model = Llama(llama_config(dim, tied))
    cfg = types.SimpleNamespace(mup=MupConfig(enabled=True, base_dim=BASE_DIM, **mup_fields))
    ctx = BuildContext(cfg=cfg, env=None, log=lambda *a: None)
    return apply_mup(model, ctx), ctx.lr_scales


def _reference_shell(dim: int, tied: bool) -> Llama:
    """A Llama whose readout is mup's MuReadout and whose attention uses sqrt(d_base) / d."""
    config = llama_config(dim, tied)
    config.attention_scale = math.sqrt(BASE_DIM / config.n_heads) / config.head_dim
    model = Llama(config)
    if tied:
        model.output = mup.MuSharedReadout(model.tok_embeddings.weight, bias=False)
        model.forward = types.MethodType(_tied_forward, model)
    else:
        model.output = mup.MuReadout(dim, config.vocab_size, bias=False)
    return model


def _tied_forward(self, tokens):
    h = self.tok_embeddings(tokens)
    for layer in self.layers:
        h = layer(h, self.rope_cos, self.rope_sin)
    return self.output(self.norm(h))


def reference_mup(dim: int, tied: bool, seed: int = 0) -> Llama:
    """The mup-package model, initialised with mup.init.normal_ in Llama.init_weights' order."""
    model = _reference_shell(dim, tied)
    mup.set_base_shapes(model, _reference_shell(BASE_DIM, tied), delta=_reference_shell(2 * BASE_DIM, tied))
    torch.manual_seed(seed)
    std = model.config.init_std
    out_std = std / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        mup.init.normal_(model.tok_embeddings.weight, std=std)
        for layer in model.layers:
            layer.attention_norm.weight.fill_(1.0)
            for linear in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                mup.init.normal_(linear.weight, std=std)
            mup.init.normal_(layer.attention.wo.weight, std=out_std)
            layer.ffn_norm.weight.fill_(1.0)
            mup.init.normal_(layer.feed_forward.w1.weight, std=std)
            mup.init.normal_(layer.feed_forward.w3.weight, std=std)
            mup.init.normal_(layer.feed_forward.w2.weight, std=out_std)
        model.norm.weight.fill_(1.0)
        if not tied:
            mup.init.normal_(model.output.weight, std=std)
    return model


def _step(model, optimizer, tokens):
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("width_mult", [2, 4])
def test_same_init_forward_and_adam_updates_as_the_mup_package(width_mult, tied):
    torch.set_num_threads(1)
    dim, lr = BASE_DIM * width_mult, 1e-2
    ours, lr_scales = wren_mup(dim, tied)
    ref = reference_mup(dim, tied)
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, ref_params[name], rtol=1e-6, atol=1e-8, msg=name)

    opt_cfg = OptimizerConfig(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8)
    ours_opt = build_optimizer(opt_cfg, ours, lr_scales)
    for group in ours_opt.param_groups:  # what the trainer does before every step
        group["lr"] = lr * group["lr_scale"]
    ref_opt = mup.MuAdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    # The groups agree: lr / width_mult for every matrix-like tensor, the base lr elsewhere.
    ref_lr = {id(p): g["lr"] for g in ref_opt.param_groups for p in g["params"]}
    for name in dict(ours.named_parameters()):
        assert lr * lr_scales.get(name, 1.0) == pytest.approx(ref_lr[id(ref_params[name])]), name
    assert any(scale == pytest.approx(1 / width_mult) for scale in lr_scales.values())

    initial = {name: param.detach().clone() for name, param in ours.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        tokens = torch.randint(0, 96, (4, 17), generator=generator)
        assert _step(ours, ours_opt, tokens) == pytest.approx(_step(ref, ref_opt, tokens), rel=1e-5)
    # Same updates. Float rounding differs (logits * 1/w vs MuReadout's x / w), and Adam's first
    # steps amplify it where a gradient entry is ~0, so compare each tensor's whole update.
    for name, param in ours.named_parameters():
        ours_update, ref_update = param - initial[name], ref_params[name] - initial[name]
        assert (ours_update - ref_update).norm() <= 1e-3 * ref_update.norm(), name


def test_at_the_base_width_mup_is_the_standard_parametrisation():
    ours, lr_scales = wren_mup(BASE_DIM, tied=False)
    torch.manual_seed(0)
    standard = Llama(llama_config(BASE_DIM, tied=False))
    assert lr_scales == {}
    for (name, a), (_, b) in zip(ours.named_parameters(), standard.named_parameters()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(ours(tokens), standard(tokens))


def test_attention_scale_is_the_readme_8_over_d_at_head_dim_64():
    config = LlamaConfig(dim=512, n_layers=1, n_heads=8, ffn_hidden_dim=1024, vocab_size=64, max_seq_len=8)
    with torch.device("meta"):
        model = Llama(config)
    cfg = types.SimpleNamespace(mup=MupConfig(enabled=True, base_dim=256))  # base head_dim 32 ... at width 512
    apply_mup(model, BuildContext(cfg=cfg, env=None, log=lambda *a: None))
    assert model.config.attention_scale == pytest.approx(math.sqrt(32) / 64)
    cfg64 = types.SimpleNamespace(mup=MupConfig(enabled=True, base_dim=512))
    with torch.device("meta"):
        model = Llama(dataclasses.replace(config))
    apply_mup(model, BuildContext(cfg=cfg64, env=None, log=lambda *a: None))
    assert model.config.attention_scale == pytest.approx(8 / 64)  # head_dim 64 at the base width
    assert all(layer.attention.scale == pytest.approx(8 / 64) for layer in model.layers)


def test_zero_init_options_and_their_errors():
    model, _ = wren_mup(2 * BASE_DIM, tied=False, zero_init_query=True, zero_init_readout=True)
    assert all(layer.attention.wq.weight.abs().sum() == 0 for layer in model.layers)
    assert model.output.weight.abs().sum() == 0
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="mup.zero_init_readout"):
        wren_mup(2 * BASE_DIM, tied=True, zero_init_readout=True)


@pytest.mark.parametrize("fields, key", [(dict(base_dim=0), "base_dim"), (dict(output_mult=0.0), "output_mult"),
                                         (dict(attention_mult=-1.0), "attention_mult")])
def test_bad_config_names_the_field(fields, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        MupConfig(**fields).validate()
