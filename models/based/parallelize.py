"""Apply activation checkpointing and FSDP2 to a `Based` model, block by block.

The same recipe as `models.llama.parallelize`: composable non-reentrant checkpointing on every
`BasedBlock` (parameter names unchanged), then FSDP2 `fully_shard` on every block and on the
root (embedding, final norm and output projection).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from models.based.model import BasedBlock

__all__ = ["parallelize_based"]


def parallelize_based(
    model: nn.Module,
    mesh: DeviceMesh | None,
    *,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Checkpoint (if asked) and shard (if `mesh` is given) every `BasedBlock`, then the root; in place."""
    blocks = [m for m in model.modules() if isinstance(m, BasedBlock)]
    if activation_checkpointing:
        for block in blocks:
            checkpoint(block)
    if mesh is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
