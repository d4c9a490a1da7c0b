"""`wren memory CONFIG [--world-size N] [overrides]`: per-rank memory of a recipe, without running it.

The model is built on the meta device and given fake (shape-only) CPU or CUDA storage, with the
recipe's model transforms (low-rank factors, ...). Nothing is allocated or computed, and:

* weights and gradients: float32 parameters as FSDP2 shards them (dim 0 in `torch.chunk` blocks;
  rank 0 holds the largest block), gradients likewise;
* optimizer state: per optimizer, from the shapes (`OPTIMIZER_STATE`: AdamW's two moments,
  GaLore's projector plus moments in the projected space, ...);
* activations: the tensors autograd saves for backward in one forward pass of one micro-batch,
  traced under `FakeTensorMode` (so the attention kernel the device would pick is the one traced),
  deduplicated by storage, parameters excluded. With activation checkpointing, each block keeps
  only its input, plus one block's saved tensors while it is recomputed;
* FSDP2 all-gather buffers (world size > 1): the root unit plus two blocks unsharded (the block in
  use and the one prefetched); an allowance, not traced.

These are the numbers the trainer logs as `memory/param_bytes` and `memory/optimizer_state_bytes`;
`tests/trainer/test_memory.py` checks each term against a real run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError


@dataclass
class MemoryEstimate:
    """Bytes held by rank 0 (the largest shards) of one training job."""

    world_size: int
    num_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    gather_buffers: int
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.gather_buffers

    def table(self) -> str:
        """A plain-text table, one row per term, in MiB."""
        rows = [
            ("weights (fp32 shards)", self.weights),
            ("gradients (fp32 shards)", self.grads),
            ("optimizer state", self.optimizer),
            ("activations (one micro-batch)", self.activations),
            ("FSDP2 all-gather buffers", self.gather_buffers),
            ("total", self.total),
        ]
        lines = [f"wren memory: {self.num_params / 1e6:.2f}M parameters, per rank at world size {self.world_size}"]
        lines += [f"  {name:<32} {value / 2**20:>12,.1f} MiB" for name, value in rows]
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def shard_rows(rows: int, world_size: int) -> int:
    """Rows of a dim-0 size `rows` that rank 0 holds under FSDP2 (torch.chunk blocks)."""
    return min(rows, math.ceil(rows / world_size))


def local_numel(shape: torch.Size, world_size: int) -> int:
    """Elements of a parameter of `shape` on rank 0 under FSDP2."""
    if not shape:
        return 1
    return shard_rows(shape[0], world_size) * math.prod(shape[1:])


# Optimizer state per parameter: fn(optimizer config, name, shape, world_size, itemsize) -> bytes on rank 0.
StateModel = Callable[[object, str, torch.Size, int, int], int]
STEP_BYTES = 4  # a float32 scalar step count (torch.optim.AdamW; ProjectedAdamW keeps step and age)


def _adamw_state(cfg, name: str, shape: torch.Size, world: int, itemsize: int) -> int:
    return 2 * local_numel(shape, world) * itemsize + STEP_BYTES


def _adamw8bit_state(cfg, name: str, shape: torch.Size, world: int, itemsize: int) -> int:
    from optim.adamw8bit import MIN_8BIT_SIZE, AdamW8bit
    from optim.blockwise_quant import BLOCK_SIZE

    if not AdamW8bit.quantizes(torch.empty(shape, device="meta"), MIN_8BIT_SIZE):
        return _adamw_state(cfg, name, shape, world, 4)  # float32 moments
    rows = shard_rows(shape[0], world)
    scales = rows * -(-shape[1] // BLOCK_SIZE) * 4  # one float32 absmax per block, per moment
    return 2 * (rows * shape[1] + scales) + STEP_BYTES  # uint8 codes, per moment


def _sgd_state(cfg, name: str, shape: torch.Size, world: int, itemsize: int) -> int:
    return local_numel(shape, world) * itemsize if cfg.beta1 > 0 else 0


def _projected_state(cfg, name: str, shape: torch.Size, world: int, itemsize: int) -> int:
    from optim.builder import PROJECTING, galore_targets
    from optim.projector import side_for

    counters = 2 * STEP_BYTES  # step and age
    projected = cfg.name in PROJECTING and galore_targets(cfg.galore.target_patterns)(
        name, torch.empty(shape, device="meta")
    )
    if not projected:
        return 2 * local_numel(shape, world) * itemsize + counters
    m, n = shape
    rank = min(cfg.galore.rank, m, n)
    if side_for(shape) == "right":  # P r x n replicated; moments m x r, rows sharded
        projector, moments = rank * n, shard_rows(m, world) * rank
    else:  # P m x r replicated; moments r x n, columns sharded
        projector, moments = m * rank, rank * shard_rows(n, world)
    fira = STEP_BYTES if cfg.name == "fira" else 0  # the limiter's previous residual norm
    return (projector + 2 * moments) * itemsize + counters + fira


OPTIMIZER_STATE: dict[str, StateModel] = {
    "adamw": _adamw_state,
    "adamw8bit": _adamw8bit_state,
    "sgd": _sgd_state,
    "galore": _projected_state,
    "fira": _projected_state,
    "lowrank": _projected_state,
}


def _fake_model(cfg, device: torch.device, fake_mode) -> nn.Module:
    """The recipe's model, transformed, with fake storage on `device` (nothing allocated)."""
    from models import get_model_spec
    from trainer.distributed import DistEnv
    from trainer.extensions import BuildContext, apply_model_transforms

    spec = get_model_spec(cfg.model.name)
    with torch.device("meta"):
        model = spec.model_cls(cfg.model.build_model_config(cfg.data.vocab_size))
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("meta"), mesh=None)
        model = apply_model_transforms(model, BuildContext(cfg=cfg, env=env, log=lambda *a, **k: None))
    with fake_mode:
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if param is not None:
                    fake = torch.empty(param.shape, dtype=param.dtype, device=device)
                    module._parameters[key] = nn.Parameter(fake, requires_grad=param.requires_grad)
            for key, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
    return model


