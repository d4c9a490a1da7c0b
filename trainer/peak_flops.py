"""The machine's matmul peak, measured once per machine, dtype and thread count, then cached.

MFU divides model FLOPs by this number. A measured peak of dense matmuls is the honest
denominator on CPUs, whose datasheet peaks are far from what any kernel reaches.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

CACHE_PATH = Path(os.environ.get("WREN_CACHE_DIR", Path.home() / ".cache" / "wren")) / "peak_flops.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure_matmul_flops_per_s(dtype: torch.dtype, device: torch.device, *, size: int = 0, repeats: int = 8) -> float:
    """Best FLOP/s over `repeats` square matmuls of `dtype` on `device` with the current threads.

    The best, not the median: a peak is what the hardware can reach, and other load on the
    machine only ever slows a repeat down.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def peak_flops_per_s(
    dtype: torch.dtype, device: torch.device, cache_path: Path = CACHE_PATH, *, remeasure: bool = False
) -> float:
    """The cached matmul peak for this machine, measuring and caching it on first use.

    With `remeasure`, measure again and keep the larger of the two: a peak measured while other
    work loaded the machine is too low (MFU above 100% gives it away), and never too high.
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = f"{platform.node()}|{_device_name(device)}|{dtype}|threads={threads}"
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    cached = cache.get(key) if isinstance(cache.get(key), (int, float)) else None
    if cached is None or remeasure:
        cache[key] = max(measure_matmul_flops_per_s(dtype, device), cached or 0.0)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_path)
    return float(cache[key])
