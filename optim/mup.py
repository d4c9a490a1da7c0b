"""muP (Maximal Update Parametrisation; Yang et al. 2022, Tensor Programs V, arXiv 2203.03466).

`apply_mup` is a model transform (trainer.extensions): it runs on the unsharded model after its
seeded init and before FSDP2, and works from parameter *names and shapes* only, so nothing it
decides depends on attributes attached to parameters (which FSDP2 replaces with DTensors):

1. infinite ("width") dimensions are found as `mup.set_base_shapes` finds them: by comparing
   every parameter's shape in a base model (width `base_dim`) and a delta model (twice as
   wide), both built on the meta device; the width multiplier of a tensor is that of its last
   infinite dimension (the fan-in of a matrix), `w = dim / base_dim`;
2. matrix-like tensors (two infinite dims: the attention and MLP weights) are re-initialised
   with std / sqrt(w) (as `mup.init.normal_` does) and get Adam lr / w (`mup.MuAdam`), through
   `ctx.lr_scales` by name; vector-like tensors (embedding, readout, norm gains) keep their
   std and lr;
3. the readout is multiplied by `output_mult / w` (`mup.MuReadout`), the embedding output by
   `input_mult`, and attention logits use `attention_mult / head_dim` instead of
   `1 / sqrt(head_dim)` (the mup README's `8 / d`; by default `attention_mult = sqrt(base head
   dim)`, so that muP at the base width is exactly the standard parametrisation).

wren's standard init draws every weight from N(0, init_std) whatever the width, which is
already muP's rule for vector-like tensors (`MuReadout`'s sqrt(w) rescaling converts a
fan-in-scaled init into that), so only the hidden matrices are rescaled.

Weight decay is decoupled from width: a hidden matrix decays by (lr / w) * weight_decay per
step. `mup.MuAdamW` instead multiplies those groups' weight decay by w (keeping lr * wd fixed);
with weight_decay = 0 the two give identical updates (tests/optim/test_mup.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from optim.mup_config import MupConfig
from trainer.errors import ConfigError

READOUT = "output.weight"  # Llama-family names (models/llama/model.py)
EMBEDDING = "tok_embeddings.weight"
QUERY_SUFFIX = "attention.wq.weight"
MODEL_HOOKS = ("dim", "ffn_hidden_dim", "n_heads", "attention_scale", "embedding_scale", "logit_scale")


@dataclass(frozen=True)
class TensorRule:
    """How muP treats one parameter: its infinite dims, width multiplier, init and lr scales."""

    ninf: int  # number of infinite (width) dimensions
    width_mult: float  # multiplier of its last infinite dimension (1 when there is none)

    @property
    def matrix_like(self) -> bool:
        return self.ninf == 2

    @property
    def init_scale(self) -> float:
        """Factor on the standard init std (mup.init.normal_: 1/sqrt(w) for matrix-like tensors)."""
        return self.width_mult**-0.5 if self.matrix_like else 1.0

    @property
    def lr_scale(self) -> float:
        """Factor on the Adam lr (mup.MuAdam: 1/w for matrix-like tensors)."""
        return 1.0 / self.width_mult if self.matrix_like else 1.0


def base_ffn_hidden_dim(cfg: MupConfig, model_config) -> int:
    """The MLP width of the base model: configured, or scaled with dim from the model's."""
    if cfg.base_ffn_hidden_dim:
        return cfg.base_ffn_hidden_dim
    scaled = model_config.ffn_hidden_dim * cfg.base_dim / model_config.dim
    if scaled != int(scaled):
        raise ConfigError(
            f"mup.base_ffn_hidden_dim: ffn_hidden_dim {model_config.ffn_hidden_dim} x base_dim {cfg.base_dim} / dim "
            f"{model_config.dim} is not an integer; set mup.base_ffn_hidden_dim"
        )
    return int(scaled)


