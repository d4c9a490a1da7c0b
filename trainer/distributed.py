"""Process-group and device-mesh setup from the launcher's environment (torchrun, srun, Ray)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ParallelConfig


@dataclass
class DistEnv:
    """Where this process sits: its rank, the world, its device and the FSDP mesh (None alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over all ranks (one collective); identity on a single process."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def world_size_from_env() -> int:
    """The world size the launcher announced, 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join the process group the launcher described, pick the device and build a 1-D FSDP mesh."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    mesh = None
    if world_size > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_shard",))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
