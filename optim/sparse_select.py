"""SpIEL's support re-selection: drop the deltas that moved least, regrow the most promising entries.

The schedule (AlanAnsell/peft src/peft/tuners/sft/trainer.py `SftSelector`; the reference
dossier section 1.3), with t the number of optimizer steps taken, R = `reselection_steps`,
A = `selection_accumulation_steps` and T the run's total steps:

- candidate gradients are captured during the backward of update t + 1 whenever
  t mod R < A or t mod R = R - 1 (so the windows are updates 1..5, 20..25, 40..45, ...);
- re-selection happens after update t when t mod R = A and t <= T, replacing floor(p k) of each
  weight's k entries, p = 1 at t = A, else rho_0 (1 - t/T) ("linear") or rho_0 (1 + cos(pi t/T)) / 2
  ("cosine").

Drop: the floor(p k) entries with the smallest |phi| (a regrown delta starts at 0, so |phi| is
its change since regrowth). Grow: SpIEL-AG takes the top |accumulated gradient| among k candidate
positions (the top-|dense gradient| positions of the window's first micro-batch); SpIEL-MA takes
the top of outer(acc_row, acc_col) over the positions not active before the drop, SM3's row and
column accumulators (nu = min(acc_row[r], acc_col[c]) + g^2, then scatter-max into both), so it
always replaces exactly floor(p k). A position both dropped and regrown (AG only) keeps its value;
the other replaced slots get phi = 0 and fresh optimizer state.

Distributed: every decision depends only on all-reduced values, so indices stay identical on all
ranks (the AG candidate gradients are all-reduced as they are captured, the MA step gradients at
each step).

Adaptation (the trainer's AdamW keeps one step count per tensor, not SftAdamW's per-entry age):
AG seeds a regrown slot's moments with the window's mean gradient m and mean squared gradient v,
counter-corrected by the tensor's step s (exp_avg = m (1 - beta1^s), exp_avg_sq = v (1 - beta2^s)),
so Adam's bias correction returns m and v, as SftAdamW's seeding does with age (section 1.4 step 6).
MA zeroes the regrown slots' state. The SM3 accumulators drive MA's regrowth; the deltas train with
the configured optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.peft.sparse_config import SpielConfig
from models.peft.sparse_delta import (
    SparseDeltaLinear,
    full_tensor,
    local_shard,
    sparse_delta_modules,
)

__all__ = [
    "SpielSelector",
    "capture_active",
    "drop_and_grow",
    "reselection_rate",
    "selection_steps",
    "sm3_accumulate",
]


def capture_active(t: int, reselection_steps: int, accumulation_steps: int) -> bool:
    """Whether the backward of update t + 1 captures candidate gradients (t steps taken so far)."""
    phase = t % reselection_steps
    return phase < accumulation_steps or phase == reselection_steps - 1


def selection_steps(total_steps: int, reselection_steps: int, accumulation_steps: int) -> list[int]:
    """The steps t (1-based, after the update) at which the support is re-selected."""
    return list(range(accumulation_steps, total_steps + 1, reselection_steps))


def reselection_rate(t: int, total_steps: int, cfg: SpielConfig) -> float:
    """Fraction p of each weight's entries replaced at step t (SftSelector, linear or cosine decay)."""
    if cfg.reselection_rate_policy == "cosine":
        return cfg.initial_reselection_rate * (1 + math.cos(math.pi * t / total_steps)) / 2
    if t == cfg.selection_accumulation_steps:
        return 1.0
    return cfg.initial_reselection_rate * (1 - t / total_steps)


def sm3_accumulate(acc_row: Tensor, acc_col: Tensor, indices: Tensor, grad: Tensor, n_cols: int) -> None:
    """SM3 cover update for entries at flat `indices` with gradient `grad` (SftSM3; Anil et al. 2019, Alg. 2)."""
    rows, cols = indices // n_cols, indices % n_cols
    nu = torch.minimum(acc_row[rows], acc_col[cols]) + grad.float() ** 2
    acc_row.scatter_reduce_(0, rows, nu, "amax")
    acc_col.scatter_reduce_(0, cols, nu, "amax")


