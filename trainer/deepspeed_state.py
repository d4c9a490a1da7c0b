"""DeepSpeed ZeRO checkpoint state by parameter name: full fp32 weights and Adam moments.

`NamedZeroState` is the `model_optim` part of a DeepSpeed run's checkpoint. It holds the same keys
as the FSDP2 engine's `ModelOptimizerState`:

    model/<param name>                  the fp32 master weight, whole
    optim/<param name>/exp_avg          Adam's first moment, whole
    optim/<param name>/exp_avg_sq       Adam's second moment, whole
    optim/<param name>/step             the optimizer step count (a float32 scalar, as torch's AdamW keeps it)

Nothing in it depends on the world size or the ZeRO stage, so a checkpoint resumes at another
world size, under another ZeRO stage (1, 2, 3, with or without optimizer offload), and under the
FSDP2 engine or the reverse (DCP reshards the whole tensors to FSDP2's DTensor shards on load).

The whole tensors are gathered from the ZeRO partitions with DeepSpeed's own utilities
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state`, stage 1-3) and
written back with `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`; the module's own
(possibly bf16, possibly ZeRO-3-partitioned) parameters are then refreshed from the fp32 weight
through `deepspeed.zero.GatheredParameters`.

Cost: each gather is a collective over the data-parallel group per parameter and per tensor kind
(stage 1/2: an all-reduce of the full tensor; stage 3: an all-gather), and every rank ends up
holding the whole fp32 weights and both moments, 12 bytes per parameter, on CPU, for as long as
DCP writes them. Loading allocates the same. For a model whose 12 bytes per parameter do not fit
in one rank's host memory, this layout is not usable as it stands.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

# Per-parameter state tensors each supported optimizer keeps, as torch's optimizer names them.
# Only element-wise optimizers fit ZeRO's flat partitions; "step" is handled on its own.
OPTIMIZER_STATE_KEYS: dict[str, tuple[str, ...]] = {"adamw": ("exp_avg", "exp_avg_sq")}


def flat_fp32_partitions(zero_optimizer) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions: the tensors the base optimizer steps (stage 1-3)."""
    stage3 = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if stage3 is not None:
        return list(stage3)
    return list(zero_optimizer.single_partition_of_fp32_groups)


def link_optimizer_state(zero_optimizer) -> None:
    """Point each parameter's stage 1/2 fragment at its slice of the flat optimizer state (stage 3: nothing to do).

    The `safe_*_optimizer_state` utilities read through these links. DeepSpeed 0.19 makes them once,
    right after the first group's first step, so groups stepped after it (wren has two: with and
    without weight decay) are linked to no state at all; linking again is idempotent.
    """
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):
        return
    for params, flat in zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(params, flat, zero_optimizer.optimizer.state)


class NamedZeroState(Stateful):
    """A DeepSpeed engine's weights and optimizer state, whole and by parameter name."""

    def __init__(self, engine, optimizer_name: str):
        self.module: nn.Module = engine.module
        self.zero = engine.optimizer
        self.state_keys = OPTIMIZER_STATE_KEYS[optimizer_name]

    def _base_state(self) -> list[dict[str, Any]]:
        base = self.zero.optimizer
        return [base.state.get(flat, {}) for flat in flat_fp32_partitions(self.zero)]

    def _stepped(self) -> bool:
        """Whether the base optimizer holds its state yet (torch optimizers create it at the first step)."""
        return any(state for state in self._base_state())

    def _step(self) -> torch.Tensor:
        steps = [float(state["step"]) for state in self._base_state() if "step" in state]
        return torch.tensor(max(steps, default=0.0), dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        stepped = self._stepped()
        if stepped:
            link_optimizer_state(self.zero)
        step = self._step()
        model: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in self.module.named_parameters():
            weight = safe_get_full_fp32_param(param)
            if weight is None:  # frozen: not in the optimizer, kept at the module's dtype
                with deepspeed.zero.GatheredParameters([param]):
                    model[name] = param.detach().cpu().clone()
                continue
            model[name] = _to_cpu(weight)
            moments = {
                key: _to_cpu(safe_get_full_optimizer_state(param, key)) if stepped else torch.zeros_like(model[name])
                for key in self.state_keys
            }
            optim[name] = {**moments, "step": step.clone()}
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self._create_optimizer_state()
        link_optimizer_state(self.zero)
        steps = [0.0]
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                weight = state["model"][name]
                if name in state["optim"]:
                    safe_set_full_fp32_param(param, weight.to(param.device))
                    for key in self.state_keys:
                        safe_set_full_optimizer_state(param, state["optim"][name][key].to(param.device), key)
                    steps.append(float(state["optim"][name]["step"]))
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    param.data.copy_(weight.to(param.device, param.dtype).reshape(param.shape))
        for base_state in self._base_state():
            base_state["step"].fill_(max(steps))  # one count: ZeRO steps every parameter together

    def _create_optimizer_state(self) -> None:
        """Give the base optimizer zero state to write into when it has not stepped yet (a fresh run)."""
        if self._stepped():
            return
        base = self.zero.optimizer
        for flat in flat_fp32_partitions(self.zero):
            base.state[flat] = {
                "step": torch.zeros((), dtype=torch.float32, device=flat.device),
                **{key: torch.zeros_like(flat) for key in self.state_keys},
            }


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy owning its storage (DeepSpeed's gathers return views into larger buffers)."""
    return tensor.detach().to("cpu", copy=True)
