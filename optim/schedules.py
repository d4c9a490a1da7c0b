"""Learning-rate schedules: cosine, linear, constant, WSD and Power, as a registry of formulas.

Conventions shared by every schedule (they make the papers' formulas line up with the loop):

* `s` is the 1-based number of the optimizer step being taken (the trainer's 0-based `step` + 1)
  and `S` the run's total steps, so the first step has `s = 1` and the last `s = S`;
* `n` is the number of training tokens seen once this step's batch is consumed
  (`tokens_seen + tokens_per_step`) and `N = S * tokens_per_step`;
* warmup is linear, `s / W` of its target for `s <= W` (MiniCPM, Hu et al. 2024, arXiv 2404.06395,
  Eq. 1 for WSD), so the first step trains at `1/W` of the peak and step `W` at the peak;
* decays end exactly at step `S` (token `N`), at `min_lr_ratio` of where they started.

WSD and Power keep a little state (`ScheduleState`): the step and tokens reached and, for a run
branched from another run's stable-phase checkpoint (`schedule.decay_from`), the point where its
decay starts. Everything else is recomputed from the config, so a resumed run, mid-decay or not,
gets the same learning rates as an uninterrupted one, and a run still in its stable phase can be
lengthened by raising `training.steps` before it resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from trainer.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only to (de)serialise the state, so configs load without it
    import torch

# Decay shapes: fn(progress p in [0, 1], elapsed, cfg) -> multiplier, 1 at p = 0.
DECAY_SHAPES: dict[str, Callable[[float, float, "ScheduleConfig"], float]] = {}
# Schedules: fn(cfg, position, peak_lr) -> learning rate.
SCHEDULES: dict[str, Callable[["ScheduleConfig", "Position", float], float]] = {}
# Schedules with a decay phase that `decay_from` can branch, and which therefore keep state.
BRANCHING = ("wsd", "power")


def register_decay_shape(name: str):
    """Decorator that adds `fn(progress, elapsed, cfg) -> multiplier` as decay shape `name`."""

    def wrap(fn):
        DECAY_SHAPES[name] = fn
        return fn

    return wrap


def register_schedule(name: str):
    """Decorator that adds `fn(cfg, position, peak_lr) -> lr` as schedule `name`."""

    def wrap(fn):
        SCHEDULES[name] = fn
        return fn

    return wrap


@dataclass(kw_only=True)
class ScheduleConfig:
    """Warmup, then the named schedule; the result scales each parameter group's lr multiplier.

    Power-scheduler defaults a = 4.6, b = -0.51 are the fitted constants of Shen et al. 2024
    (arXiv 2408.13359) as used by levanter's `PowerLrSchedule` (whose docstring cites the paper);
    the peak `optimizer.lr` plays the paper's cap eta_max.
    """

    name: str = "cosine"  # cosine | linear | constant | wsd | power
    warmup_steps: int = 12
    min_lr_ratio: float = 0.1  # where decays end, as a fraction of where they start
    decay_from: str = ""  # a stable-phase checkpoint (step_N directory) of a wsd/power run to branch a decay from
    decay_fraction: float = 0.1  # wsd/power: the decay's share of the run (steps for wsd, tokens for power)
    decay_shape: str = "1-sqrt"  # wsd/power: linear | cosine | 1-sqrt | exponential | half-life
    decay_half_life_steps: int = 0  # decay_shape = half-life: steps per halving (MiniCPM: 5000)
    power_a: float = 4.6  # power: eta = min(peak, batch_sequences * a * tokens^b)
    power_b: float = -0.51

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"name: unknown schedule {self.name!r}; known: {', '.join(sorted(SCHEDULES))}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be 0 or positive, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape: unknown shape {self.decay_shape!r}; known: {', '.join(sorted(DECAY_SHAPES))}")
        if self.decay_shape == "half-life" and self.name in BRANCHING and self.decay_half_life_steps < 1:
            raise ValueError(f"decay_half_life_steps: decay_shape half-life needs a positive value, got {self.decay_half_life_steps}")
        if self.decay_shape == "half-life" and self.name == "power":
            raise ValueError("decay_shape: half-life counts steps; the power schedule decays over tokens")
        if not self.power_a > 0:
            raise ValueError(f"power_a: must be positive, got {self.power_a}")
        if not self.power_b < 0:
            raise ValueError(f"power_b: must be negative (the lr falls with tokens), got {self.power_b}")
        if self.decay_from:
            if self.name not in BRANCHING:
                raise ValueError(f"decay_from: only the {' and '.join(BRANCHING)} schedules branch a decay, got name = {self.name!r}")
            if not (Path(self.decay_from) / ".metadata").is_file():
                raise ValueError(f"decay_from: '{self.decay_from}' is not a checkpoint directory (no .metadata)")

    def lr_multiplier(self, step: int, total_steps: int) -> float:
        """The multiplier on the peak lr for 0-based optimizer step `step` of `total_steps`.

        Only for schedules of steps alone (not `power`, which needs the batch size and tokens).
        """
        if self.name == "power":
            raise ValueError("name: the power schedule depends on tokens and batch size; use build_schedule")
        return SCHEDULES[self.name](self, Position(step=step + 1, total_steps=total_steps), 1.0)


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where the run is: the step being taken (1-based) and tokens, and where its decay starts."""

    step: int
    total_steps: int
    tokens: int = 0  # tokens seen after this step's batch
    total_tokens: int = 0
    batch_sequences: float = 0.0  # sequences per optimizer step (the Power scheduler's beta)
    decay_start_step: int | None = None  # a branched decay's start; None: from decay_fraction
    decay_start_tokens: int | None = None


