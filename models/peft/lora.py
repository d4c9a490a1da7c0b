"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

A targeted `nn.Linear` y = W x (+ b) becomes y = W x (+ b) + (alpha / r) B A dropout(x), with
A in R^{r x d_in} and B in R^{d_out x r}. A starts as nn.Linear's default (Kaiming-uniform with
a = sqrt(5)) and B at zero, so the adapted model starts equal to the base model (paper section 4.1;
the same init as Hugging Face `peft`, the test oracle). Every parameter outside the adapters is
frozen (unless listed in `trainable_modules`).

`LoRALinear` keeps the base layer's `weight` and `bias` under their own names and adds `lora_A` and
`lora_B` beside them, so a base checkpoint keeps its keys (`layers.0.attention.wq.weight`) and the
adapter is the set of keys ending in `.lora_A` / `.lora_B`.

Under FSDP2: apply LoRA to the unsharded model, then `fully_shard` (the trainer's model transforms
run before sharding). `merge_lora` / `unmerge_lora` also work on the sharded model: FSDP2 shards
`weight` (d_out x d_in) and `lora_B` (d_out x r) by the same rows, so each rank adds its rows of
B A using the gathered A only.

Later methods build on three pieces: `target_linears` (which layers a name pattern selects),
`freeze_except` (which parameters train) and `LoRALinear.delta_weight` (the dense update, which
LoRAM's recovery and exports read).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.peft.lora_config import LoraConfig
from models.peft.pretrained import fill_parameter_

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "apply_lora",
    "apply_lora_method",
    "freeze_except",
    "lora_modules",
    "lora_state_dict",
    "matches_any",
    "merge_and_unload",
    "merge_lora",
    "target_linears",
    "unmerge_lora",
]

LORA_PARAM_NAMES = ("lora_A", "lora_B")


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether dotted `name` equals, ends with "." + , or glob-matches one of `patterns`."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update; `weight` and `bias` are the base layer's own tensors.

    `merged` says whether B A is currently folded into `weight` (then the forward is the plain
    linear); `merge` / `unmerge` switch between the two exactly up to rounding.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base tensors are reused, not re-created
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **kwargs))
        self.merged = False
        if not base.weight.is_meta:
            self.reset_peft_parameters()

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """A: nn.Linear's default init (Kaiming-uniform, a = sqrt(5)); B: zeros (Hu et al., section 4.1).

        A is drawn whole from the global RNG, then each rank keeps its FSDP2 rows, so a sharded
        model seeded alike on every rank gets the same adapters as a single process.
        """
        full_a = torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
        fill_parameter_(self.lora_A, full_a)
        fill_parameter_(self.lora_B, torch.zeros(self.lora_B.shape, dtype=self.lora_B.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """W x + b, plus scaling * B A dropout(x) unless the update is merged."""
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """scaling * B A as a dense (d_out x d_in) fp32 tensor (this rank's rows under FSDP2)."""
        a, b = self.lora_A, self.lora_B
        if hasattr(a, "full_tensor"):
            if b.placements != self.weight.placements:
                raise ValueError(f"lora_B is placed {b.placements}, its weight {self.weight.placements}")
            a, b = a.full_tensor(), b.to_local()
        return (b.float() @ a.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling * B A into `weight` (no-op when already merged)."""
        if not self.merged:
            self._local_weight().add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take scaling * B A back out of `weight` (no-op when not merged)."""
        if self.merged:
            self._local_weight().sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def _local_weight(self) -> Tensor:
        return self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight

    def unload_peft(self) -> nn.Linear:
        """The plain layer with the adapter folded in (the export protocol of `models.peft`)."""
        return self.to_linear()

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding the merged weight (the adapter folded in)."""
        self.merge()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling}, merged={self.merged}"


def target_linears(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the `nn.Linear` modules of `model` selected by `patterns` (see `LoraConfig`)."""
    patterns = list(patterns)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and matches_any(name, patterns)
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze_except(model: nn.Module, patterns: Iterable[str]) -> int:
    """Set requires_grad on exactly the parameters whose name (or module name) matches; returns their count."""
    patterns = list(patterns)
    trainable = 0
    for name, param in model.named_parameters():
        keep = matches_any(name, patterns) or matches_any(name.rpartition(".")[0], patterns)
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
    return trainable


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the targeted linear layers of `model` in `LoRALinear` (in place) and freeze the rest.

    Apply it before `fully_shard`. Returns the adapted module names; a pattern list that selects
    no linear layer is a ValueError naming `target_modules`.
    """
    cfg.validate()
    names = target_linears(model, cfg.target_modules)
    if not names:
        raise ValueError(f"target_modules: {cfg.target_modules} select no linear layer of {type(model).__name__}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout))
    freeze_except(model, [*LORA_PARAM_NAMES, *cfg.trainable_modules])
    return names


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) for every `LoRALinear` in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (`...lora_A`, `...lora_B`) of `model.state_dict()`."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in LORA_PARAM_NAMES}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the forward then costs one matmul per layer)."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (to train the adapters further)."""
    for _, module in lora_modules(model):
        module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain `nn.Linear` layers back (for export); returns `model`."""
    for name, module in list(lora_modules(model)):
        _replace(model, name, module.to_linear())
    return model


def apply_lora_method(model: nn.Module, ctx) -> nn.Module:
    """Fine-tuning method "lora": adapters as `ctx.cfg.finetune.lora` configures (structure only).

    Safe on a meta-device model: the adapters are initialised later by `reset_peft_parameters`.
    """
    cfg = ctx.cfg.finetune.lora
    try:
        names = apply_lora(model, cfg)
    except ValueError as err:
        raise ValueError(f"finetune.lora.{err}") from None
    ctx.log(f"wren: LoRA rank {cfg.rank}, alpha {cfg.alpha:g} on {len(names)} linear layers")
    return model
