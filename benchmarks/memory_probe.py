"""Memory probes shared by the benchmarks: RSS of this process and the peak bytes of live tensors.

CPU has no allocator high-water mark like CUDA's, and RSS adds the interpreter, the libraries and
allocator caching; `LiveTensorPeak` counts what a device allocator would hold: every tensor
storage alive at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorPeak", "measure_in_subprocess", "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "tracked_step"]


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """This process's peak resident set size since the last `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages while active, counting from the storages given at entry.

    Every storage an op returns is counted once, until it is freed (a weakref callback); the
    existing ones (weights, gradients, optimizer state) are counted from the start. This is what a
    device allocator's high-water mark would show, without allocator caching, the interpreter or
    the data that RSS holds; it sees activation checkpointing's recomputation and micro-batches.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        for tensor in existing:
            self._count(tensor.untyped_storage(), track=False)
        self.live = sum(self.sizes.values())
        self.peak = self.live

    def _count(self, storage, track: bool = True) -> None:
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        if track:
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
            self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._count(value.untyped_storage())
        return out


def tracked_step(trainer) -> int:
    """One `train_step` of a wren `Trainer` under `LiveTensorPeak`; the step's peak bytes of live tensors."""
    existing = [*trainer.model.parameters(), *trainer.model.buffers()]
    existing += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    existing += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    with LiveTensorPeak(existing) as tracker:
        trainer.train_step(trainer.loader.next_batch())
    return tracker.peak


def measure_in_subprocess(cmd: list[str], cwd) -> dict:
    """Run one measurement in a fresh process (its own peak RSS) and return the JSON row it prints last.

    On failure, print the end of its output and exit with its code.
    """
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.strip().splitlines()[-1])
