"""The Stateful parts of a run that go into a checkpoint, each holding only tensors.

Tensors only: DCP then stores no pickled objects, and every part reshards or replicates
cleanly when the world size changes between save and load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelOptimizerState(Stateful):
    """Model weights and optimizer moments by parameter name (sharded DTensors under FSDP2).

    The optimizer's param_groups (lr, betas, ...) are not saved: they come from the config, and
    the schedule sets the lr from the step. That keeps the checkpoint free of pickled values.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state["state"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": groups},
            options=StateDictOptions(strict=True),
        )


class IntState(Stateful):
    """Adapts an object whose state is a dict of ints (a loader cursor, a step counter) to tensors."""

    def __init__(self, target: Any):
        self.target = target

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(int(v), dtype=torch.int64) for k, v in self.target.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.target.load_state_dict({k: int(v) for k, v in state.items()})


class Progress:
    """How far the run has come: optimizer steps taken and non-finite steps skipped."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]


class RNGState(Stateful):
    """The CPU (and current CUDA device's) random generator state."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def all_finite(module: nn.Module) -> bool:
    """Whether every local parameter shard of `module` is finite (no NaN or inf)."""
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            return False
    return True
