"""The parallelization recipe every model family shares, applied block by block, in this order:

1. activation checkpointing (composable, non-reentrant) on every block;
2. FSDP2 `fully_shard` on every block, then on the root (embedding, final norm and output
   projection form the root's unit), with a `MixedPrecisionPolicy` when dtypes are given.

DESIGN.md puts tensor parallelism before step 1 and `torch.compile` between steps 1 and 2; neither
is applied yet.

Checkpointing uses the composable `torch.distributed._composable.checkpoint`, which installs
forward hooks instead of wrapping the module. Unlike `checkpoint_wrapper` (which inserts
`_checkpoint_wrapped_module.` into every parameter name and strips it again only in
`state_dict()`), it leaves `named_parameters()`, `state_dict()` and DCP keys unchanged, so that
optimizer groups and muP multipliers chosen by parameter name see the same names with and without
checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["parallelize_blocks"]


def parallelize_blocks(
    model: nn.Module,
    mesh: DeviceMesh | None,
    block_type: type[nn.Module],
    *,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Checkpoint (if asked) every `block_type` module of `model`, then shard them and the root over `mesh`.

    `mesh` None means no sharding. Parameters are resharded after forward (FSDP2's default);
    `param_dtype` / `reduce_dtype` set the all-gather / gradient-reduction dtypes (None keeps the
    parameters' own). Works in place and returns `model`: call it on the meta-device model before
    `to_empty` and `init_weights`, or on a materialised one.
    """
    blocks = [module for module in model.modules() if isinstance(module, block_type)]
    if activation_checkpointing:
        for block in blocks:
            checkpoint(block)
    if mesh is not None:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