def _warmup(cfg: ScheduleConfig, pos: Position) -> float | None:
    """The linear warmup fraction s / W while s < W; None once warmup is over."""
    if pos.step < cfg.warmup_steps:
        return pos.step / cfg.warmup_steps
    return None


def _shaped(cfg: ScheduleConfig, progress: float, elapsed: float) -> float:
    """The decay shape at `progress`, clamped to [0, 1]."""
    progress = min(1.0, max(0.0, progress))
    return DECAY_SHAPES[cfg.decay_shape](progress, elapsed, cfg)


def _to_min(cfg: ScheduleConfig, f: float) -> float:
    """Map a shape f from 1..0 to 1..min_lr_ratio, as transformers' get_wsd_schedule does."""
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * f


@register_decay_shape("linear")
def _linear_shape(p: float, elapsed: float, cfg: ScheduleConfig) -> float:
    return _to_min(cfg, 1 - p)


@register_decay_shape("cosine")
def _cosine_shape(p: float, elapsed: float, cfg: ScheduleConfig) -> float:
    # Half-cosine (Loshchilov & Hutter, SGDR, 2017, Eq. 5).
    return _to_min(cfg, 0.5 * (1 + math.cos(math.pi * p)))


@register_decay_shape("1-sqrt")
def _one_minus_sqrt_shape(p: float, elapsed: float, cfg: ScheduleConfig) -> float:
    # The (1 - sqrt) cooldown of Hägele et al. 2024 (arXiv 2405.18392, Sec. 3), which beat a
    # linear cooldown in their WSD runs; transformers' get_wsd_schedule decay_type="1-sqrt".
    return _to_min(cfg, 1 - math.sqrt(p))


@register_decay_shape("exponential")
def _exponential_shape(p: float, elapsed: float, cfg: ScheduleConfig) -> float:
    # a * exp(-p) + b with a, b chosen so that it runs exactly from 1 to min_lr_ratio over the
    # window: IBM dolomite-engine's ExponentialScheduler (lm_engine/optimization/scheduler.py).
    e, m = math.e, cfg.min_lr_ratio
    return (1 - m) * e / (e - 1) * math.exp(-p) + (m * e - 1) / (e - 1)


@register_decay_shape("half-life")
def _half_life_shape(p: float, elapsed: float, cfg: ScheduleConfig) -> float:
    # MiniCPM's exponential decay f(s - T) = 0.5^((s - T) / T_half), T_half = 5000 steps in the
    # paper (Hu et al. 2024, arXiv 2404.06395, Sec. 4.1); min_lr_ratio does not apply.
    return 0.5 ** (elapsed / cfg.decay_half_life_steps)


@register_schedule("constant")
def _constant(cfg: ScheduleConfig, pos: Position, peak_lr: float) -> float:
    warm = _warmup(cfg, pos)
    return peak_lr * (1.0 if warm is None else warm)


