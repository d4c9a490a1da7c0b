"""LT-SFT: lottery-ticket sparse fine-tuning with composable deltas (Ansell et al., ACL 2022).

cambridgeltl/composable-sft (src/sft/lt_sft.py, n_ft_iterations = 1):
1. full phase: fine-tune every targeted weight for `full_finetune_steps`;
2. mask: keep the K entries with the largest |theta_1 - theta_0| (one global threshold over all
   targeted weights);
3. rewind: theta <- theta_0, fresh optimizer state;
4. sparse phase: train again with the gradients of unmasked entries zeroed;
5. the fine-tuning is the sparse vector phi = theta_2 - theta_0, which composes with others by addition.

wren keeps theta = W + D with W frozen and D a dense trainable delta (zero-initialised) on each
targeted `nn.Linear`, so theta - theta_0 is D itself: no copy of theta_0 is kept, the rewind is
D <- 0 and the mask is top-K |D|. In the sparse phase the layer's backward multiplies the dense
gradient by the mask; masked entries of D stay exactly 0 (zero gradient and zero moments, and
decoupled weight decay of 0 is 0), and weight decay pulls the active entries toward theta_0.

Like SpIEL's layer, the forward keeps no dense copy between forward and backward: it saves x, W
and D and rebuilds W + D in backward. At the last step the deltas are written to
`<run_dir>/sparse_delta.safetensors` (`models.peft.sparse_delta.save_sparse_deltas`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.peft.lora import freeze_except, target_linears
from models.peft.sparse_config import LtSftConfig, SparseTargetConfig
from models.peft.sparse_delta import (
    DELTA_FILE,
    DeltaFileWriter,
    SparseDelta,
    full_tensor,
    local_shard,
)

__all__ = ["LtSftLinear", "LtSftSchedule", "apply_lt_sft", "lottery_ticket_masks", "lt_sft_deltas", "lt_sft_modules", "num_tunable"]

class _DenseDeltaLinearFn(torch.autograd.Function):
    """y = x (W + D)^T + b; dD = (dy^T x) * mask (the mask only in the sparse phase)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, mask):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, delta, mask)
        return F.linear(x, weight.to(x.dtype) + delta.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, mask = ctx.saved_tensors
        dx = dy @ (weight.to(dy.dtype) + delta.to(dy.dtype))
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        ddelta = (dy2.t() @ x2).to(delta.dtype)
        if mask.numel():
            ddelta = ddelta * mask
        return dx, None, dy2.sum(0) if ctx.has_bias else None, ddelta, None


class LtSftLinear(nn.Linear):
    """An `nn.Linear` with frozen `weight` plus a dense trainable `delta`, maskable after the full phase.

    Buffers: `mask` (bool, W's shape, all True until the lottery ticket is drawn) and `masked`
    (scalar bool: whether the sparse phase has begun); both are in the model's state dict, so a
    resumed run continues in the right phase.
    """

    def __init__(self, base: nn.Linear, *, dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base tensors are reused, not re-created
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.delta = nn.Parameter(torch.zeros(base.weight.shape, dtype=dtype, device=device))
        self.register_buffer("mask", torch.ones(base.weight.shape, dtype=torch.bool, device=device))
        self.register_buffer("masked", torch.zeros((), dtype=torch.bool, device=device))
        if device.type != "meta":
            self.reset_peft_parameters()

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """D = 0 (the model starts at the pretrained weights), no mask yet."""
        nn.init.zeros_(self.delta)
        self.mask.fill_(True)
        self.masked.fill_(False)

    def forward(self, x: Tensor) -> Tensor:
        """x (W + D)^T + b, in the autocast dtype when autocast is on."""
        mask = self.mask.to(self.delta.dtype) if bool(self.masked) else self.mask.new_empty(0, dtype=self.delta.dtype)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
            bias = None if self.bias is None else self.bias.to(x.dtype)
            with torch.autocast(x.device.type, enabled=False):
                return _DenseDeltaLinearFn.apply(x, self.weight, bias, self.delta, mask)
        return _DenseDeltaLinearFn.apply(x, self.weight, self.bias, self.delta, mask)

    def unload_peft(self) -> nn.Linear:
        """A plain `nn.Linear` holding W + D (unsharded model)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            merged = (self.weight.double() + self.delta.double()).to(self.weight.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        linear.bias = self.bias
        return linear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lt_sft_modules(model: nn.Module) -> list[tuple[str, LtSftLinear]]:
    """(name, module) of every `LtSftLinear`, names without activation-checkpoint wrappers."""
    return [
        (name.replace("_checkpoint_wrapped_module.", ""), module)
        for name, module in model.named_modules()
        if isinstance(module, LtSftLinear)
    ]


def num_tunable(model: nn.Module, modules: list[nn.Linear], cfg: SparseTargetConfig) -> int:
    """K: rank x sum (d_in + d_out) when LoRA-matched, else int(all parameters x density)."""
    if cfg.match_lora_rank:
        return cfg.match_lora_rank * sum(m.in_features + m.out_features for m in modules)
    return int(sum(p.numel() for p in model.parameters()) * cfg.density)


@torch.no_grad()
def lottery_ticket_masks(deltas: list[Tensor], k: int) -> list[Tensor]:
    """Boolean masks of the k entries with the largest |delta| over all `deltas` (one global threshold).

    Computed on full tensors (identical on every rank) one weight at a time, keeping only the
    running top k, so the transient memory is k plus the largest weight.
    """
    best_values = torch.empty(0)
    best_ids = torch.empty(0, dtype=torch.int64)
    offsets = [0]
    for delta in deltas:
        values = full_tensor(delta).detach().abs().flatten().float().cpu()
        candidates = torch.cat([best_values, values])
        ids = torch.cat([best_ids, torch.arange(offsets[-1], offsets[-1] + values.numel())])
        top = torch.topk(candidates, min(k, candidates.numel()))
        best_values, best_ids = top.values, ids[top.indices]
        offsets.append(offsets[-1] + values.numel())
    masks = []
    for delta, start, end in zip(deltas, offsets[:-1], offsets[1:]):
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        chosen = best_ids[(best_ids >= start) & (best_ids < end)] - start
        mask[chosen] = True
        masks.append(mask.view(delta.shape))
    return masks


def lt_sft_deltas(model: nn.Module) -> dict[str, SparseDelta]:
    """{weight name: (indices, values, shape)} of the masked deltas (full tensors, on CPU)."""
    out = {}
    for name, module in lt_sft_modules(model):
        delta = full_tensor(module.delta).detach().float().cpu().flatten()
        indices = module.mask.cpu().flatten().nonzero().flatten()
        out[f"{name}.weight"] = (indices, delta[indices], tuple(module.weight.shape))
    return out


class LtSftSchedule:
    """Step hook: draws the lottery ticket and rewinds after the full phase.

    `ctx` supplies the optimizer whose state of the deltas is reset at the rewind (`ctx.optimizer`).
    """

    def __init__(self, model: nn.Module, cfg: LtSftConfig, *, k: int, ctx: Any = None) -> None:
        self.cfg, self.k, self.ctx, self.model = cfg, k, ctx, model

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """After optimizer step `step`: draw the ticket and rewind at `full_finetune_steps`."""
        if step == self.cfg.full_finetune_steps:
            self.rewind()

    @torch.no_grad()
    def rewind(self) -> None:
        """Mask = top-K |D|, then D <- 0 and the deltas' optimizer state zeroed (a fresh optimizer)."""
        modules = [module for _, module in lt_sft_modules(self.model)]
        masks = lottery_ticket_masks([m.delta for m in modules], self.k)
        optimizer = getattr(self.ctx, "optimizer", None)
        for module, mask in zip(modules, masks):
            module.mask.copy_(mask.to(module.mask.device))
            module.masked.fill_(True)
            module.delta.zero_()
            state = optimizer.state.get(module.delta, {}) if optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value):
                    local_shard(value)[0].zero_()


def apply_lt_sft(model: nn.Module, ctx: Any) -> nn.Module:
    """Fine-tuning method "lt_sft": dense deltas on the targets, masked after `full_finetune_steps`.

    Reads `ctx.cfg.finetune.lt_sft`; structure only (safe on a meta-device model); registers the
    phase switch as a step hook.
    """
    cfg: LtSftConfig = ctx.cfg.finetune.lt_sft
    cfg.validate()
    if cfg.full_finetune_steps >= ctx.cfg.training.steps:
        raise ValueError(
            f"full_finetune_steps: must be smaller than training.steps ({ctx.cfg.training.steps}), got {cfg.full_finetune_steps}"
        )
    names = target_linears(model, cfg.target_modules)
    if not names:
        raise ValueError(f"target_modules: {cfg.target_modules} select no linear layer of {type(model).__name__}")
    k = num_tunable(model, [model.get_submodule(n) for n in names], cfg)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    if not 0 < k <= total:
        raise ValueError(f"density: gives {k} tunable entries; the targets hold {total}")
    for name in names:
        _replace(model, name, LtSftLinear(model.get_submodule(name), dtype=getattr(torch, cfg.delta_dtype)))
    freeze_except(model, ["delta", *cfg.trainable_modules])
    ctx.step_hooks.append(LtSftSchedule(model, cfg, k=k, ctx=ctx))
    ctx.step_hooks.append(DeltaFileWriter(lambda: lt_sft_deltas(model), ctx=ctx, method="lt_sft"))
    ctx.log(
        f"wren: LT-SFT on {len(names)} weights: full fine-tune for {cfg.full_finetune_steps} steps, then "
        f"retrain the top {k} entries ({k / total:.2%} of the targets); deltas to {DELTA_FILE}"
    )
    return model
