"""Polling helpers for tests that interrupt real training processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from trainer.metrics import read_metrics


def last_logged_step(run_dir: Path) -> int:
    """The last step with a train loss in the run's metrics.jsonl (0 before the first)."""
    try:
        steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    except ValueError:  # a line being written right now
        return 0
    return steps[-1] if steps else 0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 300, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `condition` until it holds; fail naming `what` on timeout or when `alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not alive():
            raise AssertionError(f"the process ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)