def _decay_after_warmup(cfg: ScheduleConfig, pos: Position, peak_lr: float, shape: str) -> float:
    warm = _warmup(cfg, pos)
    if warm is not None:
        return peak_lr * warm
    span = pos.total_steps - cfg.warmup_steps
    progress = (pos.step - cfg.warmup_steps) / span if span > 0 else 1.0
    return peak_lr * DECAY_SHAPES[shape](min(1.0, max(0.0, progress)), pos.step - cfg.warmup_steps, cfg)


@register_schedule("cosine")
def _cosine(cfg: ScheduleConfig, pos: Position, peak_lr: float) -> float:
    """Warmup to the peak at step W, then a half-cosine to min_lr_ratio at step S."""
    return _decay_after_warmup(cfg, pos, peak_lr, "cosine")


@register_schedule("linear")
def _linear(cfg: ScheduleConfig, pos: Position, peak_lr: float) -> float:
    """Warmup to the peak at step W, then a straight line to min_lr_ratio at step S."""
    return _decay_after_warmup(cfg, pos, peak_lr, "linear")


def wsd_decay_start(cfg: ScheduleConfig, total_steps: int) -> int:
    """The last stable step T of a WSD run of `total_steps`: the decay takes `decay_fraction` of the run."""
    return max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))


@register_schedule("wsd")
def _wsd(cfg: ScheduleConfig, pos: Position, peak_lr: float) -> float:
    """Warmup-Stable-Decay (MiniCPM, Hu et al. 2024, arXiv 2404.06395, Eq. 1).

    s / W * eta for s < W; eta for W <= s <= T; f(s - T) * eta for T < s <= S, where
    T = S - round(decay_fraction * S) (or the branch point) and f is `decay_shape` over [T, S].
    """
    warm = _warmup(cfg, pos)
    if warm is not None:
        return peak_lr * warm
    start = pos.decay_start_step if pos.decay_start_step is not None else wsd_decay_start(cfg, pos.total_steps)
    if pos.step <= start:
        return peak_lr
    span = pos.total_steps - start
    return peak_lr * _shaped(cfg, (pos.step - start) / span, pos.step - start)


def power_lr(cfg: ScheduleConfig, tokens: float, batch_sequences: float, peak_lr: float) -> float:
    """The Power scheduler's stable lr, min(eta_max, beta * a * n^b), n in tokens, beta in sequences.

    Shen et al. 2024 (arXiv 2408.13359); the units (beta = batch size in sequences, n = tokens
    seen) are those of IBM dolomite-engine's PowerScheduler (`a` there = a * batch size,
    `c` = batch size * seq_len) and levanter's PowerLrSchedule.
    """
    return min(peak_lr, batch_sequences * cfg.power_a * tokens**cfg.power_b)


@register_schedule("power")
def _power(cfg: ScheduleConfig, pos: Position, peak_lr: float) -> float:
    """Power scheduler: warmup to eta_power(N_warm), the power law, then a final decay.

    eta(n) = n / N_warm * eta_power(N_warm) for n < N_warm (linear to the power-law value at
    the end of warmup, as dolomite-engine's PowerScheduler does); eta_power(n) until
    N - N_decay; then f(n) * eta_power(N - N_decay) with f the `decay_shape` over the last
    `decay_fraction` of the tokens (the paper's annealing phase; its shape is a config choice,
    exponential in IBM's own stack).
    """
    if pos.batch_sequences <= 0:
        raise ValueError("the power schedule needs the batch size in sequences (build_schedule(..., seq_len=...))")
    tokens_per_step = pos.total_tokens / pos.total_steps
    warm_tokens = cfg.warmup_steps * tokens_per_step
    if pos.tokens < warm_tokens:
        return pos.tokens / warm_tokens * power_lr(cfg, warm_tokens, pos.batch_sequences, peak_lr)
    if pos.decay_start_tokens is not None:
        start = pos.decay_start_tokens
    else:
        start = max(warm_tokens, pos.total_tokens - cfg.decay_fraction * pos.total_tokens)
    if pos.tokens <= start:
        return power_lr(cfg, pos.tokens, pos.batch_sequences, peak_lr)
    span = pos.total_tokens - start
    return power_lr(cfg, start, pos.batch_sequences, peak_lr) * _shaped(cfg, (pos.tokens - start) / span, pos.tokens - start)


