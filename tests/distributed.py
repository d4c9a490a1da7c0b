"""The one harness for distributed tests: run a function on N gloo ranks on this machine.

`run_on_ranks(fn, world_size, *args)` starts N fresh processes with the torchrun environment
variables set (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), so code under test initialises exactly as
it would under torchrun, and returns each rank's return value (rank order). A failure on any rank
raises with that rank's traceback.

The ranks are forked from one forkserver per test session that has already imported torch and its
distributed packages, so each rank skips the seconds-long import that a plain spawn pays; each
rank is still a new process (no state carries over between calls) and runs with the caller's
environment variables as they are at the call.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

# What every rank imports anyway, imported once in the forkserver instead of once per rank
# (the first nn.init on meta tensors imports torch._dynamo: 3-6 s in every rank otherwise).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.tensor", "tests.distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    """The forkserver context, with `PRELOAD` set before its server first starts."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, port: int, environ: dict[str, str], fn: Callable, args: tuple, queue) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's, not the forkserver's from when it started
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        result = fn(*args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, *args: Any, timeout_s: float = 600) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks; returns the per-rank results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, environ, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout_s)
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [results[r] for r in range(world_size)]
