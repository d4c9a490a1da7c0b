"""Extension points of the training loop, so that methods plug in without editing the loop.

A method that changes the model before sharding (low-rank factors, muP multipliers, fine-tuning
adapters) is a *model transform*: `fn(model, ctx) -> model`, listed in `MODEL_TRANSFORMS` by dotted
path and imported only when a run starts. Each transform reads its own config section from
`ctx.cfg` and returns the model untouched when its method is off. Through `ctx` it can also

- give parameters an lr multiplier by name (`ctx.lr_scales`, applied to the scheduled lr),
- run code after every optimizer step (`ctx.step_hooks`, called as `hook(step)` with the 1-based
  step just taken),
- add Stateful parts to the checkpoint (`ctx.checkpoint_state`, name -> object with
  `state_dict` / `load_state_dict` holding tensors only),
- reach, from a step hook, the final (possibly FSDP2-sharded) model (`ctx.model`, set right after
  sharding) and the optimizer (`ctx.optimizer`, set right after it is built); both are None while
  transforms run.

Fine-tuning methods (`trainer.finetune.FINETUNE_METHODS`) receive the same context and run after
every transform listed here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# Applied in this order, before activation checkpointing and FSDP2.
MODEL_TRANSFORMS: tuple[str, ...] = (
    "optim.lowrank:apply_lowrank",
    "optim.mup:apply_mup",
)


@dataclass
class BuildContext:
    """What a model transform may read (the run's config, ranks, logger) and register."""

    cfg: Any  # trainer.config.JobConfig
    env: Any  # trainer.distributed.DistEnv
    log: Callable[..., None]
    lr_scales: dict[str, float] = field(default_factory=dict)
    step_hooks: list[Callable[[int], None]] = field(default_factory=list)
    checkpoint_state: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the final (sharded) model, set by the trainer after parallelize
    optimizer: Any = None  # torch.optim.Optimizer, set by the trainer right after it is built


def apply_model_transforms(model: nn.Module, ctx: BuildContext) -> nn.Module:
    """Run every registered transform on the unsharded model, in order."""
    for path in MODEL_TRANSFORMS:
        module_name, fn_name = path.split(":")
        model = getattr(importlib.import_module(module_name), fn_name)(model, ctx)
    return model