class ScheduleState:
    """What a WSD or Power run checkpoints: progress and, for a branched decay, its start.

    `branched` is 1 once the run has started a decay from another run's checkpoint; the start
    is then fixed (`decay_start_step` / `decay_start_tokens`). A checkpoint with `branched` 0
    loaded by a run with `decay_from` set is the source: its step becomes this run's decay start.
    """

    KEYS = ("step", "tokens_seen", "decay_start_step", "decay_start_tokens", "branched")

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.decay_start_step = -1
        self.decay_start_tokens = -1
        self.branched = 0


class Schedule:
    """A built schedule: the absolute learning rate of each step of one run.

    The trainer asks `lr(step, tokens_seen)` before every optimizer step (0-based `step`,
    `tokens_seen` before this step's batch) and checkpoints `state_dict()` when it is not empty
    (WSD and Power); the state is a dict of int64 scalar tensors, as DCP saves them.
    """

    def __init__(self, cfg: ScheduleConfig, *, peak_lr: float, total_steps: int, tokens_per_step: int, seq_len: int = 0):
        self.cfg = cfg
        self.peak_lr = peak_lr
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.batch_sequences = tokens_per_step / seq_len if seq_len else 0.0
        self.state = ScheduleState()
        if cfg.name == "power" and not seq_len:
            raise ConfigError("schedule.name: power needs the sequence length (the batch size in sequences); "
                              "this trainer does not pass it to build_schedule")

    def lr(self, step: int, tokens_seen: int) -> float:
        """The learning rate of optimizer step `step` (0-based), after `tokens_seen` training tokens."""
        state = self.state
        pos = Position(
            step=step + 1,
            total_steps=self.total_steps,
            tokens=tokens_seen + self.tokens_per_step,
            total_tokens=self.total_steps * self.tokens_per_step,
            batch_sequences=self.batch_sequences,
            decay_start_step=state.decay_start_step if state.branched else None,
            decay_start_tokens=state.decay_start_tokens if state.branched else None,
        )
        state.step, state.tokens_seen = step + 1, tokens_seen + self.tokens_per_step
        return SCHEDULES[self.cfg.name](self.cfg, pos, self.peak_lr)

    def planned_decay_start(self) -> tuple[int, int]:
        """(step, tokens) after which this run's own decay begins, from the config."""
        if self.cfg.name == "wsd":
            step = wsd_decay_start(self.cfg, self.total_steps)
            return step, step * self.tokens_per_step
        total_tokens = self.total_steps * self.tokens_per_step
        tokens = max(self.cfg.warmup_steps * self.tokens_per_step, total_tokens - self.cfg.decay_fraction * total_tokens)
        return int(tokens // self.tokens_per_step), int(tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Empty for schedules of the step alone; the `ScheduleState` as int64 tensors for WSD and Power."""
        if self.cfg.name not in BRANCHING:
            return {}
        if not self.state.branched:
            self.state.decay_start_step, self.state.decay_start_tokens = self.planned_decay_start()
        import torch

        return {key: torch.tensor(int(getattr(self.state, key)), dtype=torch.int64) for key in ScheduleState.KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume, or, when `decay_from` is set and `state` is the source run's, start the decay here."""
        values = {key: int(state[key]) for key in ScheduleState.KEYS}
        for key, value in values.items():
            setattr(self.state, key, value)
        if not self.cfg.decay_from or values["branched"]:
            return
        step, tokens = values["step"], values["tokens_seen"]
        if step > values["decay_start_step"]:
            raise ValueError(
                f"schedule.decay_from: the checkpoint at step {step} is already in its decay phase "
                f"(from step {values['decay_start_step']}); branch from a stable-phase checkpoint"
            )
        if step >= self.total_steps:
            raise ValueError(f"training.steps: {self.total_steps} leaves no steps to decay after the checkpoint's step {step}")
        self.state.decay_start_step, self.state.decay_start_tokens, self.state.branched = step, tokens, 1


def build_schedule(
    cfg: ScheduleConfig, *, peak_lr: float, total_steps: int, tokens_per_step: int, seq_len: int = 0
) -> Schedule:
    """The schedule a run uses: `cfg` with the run's peak lr, length, tokens per step and sequence length."""
    return Schedule(cfg, peak_lr=peak_lr, total_steps=total_steps, tokens_per_step=tokens_per_step, seq_len=seq_len)
