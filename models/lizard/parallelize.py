"""Apply activation checkpointing and FSDP2 to a `Lizard`, in the order `models.llama.parallelize` uses:

1. activation checkpointing (composable, non-reentrant) on every `LizardBlock`;
2. FSDP2 `fully_shard` on every `LizardBlock`, then on the root (embedding, final norm, output).

Parameter names and DCP keys are the same with and without either step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.lizard.model import LizardBlock

__all__ = ["parallelize_lizard"]


def parallelize_lizard(
    model: nn.Module,
    mesh: DeviceMesh | None,
    *,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Activation checkpointing (if asked), then FSDP2 over `mesh` (None: no sharding); in place, returns `model`."""
    blocks = [m for m in model.modules() if isinstance(m, LizardBlock)]
    if activation_checkpointing:
        for block in blocks:
            checkpoint(block)
    if mesh is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
