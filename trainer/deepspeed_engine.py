"""DeepSpeed ZeRO as the training engine (`parallel.engine = "deepspeed"`), an alternative to FSDP2.

The model, data, loader, schedule, metrics and checkpoint directory layout are wren's own; what
differs from the FSDP2 engine:

- the model is built unsharded and handed, with wren's optimizer, to `deepspeed.initialize`, which
  partitions the optimizer state (ZeRO stage 1), also the gradients (stage 2), and also the
  parameters (stage 3, gathered per module for its forward and backward) over the ranks, and can
  keep the optimizer state in CPU memory (`parallel.offload_optimizer`, any stage) and, under
  stage 3, the parameter partitions too (`parallel.offload_params`). The model is
  built whole on every rank first (no `deepspeed.zero.Init`), so under stage 3 each rank must still
  hold the whole model once, at start;
- only optimizers whose state is element-wise and known to `deepspeed_state.OPTIMIZER_STATE_KEYS`
  run under it (AdamW): ZeRO flattens and partitions that state;
- gradient accumulation over micro-batches and clipping (`training.grad_clip_norm`) are done by
  DeepSpeed (`gradient_accumulation_steps`, `gradient_clipping`); the lr still comes from wren's
  schedule every step;
- a step with a non-finite loss is not skipped: the run halts before the update (the last
  checkpoint stays valid);
- checkpoints are DCP checkpoints with the FSDP2 engine's keys: the fp32 master weights and the
  Adam moments whole, by parameter name (`trainer.deepspeed_state`, which also says what gathering
  them costs), so they resume at any world size, under any ZeRO stage, and under either engine;
- under stage 3 the module's parameters are empty placeholders between forwards, so the logged
  `memory/param_bytes` counts none of them and the finite-weights check before a checkpoint sees
  none of them (the saved weights are the gathered fp32 masters).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import JobConfig
from trainer.deepspeed_state import OPTIMIZER_STATE_KEYS, NamedZeroState
from trainer.distributed import DistEnv
from trainer.errors import ConfigError, NonFiniteError
from trainer.train import StepResult, Trainer

NEVER_PRINT_STEPS = 2**31 - 1  # DeepSpeed's own progress lines are off: wren logs its metrics

# DeepSpeed 0.19 calls these torch collectives on every ZeRO-3 gather and reduce; torch warns each time.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)


def deepspeed_config(cfg: JobConfig, world_size: int, micro_batch_size: int, accumulation_steps: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a wren job (batch shape, ZeRO stage, offload, clipping, dtype)."""
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.parallel.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # wren's AdamW is torch's (fused), not one of DeepSpeed's
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.training.dtype == "bfloat16"},
        "steps_per_print": NEVER_PRINT_STEPS,
    }
    if cfg.training.grad_clip_norm:
        config["gradient_clipping"] = cfg.training.grad_clip_norm
    return config


class DeepSpeedTrainer(Trainer):
    """wren's trainer with the model and optimizer wrapped by a DeepSpeed ZeRO engine."""

    def __init__(self, cfg: JobConfig, env: DistEnv):
        if cfg.optimizer.name not in OPTIMIZER_STATE_KEYS:
            raise ConfigError(
                f"optimizer.name: the deepspeed engine supports {', '.join(OPTIMIZER_STATE_KEYS)}, "
                f"got {cfg.optimizer.name!r}"
            )
        if env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # DeepSpeed reads the rank layout from torchrun's variables; SLURM tasks and single processes lack them.
        for name, value in (("LOCAL_RANK", env.local_rank), ("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
            os.environ.setdefault(name, str(value))
        if not dist.is_initialized():  # DeepSpeed needs a process group, even of one
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh, env.mesh = env.mesh, None  # build the model unsharded: ZeRO partitions it, not FSDP2
        try:
            super().__init__(cfg, env)
        finally:
            env.mesh = mesh
        self.micro_batch_size = cfg.training.micro_batch_size or self.local_batch_size
        self.accumulation_steps = self.local_batch_size // self.micro_batch_size
        ds_config = deepspeed_config(cfg, env.world_size, self.micro_batch_size, self.accumulation_steps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=ds_config, dist_init_required=False
        )
        self.model = self.engine
        offloaded = [name for name, on in (("optimizer state", cfg.parallel.offload_optimizer),
                                           ("parameters", cfg.parallel.offload_params)) if on]
        offload = f", {' and '.join(offloaded)} offloaded to CPU" if offloaded else ""
        self.log(f"wren: DeepSpeed ZeRO stage {cfg.parallel.zero_stage} over {env.world_size} rank(s){offload}")

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        state["model_optim"] = NamedZeroState(self.engine, self.cfg.optimizer.name)
        return state

    def train_step(self, batch: torch.Tensor) -> StepResult:
        """Forward and backward per micro-batch through the engine; DeepSpeed clips and steps at the end."""
        step = self.progress.step
        lr = self.schedule.lr(step, tokens_seen=step * self.tokens_per_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        chunks = batch.to(self.env.device).split(self.micro_batch_size)
        loss_sum = 0.0
        for index, chunk in enumerate(chunks):
            with self._autocast():
                logits = self.engine(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
            self.engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
            loss_sum += loss.item()
            if index == len(chunks) - 1:
                (loss_total,) = self.env.all_reduce_sum([loss_sum / len(chunks)])
                loss_mean = loss_total / self.env.world_size
                if not math.isfinite(loss_mean):
                    raise NonFiniteError(
                        f"step {step + 1}: non-finite loss {loss_mean} under the deepspeed engine, which does not "
                        "skip steps; halting before the update. The last checkpoint is still valid."
                    )
            self.engine.step()  # an optimizer step only at the accumulation boundary
        grad_norm = float(self.engine.get_global_grad_norm())
        self.progress.step += 1
        for hook in self.extensions.step_hooks:
            hook(self.progress.step)
        return StepResult(loss=loss_mean, grad_norm=grad_norm, lr=lr, skipped=False)
