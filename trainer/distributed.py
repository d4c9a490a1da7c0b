"""Process-group and device-mesh setup from the launcher's environment (torchrun, srun, Ray)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ParallelConfig
from trainer.errors import UserError


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


@dataclass(frozen=True)
class LaunchEnv:
    """The rank layout a launcher announced through environment variables."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _slurm_tasks_on_this_node(value: str, fallback: int) -> int:
    """This node's task count from SLURM_STEP_TASKS_PER_NODE ("4", "4(x2)" or "4(x2),3")."""
    head = value.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else fallback


def launch_env() -> LaunchEnv:
    """Ranks from torchrun / Ray (RANK, WORLD_SIZE, ...) or, failing those, from a SLURM step.

    A step started by `srun` with one task per rank (launch/slurm.sbatch without torchrun) sets
    SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS; the batch script itself, which has no
    step task count, runs as a single process. MASTER_ADDR / MASTER_PORT must be set for a
    multi-task step (launch/slurm.sbatch exports them).
    """
    env = os.environ
    if "RANK" in env or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        world_size = int(env.get("WORLD_SIZE", "1"))
        return LaunchEnv(
            rank=int(env.get("RANK", "0")),
            world_size=world_size,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
        )
    world_size = int(env["SLURM_STEP_NUM_TASKS"])
    if world_size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise UserError(
            "parallel: a SLURM step with several tasks needs MASTER_ADDR and MASTER_PORT "
            "(launch/slurm.sbatch exports them; or use torchrun inside srun)"
        )
    return LaunchEnv(
        rank=int(env["SLURM_PROCID"]),
        world_size=world_size,
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_world_size=_slurm_tasks_on_this_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), world_size),
    )


def world_size_from_env() -> int:
    """The world size the launcher announced, 1 when run directly."""
    return launch_env().world_size


def _restart_scoped_store() -> dist.Store | None:
    """Under torchrun, the agent's store with keys scoped to this restart attempt; else None (env://).

    torchrun (`--standalone`, torch 2.13) keeps the same agent store across `--max-restarts`
    attempts, so restarted gloo ranks would read the previous attempt's addresses from it and fail
    to connect; a prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps the attempts apart.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"wren/attempt_{env['TORCHELASTIC_RESTART_COUNT']}", store)


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Join the process group the launcher described, pick the device and build a 1-D FSDP mesh.

    A process group that already exists (Ray Train initialises one before calling the training
    function) is joined as it is.
    """
    launch = launch_env()
    world_size, rank, local_rank, local_world = launch.world_size, launch.rank, launch.local_rank, launch.local_world_size
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
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, store=_restart_scoped_store())
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_shard",))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh)


def shutdown_distributed() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