def drop_and_grow(
    indices: Tensor, values: Tensor, candidates: Tensor, scores: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Which slots of `indices` to overwrite with which new positions.

    Drops the n slots of smallest |values|; among `candidates` not active after the drop, grows the
    n of largest `scores`. A position both dropped and grown stays (with its value); the other
    dropped slots (smallest |value| first) are paired with the other grown positions (best first),
    truncated to the shorter list. Returns (slots, positions), equally long.
    """
    empty = indices.new_empty(0)
    if n <= 0:
        return empty, empty
    outgoing = torch.topk(values.abs().float(), n, largest=False).indices
    outgoing = outgoing[values.abs().float()[outgoing].argsort(stable=True)]
    kept = torch.ones_like(indices, dtype=torch.bool)
    kept[outgoing] = False
    eligible = ~torch.isin(candidates, indices[kept])
    pool, pool_scores = candidates[eligible], scores[eligible].float()
    incoming = pool[torch.topk(pool_scores, min(n, pool.numel())).indices]
    dropped_positions = indices[outgoing]
    slots = outgoing[~torch.isin(dropped_positions, incoming)]
    positions = incoming[~torch.isin(incoming, dropped_positions)]
    length = min(slots.numel(), positions.numel())
    return slots[:length], positions[:length]


def _all_reduce_mean(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


class _WeightState:
    """Per-weight selection statistics (tensors only; all identical on every rank)."""

    def __init__(self, module: SparseDeltaLinear, selection: str, device: torch.device) -> None:
        k = module.k
        if selection == "ag":
            self.tensors = {
                "candidates": torch.zeros(k, dtype=torch.int64, device=device),
                "grad_sum": torch.zeros(k, device=device),
                "grad_sq_sum": torch.zeros(k, device=device),
                "samples": torch.zeros((), device=device),
            }
        else:
            self.tensors = {
                "acc_row": torch.zeros(module.out_features, device=device),
                "acc_col": torch.zeros(module.in_features, device=device),
                "step_grad": torch.zeros(k, device=device),
            }


class SpielSelector:
    """Step hook running SpIEL's drop/regrow on every `SparseDeltaLinear` of a model; Stateful.

    `ctx` (a `trainer.extensions.BuildContext`) supplies the optimizer (`ctx.optimizer`) whose state
    of regrown slots is reset (without one only indices and values change) and the device of the
    statistics (`ctx.env.device`; the model may still be on the meta device when this is built).
    """

    def __init__(self, model: nn.Module, cfg: SpielConfig, *, total_steps: int, ctx: Any = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.total_steps = total_steps
        self.ctx = ctx
        self.modules = dict(sparse_delta_modules(model))
        if not self.modules:
            raise ValueError("spiel: the model has no sparse-delta layer (apply_sparse_deltas first)")
        env = getattr(ctx, "env", None)
        device = env.device if env is not None else next(iter(self.modules.values())).delta_indices.device
        self.state = {name: _WeightState(m, cfg.selection, device) for name, m in self.modules.items()}
        self._by_module = {id(m): self.state[name] for name, m in self.modules.items()}
        self.step = torch.zeros((), dtype=torch.int64)
        for module in self.modules.values():
            module.grad_observer = self._observe
        self.replaced: dict[int, int] = {}  # step -> entries replaced over all weights (for logs and tests)

    @property
    def capturing(self) -> bool:
        """Whether the coming backward passes feed SpIEL-AG's candidate statistics."""
        return self.cfg.selection == "ag" and capture_active(
            int(self.step), self.cfg.reselection_steps, self.cfg.selection_accumulation_steps
        )

    @torch.no_grad()
    def _observe(self, module: SparseDeltaLinear, dense_grad: Tensor, values_grad: Tensor) -> None:
        tensors = self._by_module[id(module)].tensors
        if self.cfg.selection == "ma":
            tensors["step_grad"] += values_grad.float()
            return
        if not self.capturing:
            return
        flat = dense_grad.reshape(-1)
        if tensors["samples"] == 0:
            tensors["candidates"].copy_(torch.topk(_all_reduce_mean(flat.clone()).abs(), module.k).indices)
            tensors["grad_sum"].zero_()
            tensors["grad_sq_sum"].zero_()
        grad = _all_reduce_mean(flat.index_select(0, tensors["candidates"]))
        tensors["grad_sum"] += grad
        tensors["grad_sq_sum"] += grad**2
        tensors["samples"] += 1

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        """After optimizer step `step` (1-based): accumulate SM3, and re-select on schedule."""
        self.step.fill_(step)
        if self.cfg.selection == "ma":
            for module in self.modules.values():
                tensors = self._by_module[id(module)].tensors
                grad = _all_reduce_mean(tensors["step_grad"])
                sm3_accumulate(tensors["acc_row"], tensors["acc_col"], module.delta_indices, grad, module.in_features)
                grad.zero_()
        cfg = self.cfg
        if step % cfg.reselection_steps != cfg.selection_accumulation_steps or step > self.total_steps:
            return
        rate = reselection_rate(step, self.total_steps, cfg)
        self.replaced[step] = sum(self._select(module, math.floor(rate * module.k)) for module in self.modules.values())

    def _select(self, module: SparseDeltaLinear, n: int) -> int:
        tensors = self._by_module[id(module)].tensors
        values = full_tensor(module.delta_values.detach())
        if self.cfg.selection == "ag":
            if tensors["samples"] == 0:
                return 0
            candidates, scores = tensors["candidates"], tensors["grad_sum"].abs()
        else:  # SftSelector.select_sm3: grow among positions not active before the drop
            inactive = torch.ones(module.weight.numel(), dtype=torch.bool, device=module.delta_indices.device)
            inactive[module.delta_indices] = False
            candidates = inactive.nonzero().view(-1)
            scores = torch.outer(tensors["acc_row"], tensors["acc_col"]).view(-1)[candidates]
        slots, positions = drop_and_grow(module.delta_indices, values, candidates, scores, n)
        module.delta_indices[slots] = positions
        self._reset_slots(module, slots, positions, tensors)
        if self.cfg.selection == "ag":
            tensors["samples"].zero_()
        return slots.numel()

    def _reset_slots(self, module: SparseDeltaLinear, slots: Tensor, positions: Tensor, tensors: dict) -> None:
        param = module.delta_values
        local, offset = local_shard(param.data)
        mine = (slots >= offset) & (slots < offset + local.shape[0])
        local_slots = slots[mine] - offset
        local[local_slots] = 0
        optimizer = getattr(self.ctx, "optimizer", None)
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        seeded = {}
        if self.cfg.selection == "ag" and "exp_avg" in state and "exp_avg_sq" in state:
            beta1, beta2 = next(g["betas"] for g in optimizer.param_groups if any(p is param for p in g["params"]))
            step = float(state["step"]) if "step" in state else 0.0
            order = torch.searchsorted(tensors["candidates"].sort().values, positions[mine])
            by_position = tensors["candidates"].argsort()[order]
            mean = tensors["grad_sum"][by_position] / tensors["samples"]
            mean_sq = tensors["grad_sq_sum"][by_position] / tensors["samples"]
            seeded = {"exp_avg": mean * (1 - beta1**step), "exp_avg_sq": mean_sq * (1 - beta2**step)}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                target, _ = local_shard(value)
                target[local_slots] = seeded[key].to(target.dtype) if key in seeded else 0

    def state_dict(self) -> dict[str, Tensor]:
        """Step and per-weight statistics (tensors only), keyed `<weight>.<stat>`."""
        out = {"step": self.step}
        for name, weight_state in self.state.items():
            out.update({f"{name}.{key}": value for key, value in weight_state.tensors.items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned (in place)."""
        self.step.copy_(state["step"])
        for name, weight_state in self.state.items():
            for key, value in weight_state.tensors.items():
                value.copy_(state[f"{name}.{key}"])
