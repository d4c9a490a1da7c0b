"""Learning-rate schedules as pure functions of the step: a registry of multipliers on the peak lr.

A schedule holds no state beyond its config, so resuming needs only the step counter, and the
checkpoint stays free of pickled objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SCHEDULES: dict[str, Callable[["ScheduleConfig", int, int], float]] = {}


def register_schedule(name: str):
    """Decorator that adds `fn(config, step, total_steps) -> multiplier` under `name`."""

    def wrap(fn):
        SCHEDULES[name] = fn
        return fn

    return wrap


@dataclass(kw_only=True)
class ScheduleConfig:
    """Warmup then a decay shape; the multiplier scales `optimizer.lr`."""

    name: str = "cosine"
    warmup_steps: int = 12
    min_lr_ratio: float = 0.1  # the final lr as a fraction of the peak
    decay_from: str = ""  # a checkpoint (step_N directory) of another run to start this one from

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"name: unknown schedule {self.name!r}; known: {', '.join(sorted(SCHEDULES))}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be 0 or positive, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.decay_from and not (Path(self.decay_from) / ".metadata").is_file():
            raise ValueError(f"decay_from: '{self.decay_from}' is not a checkpoint directory (no .metadata)")

    def lr_multiplier(self, step: int, total_steps: int) -> float:
        """The lr multiplier for optimizer step `step` (0-based) of `total_steps`."""
        return SCHEDULES[self.name](self, step, total_steps)


def _warmup(cfg: ScheduleConfig, step: int) -> float | None:
    """Linear warmup from lr/warmup to lr over `warmup_steps`; None once warmup is over."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return None


def _decay_progress(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Fraction of the post-warmup decay done at `step`: 0 right after warmup, 1 at the last step."""
    decay_steps = max(1, total_steps - cfg.warmup_steps - 1)
    return min(1.0, (step - cfg.warmup_steps) / decay_steps)


@register_schedule("constant")
def _constant(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    warm = _warmup(cfg, step)
    return 1.0 if warm is None else warm


@register_schedule("cosine")
def _cosine(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    # Half-cosine decay to min_lr_ratio after warmup (Loshchilov & Hutter, SGDR, 2017, eq. 5).
    warm = _warmup(cfg, step)
    if warm is not None:
        return warm
    progress = _decay_progress(cfg, step, total_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@register_schedule("linear")
def _linear(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    warm = _warmup(cfg, step)
    if warm is not None:
        return warm
    return 1 - (1 - cfg.min_lr_ratio) * _decay_progress(cfg, step, total_steps)


class Schedule:
    """A built schedule: the absolute learning rate for a step, from the config and the run length.

    The trainer asks `lr(step, tokens_seen)` before every optimizer step and saves `state_dict()`
    in checkpoints; schedules that depend only on the step keep no state of their own.
    """

    def __init__(self, cfg: ScheduleConfig, *, peak_lr: float, total_steps: int, tokens_per_step: int):
        self.cfg = cfg
        self.peak_lr = peak_lr
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step

    def lr(self, step: int, tokens_seen: int) -> float:
        """The learning rate of optimizer step `step` (0-based), after `tokens_seen` training tokens."""
        return self.peak_lr * self.cfg.lr_multiplier(step, self.total_steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_schedule(cfg: ScheduleConfig, *, peak_lr: float, total_steps: int, tokens_per_step: int) -> Schedule:
    """The schedule a run uses: `cfg` with the run's peak lr, length and tokens per step."""
    return Schedule(cfg, peak_lr=peak_lr, total_steps=total_steps, tokens_per_step=tokens_per_step)