def _shapes_at(model: nn.Module, dim: int, ffn: int) -> dict[str, torch.Size]:
    """Parameter shapes of `model`'s architecture at width `dim` (MLP width `ffn`), built on meta."""
    config = dataclasses.replace(model.config, dim=dim, ffn_hidden_dim=ffn)
    try:
        with torch.device("meta"):
            other = type(model)(config)
    except ValueError as err:
        raise ConfigError(f"mup.base_dim: the model at width {dim} is invalid: {err}") from None
    return {name: p.shape for name, p in other.named_parameters()}


def tensor_rules(model: nn.Module, cfg: MupConfig) -> dict[str, TensorRule]:
    """Each parameter's muP rule, from its shape against the base and delta models (by name)."""
    base_ffn = base_ffn_hidden_dim(cfg, model.config)
    base = _shapes_at(model, cfg.base_dim, base_ffn)
    delta = _shapes_at(model, 2 * cfg.base_dim, 2 * base_ffn)
    rules = {}
    for name, param in model.named_parameters():
        inf_dims = [i for i, (b, d) in enumerate(zip(base[name], delta[name])) if b != d]
        if len(inf_dims) > 2:
            raise ConfigError(f"mup: parameter {name} has {len(inf_dims)} width dimensions; muP handles at most 2")
        mult = param.shape[inf_dims[-1]] / base[name][inf_dims[-1]] if inf_dims else 1.0
        rules[name] = TensorRule(ninf=len(inf_dims), width_mult=mult)
    return rules


def attention_scale(cfg: MupConfig, model_config) -> float:
    """The muP softmax scale attention_mult / head_dim (default sqrt(base head_dim) / head_dim)."""
    base_head_dim = cfg.base_dim / model_config.n_heads
    mult = cfg.attention_mult or math.sqrt(base_head_dim)
    return mult / model_config.head_dim


@torch.no_grad()
def apply_mup(model: nn.Module, ctx) -> nn.Module:
    """Apply muP's multipliers, init and per-tensor Adam lr scales; unchanged while muP is off."""
    cfg: MupConfig = ctx.cfg.mup
    if not cfg.enabled:
        return model
    config = getattr(model, "config", None)
    missing = [hook for hook in MODEL_HOOKS if not hasattr(config, hook)]
    if missing:
        raise ConfigError(f"mup.enabled: model {type(model).__name__} lacks the muP hooks {', '.join(missing)}")
    rules = tensor_rules(model, cfg)
    params = dict(model.named_parameters())
    if cfg.zero_init_readout and READOUT not in params:
        raise ConfigError("mup.zero_init_readout: the model ties its readout to the embedding; untie it or turn this off")
    for name, param in params.items():
        rule = rules[name]
        if rule.init_scale != 1.0:
            param.mul_(rule.init_scale)
        if rule.lr_scale != 1.0:
            ctx.lr_scales[name] = rule.lr_scale
        if (cfg.zero_init_query and name.endswith(QUERY_SUFFIX)) or (cfg.zero_init_readout and name == READOUT):
            param.zero_()
    readout_mult = rules[READOUT if READOUT in rules else EMBEDDING].width_mult
    config.logit_scale = cfg.output_mult / readout_mult
    config.embedding_scale = cfg.input_mult
    config.attention_scale = attention_scale(cfg, config)
    for module in model.modules():  # attention modules read their scale when built
        if module is not model and hasattr(module, "scale") and hasattr(module, "head_dim"):
            module.scale = config.attention_scale
    matrices = sum(rule.matrix_like for rule in rules.values())
    ctx.log(
        f"wren: muP: width {config.dim} = {readout_mult:g} x base {cfg.base_dim}; {matrices} hidden matrices at "
        f"lr / {readout_mult:g}, init std / {math.sqrt(readout_mult):.3g}; logits x {config.logit_scale:.4g}, "
        f"attention scale {config.attention_scale:.4g}"
    )
    return model