def saved_activation_bytes(model: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> tuple[int, list[int]]:
    """(bytes autograd saves for backward in forward + loss, bytes saved inside each of `model.layers`).

    Tensors are counted once per storage; parameters and buffers are not activations. Works on real
    and on fake tensors alike.
    """
    excluded = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    per_block: list[int] = []
    current: list[int | None] = [None]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in excluded and key not in seen:
            seen[key] = storage.nbytes()
            if current[0] is not None:
                per_block[current[0]] += storage.nbytes()
        return tensor

    handles = []
    for index, block in enumerate(getattr(model, "layers", [])):
        per_block.append(0)
        handles.append(block.register_forward_pre_hook(lambda mod, args, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)))
    autocast = torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), per_block


def estimate_memory(cfg, world_size: int) -> MemoryEstimate:
    """Per-rank bytes of training `cfg` (a `JobConfig`) on `world_size` ranks, without running it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fake_mode = FakeTensorMode()
    model = _fake_model(cfg, device, fake_mode)
    params = list(model.named_parameters())
    num_params = sum(p.numel() for _, p in params)
    weights = sum(local_numel(p.shape, world_size) * p.element_size() for _, p in params)
    state_model = OPTIMIZER_STATE.get(cfg.optimizer.name, _adamw_state)
    note = (
        "" if cfg.optimizer.name in OPTIMIZER_STATE else f"no state model for {cfg.optimizer.name!r}; assumed AdamW's"
    )
    optimizer = sum(
        state_model(cfg.optimizer, n, p.shape, world_size, p.element_size()) for n, p in params if p.requires_grad
    )
    grads = sum(local_numel(p.shape, world_size) * p.element_size() for _, p in params if p.requires_grad)

    micro = cfg.training.micro_batch_size or cfg.training.local_batch_size(world_size)
    with fake_mode:
        tokens = torch.zeros(micro, cfg.training.seq_len + 1, dtype=torch.long, device=device)
        activations, per_block = saved_activation_bytes(model, tokens, getattr(torch, cfg.training.dtype))
    if cfg.training.activation_checkpointing and per_block:
        hidden = micro * cfg.training.seq_len * model.config.dim * 4  # each block's fp32 input
        activations = activations - sum(per_block) + len(per_block) * hidden + max(per_block)

    gather = 0
    if world_size > 1:
        blocks = list(getattr(model, "layers", []))
        block_bytes = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks), default=0)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() * p.element_size() for _, p in params if id(p) not in in_blocks)
        gather = root + 2 * block_bytes
    return MemoryEstimate(world_size, num_params, weights, grads, optimizer, activations, gather, note)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`wren memory CONFIG [--world-size N] [--section.key=value ...]`."""
    parser.add_argument("config", nargs="?", help="TOML recipe (default: built-in defaults)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks FSDP2 shards over (default 1)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the per-rank estimate of a recipe."""
    from trainer.config import JobConfig

    if args.world_size < 1:
        raise UserError(f"memory: --world-size must be at least 1, got {args.world_size}")
    bad = [arg for arg in extra if not arg.startswith("--")]
    if bad:
        raise UserError(f"memory: unexpected arguments {' '.join(bad)}")
    cfg = JobConfig.load(args.config, extra, world_size=args.world_size)
    print(estimate_memory(cfg, args.world_size).table())
    return 0
