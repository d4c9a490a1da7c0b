"""Apply activation checkpointing and FSDP2 to a `Llama`, in this order:

1. activation checkpointing (non-reentrant) on every `TransformerBlock`;
2. FSDP2 `fully_shard` on every `TransformerBlock`, then on the root (embedding, final norm and
   output projection form the root's unit), with a `MixedPrecisionPolicy` when dtypes are given.

DESIGN.md puts tensor parallelism before step 1 and `torch.compile` between steps 1 and 2; neither
is applied here yet.

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

from models.llama.model import TransformerBlock

__all__ = ["apply_activation_checkpointing", "apply_fsdp", "parallelize_llama"]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each `TransformerBlock`'s activations in backward instead of storing them."""
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            checkpoint(block)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> None:
    """Shard every `TransformerBlock`, then the root, over `mesh` with FSDP2.

    Parameters are resharded after forward (FSDP2's default); `param_dtype` / `reduce_dtype`
    set the all-gather / gradient-reduction dtypes (None keeps the parameters' own dtype).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize_llama(
    model: nn.Module,
    mesh: DeviceMesh | None,
    *,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Apply activation checkpointing (if asked), then FSDP2 over `mesh` (None: no sharding).

    Works in place and returns `model`. Call it on the meta-device model before `to_empty` and
    `init_weights`, or on a materialised one.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if mesh is not None:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    return model
