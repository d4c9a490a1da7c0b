"""GaLore AdamW (Zhao et al. 2024, arXiv 2403.03507, Alg. 2), Fira, momentum reset: one optimizer.

`ProjectedAdamW` is Adam in the convention of GaLore's reference (`galore_torch/adamw.py`, the
Hugging Face AdamW): denominator sqrt(v) + eps, bias correction folded into the step size,
decoupled weight decay applied after the update. Parameter groups with `projected=True` keep their
moments in GaLore's rank-r space (`optim/projector.py`); with `fira=True` the optimizer adds Fira's
scaled full-rank residual (`optim/fira.py`). Everything else gets plain Adam in the same convention.

On top, for low-rank training (Glentis et al. 2025, arXiv 2505.22922, Sec. 4; reference
`OptimAI-Lab/Memory_Efficient_Pretraining`):

* every `refactor_every_steps` optimizer steps, each `LowRankLinear` rebalances its factors
  (`optim/lowrank.py`), leaving B A unchanged;
* every `reset_every_steps` steps, momentum reset: moments, step counts (so bias correction) and
  Fira's limiter state restart from zero, which also recomputes GaLore's projectors on the next
  step, as rebuilding the optimizer does in the reference; for the next `reset_warmup_steps` steps
  the lr ramps linearly from 0.001x to 1x of the scheduled lr (the reference's "quick recovery",
  `training_utils.py`).

Works on FSDP2-sharded parameters: every update is computed on this rank's shard; moments are
DTensors sharded like the projected gradient and projectors are plain replicated tensors, so
`torch.distributed.checkpoint` saves and reshards the whole state. Per parameter the state is
`step` (since the last reset), `age` (steps ever taken), `exp_avg`, `exp_avg_sq`, and for
projected parameters `projector` (and `residual_norm` with Fira); all tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from optim.fira import UNSET, limit_growth, scaled_residual
from optim.lowrank import refactorize
from optim.projector import ShardedProjection, layout_of, local, refresh_projectors, sharded_like, side_for

# Plain-Adam updates go through a parameter this many elements at a time (4 MiB of float32 per temporary).
CHUNK_ELEMENTS = 2**20
RECOVERY_START = 0.001  # lr fraction at the first step after a reset (training_utils.py, quick recovery)

class ProjectedAdamW(torch.optim.Optimizer):
    """Adam with GaLore-projected groups, optional Fira residual, refactorization and momentum reset."""

    def __init__(
        self,
        params,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float = 0.0,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        align_signs: bool = True,
        fira_gamma: float | None = None,
        reset_every_steps: int = 0,
        reset_warmup_steps: int = 0,
        refactor_every_steps: int = 0,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, projected=False)
        super().__init__(params, defaults)
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.align_signs = align_signs
        self.fira_gamma = fira_gamma
        self.reset_every_steps = reset_every_steps
        self.reset_warmup_steps = reset_warmup_steps
        self.refactor_every_steps = refactor_every_steps
        self.refactor_modules: list = []

    def track_low_rank(self, modules: Sequence) -> None:
        """The `LowRankLinear` modules to refactorize every `refactor_every_steps` steps."""
        self.refactor_modules = list(modules)

    def _init_state(self, param: Tensor, projected: bool) -> dict:
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["age"] = torch.zeros((), dtype=torch.float32)
            if projected and self.fira_gamma is not None:
                state["residual_norm"] = torch.full((), UNSET, dtype=torch.float32, device=local(param).device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One update of every parameter with a gradient; refactor and reset on their periods."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh_projectors()
        age = None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._init_state(param, group["projected"])
                age = int(state["age"]) + 1
                if group["projected"]:
                    self._projected_update(param, group, state)
                else:
                    self._adam_update(param, group, state)
        if age is not None:
            if self.refactor_every_steps and age % self.refactor_every_steps == 0:
                for module in self.refactor_modules:
                    refactorize(module)
            if self.reset_every_steps and age % self.reset_every_steps == 0:
                self.reset_moments()
        return loss

    def _refresh_projectors(self) -> None:
        """New SVD projectors for projected parameters at their steps 0, T, 2T, ... (all at once)."""
        due = []
        for group in self.param_groups:
            if not group["projected"]:
                continue
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._init_state(param, True)
                if "projector" not in state or int(state["step"]) % self.update_proj_gap == 0:
                    due.append((param, state))
        fresh = refresh_projectors(
            [(p, self.rank, side_for(p.shape), s.get("projector") if self.align_signs else None) for p, s in due]
        )
        for (_, state), projector in zip(due, fresh):
            state["projector"] = projector

    def _lr(self, group: dict, state: dict) -> float:
        """The group's lr, times the post-reset ramp while one is running."""
        lr = group["lr"]
        step = int(state["step"])  # already counts the step being taken
        since_reset = step - 1
        if int(state["age"]) > step and since_reset < self.reset_warmup_steps:
            progress = since_reset / (self.reset_warmup_steps - 1) if self.reset_warmup_steps > 1 else 1.0
            lr *= RECOVERY_START + (1 - RECOVERY_START) * min(progress, 1.0)
        return lr

    def _moments(self, state: dict, shape: tuple[int, ...], like: Tensor, param: Tensor, dim: int, full_shape) -> tuple:
        if "exp_avg" not in state:
            layout = layout_of(param)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = sharded_like(
                    torch.zeros(shape, dtype=like.dtype, device=like.device), layout, dim, full_shape
                )
        return local(state["exp_avg"]), local(state["exp_avg_sq"])

    def _count_step(self, group: dict, state: dict) -> tuple[float, float]:
        """Count the step being taken; returns (bias-corrected step size, lr)."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["age"] += 1
        step = int(state["step"])
        lr = self._lr(group, state)
        return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step), lr

    @staticmethod
    def _direction(group: dict, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> Tensor:
        """Update the moments with `grad` in place; returns M / (sqrt(V) + eps)."""
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        return exp_avg / denom

    def _adam_update(self, param: Tensor, group: dict, state: dict) -> None:
        """Plain Adam, a block of rows at a time: elementwise, so the same numbers with temporaries
        of at most `CHUNK_ELEMENTS` instead of two of the parameter's size (an embedding's are the
        optimizer step's largest)."""
        grad, weight = local(param.grad), local(param)
        exp_avg, exp_avg_sq = self._moments(state, tuple(grad.shape), grad, param, 0, tuple(param.shape))
        step_size, lr = self._count_step(group, state)
        row_numel = max(1, math.prod(weight.shape[1:]))
        rows_per_chunk = max(1, CHUNK_ELEMENTS // row_numel)
        for start in range(0, max(1, weight.shape[0]), rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            direction = self._direction(group, grad[rows], exp_avg[rows], exp_avg_sq[rows])
            self._apply(weight[rows], direction, step_size, lr, group)

    def _projected_update(self, param: Tensor, group: dict, state: dict) -> None:
        grad_rows, weight = local(param.grad), local(param)
        projection = ShardedProjection(param, state["projector"], side_for(param.shape), self.scale)
        low_local, low = projection.project(grad_rows)
        exp_avg, exp_avg_sq = self._moments(
            state, tuple(low_local.shape), low_local, param, projection.moment_dim, projection.projected_shape
        )
        step_size, lr = self._count_step(group, state)
        direction = self._direction(group, low_local, exp_avg, exp_avg_sq)
        direction = projection.gather(direction)
        update = projection.project_back(direction)
        if self.fira_gamma is not None:
            residual = scaled_residual(grad_rows, low, direction, projection)
            group_pg = projection.layout.mesh.get_group() if projection.layout.sharded else None
            update = update + limit_growth(residual, state["residual_norm"], self.fira_gamma, group_pg)
        self._apply(weight, update, step_size, lr, group)

    @staticmethod
    def _apply(weight: Tensor, update: Tensor, step_size: float, lr: float, group: dict) -> None:
        weight.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the update, as galore_torch/adamw.py
            weight.add_(weight, alpha=-lr * group["weight_decay"])

    def reset_moments(self) -> None:
        """Momentum reset: zero every moment, step count and Fira limiter state (`age` is kept)."""
        for state in self.state.values():
            state["step"].zero_()
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    local(state[key]).zero_()
            if "residual_norm" in state:
                state["residual_norm"].fill_(UNSET)
