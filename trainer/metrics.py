"""Metrics: a JSONL file, TensorBoard and a progress line on the console, written by rank 0.

Every step goes to JSONL and TensorBoard; the console gets one line every `log_every_steps`.
On resume, entries after the checkpoint's step are dropped so the files read like one run.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from trainer.config import MetricsConfig

METRICS_FILE = "metrics.jsonl"
# What the progress line shows, in order, and how.
CONSOLE_FIELDS = (
    ("train/loss", "loss {:.4f}"),
    ("eval/loss", "eval {:.4f}"),
    ("train/lr", "lr {:.2e}"),
    ("train/grad_norm", "gnorm {:.3f}"),
    ("perf/tokens_per_s", "{:,.0f} tok/s"),
    ("perf/mfu", "MFU {:.1%}"),
    ("perf/peak_memory_gib", "mem {:.2f} GiB"),
)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its FSDP2 shards; all parameters unsharded)."""
    return sum(_local_bytes(p) for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state tensors this rank holds (moments, projectors, ...), scalars included."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += _local_bytes(value)
    return total


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl, in order (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes step records to the configured sinks; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg: MetricsConfig, *, total_steps: int, enabled: bool, resume_step: int = 0):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = enabled
        self.start_time = time.perf_counter()
        self.start_step = resume_step
        self._jsonl: TextIO | None = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            path = run_dir / METRICS_FILE
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._jsonl = path.open("a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Record the metrics of `step` in JSONL and TensorBoard."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def console(self, step: int, record: dict[str, Any], out: TextIO = sys.stdout) -> None:
        """Print one progress line: bar, loss, lr, grad norm, throughput, MFU, memory, ETA."""
        if not self.enabled:
            return
        done = step / self.total_steps
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        elapsed = time.perf_counter() - self.start_time
        steps_here = max(1, step - self.start_step)
        eta_s = elapsed / steps_here * (self.total_steps - step)
        parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} [{bar}] {100 * done:3.0f}%"]
        for key, fmt in CONSOLE_FIELDS:
            if key in record:
                parts.append(fmt.format(record[key]))
        parts.append(f"eta {_duration(eta_s)}")
        print(" | ".join(parts), file=out, flush=True)

    def close(self) -> None:
        """Flush and close the sinks."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
