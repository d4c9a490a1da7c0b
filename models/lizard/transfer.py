"""The two training stages of Lizard's linearization recipe (Lizard, arXiv:2507.09025, section 4 and Table 13).

Stage 1, attention transfer: every teacher weight is frozen (the student holds copies of the
teacher's q/k/v/o projections); only the parameters Lizard adds (feature maps, gate, meta-memory
logits, window factor) train, to minimise the mean over layers of
MSE(Y_softmax,l, Y_lizard,l), where both are the per-head attention outputs before the output
projection and the Lizard layer reads the teacher's own input to that layer (layer by layer, as
LoLCATs' attention transfer: `HazyResearch/lolcats`, `src/trainer/distill_attention_xent_mse.py`).

Stage 2, fine-tuning: next-token cross-entropy through LoRA adapters on W_q, W_k, W_v (r = 8,
alpha = 16, dropout 0 by default), every other weight frozen; the adapters are then merged.

Both stages use AdamW with betas (0.9, 0.99) and eps 1e-8, a cosine schedule with 10 % warmup
ending at 0.1 of the peak, and gradient clipping at 1.0 (Table 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.lizard.model import Lizard
from models.peft import LoraConfig, apply_lora, freeze_except, merge_and_unload
from optim.schedules import ScheduleConfig, build_schedule

__all__ = ["LIZARD_PARAMS", "StageConfig", "attention_transfer", "eval_loss", "finetune_lora"]

# The parameters Lizard adds to a softmax layer: the only ones stage 1 trains.
LIZARD_PARAMS = ("feature_map_q", "feature_map_k", "gate.weight", "meta_logits", "window_factor")
# Table 13: AdamW beta = (0.9, 0.99), eps = 1e-8; cosine, 10 % warmup, minimum lr ratio 0.1; clip 1.0.
BETAS = (0.9, 0.99)
EPS = 1e-8
WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1
GRAD_CLIP_NORM = 1.0


@dataclass(kw_only=True)
class StageConfig:
    """One training stage: how many optimizer steps, at which peak learning rate."""

    steps: int
    lr: float

    def validate(self, name: str) -> None:
        """Raise ValueError naming `<name>_steps` / `<name>_lr`."""
        if self.steps < 0:
            raise ValueError(f"{name}_steps: must be 0 or positive, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"{name}_lr: must be positive, got {self.lr}")


def _optimize(
    model: nn.Module,
    stage: StageConfig,
    loss_fn: Callable[[Tensor], Tensor],
    next_batch: Callable[[], Tensor],
    *,
    autocast,
    log: Callable[[str], None],
    label: str,
) -> float:
    """Run `stage.steps` AdamW steps on `model`'s trainable parameters; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=BETAS, eps=EPS, weight_decay=0.0)
    schedule = build_schedule(
        ScheduleConfig(name="cosine", warmup_steps=math.ceil(WARMUP_FRACTION * stage.steps), min_lr_ratio=MIN_LR_RATIO),
        peak_lr=stage.lr, total_steps=max(1, stage.steps), tokens_per_step=1,
    )
    loss_value = math.nan
    every = max(1, stage.steps // 10)
    for step in range(stage.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step, tokens_seen=step)
        with autocast():
            loss = loss_fn(next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"{label}: non-finite loss at step {step + 1}; lower the learning rate")
        if (step + 1) % every == 0 or step + 1 == stage.steps:
            log(f"wren: linearize {label} step {step + 1}/{stage.steps}: loss {loss_value:.5f}")
    return loss_value


def attention_transfer(
    teacher: nn.Module,
    student: Lizard,
    stage: StageConfig,
    next_batch: Callable[[], Tensor],
    *,
    autocast=nullcontext,
    log: Callable[[str], None] = print,
) -> float:
    """Stage 1: train only the Lizard parameters to reproduce each teacher layer's attention output."""
    teacher.requires_grad_(False)
    freeze_except(student, LIZARD_PARAMS)
    captured: dict[int, dict] = {}
    handles = []
    for index, layer in enumerate(teacher.layers):

        def grab_input(module, args, index=index):
            captured.setdefault(index, {})["args"] = args  # (normed x, cos, sin)

        def grab_output(module, args, index=index):
            captured.setdefault(index, {})["target"] = args[0]  # heads concatenated, before wo

        handles.append(layer.attention.register_forward_pre_hook(grab_input))
        handles.append(layer.attention.wo.register_forward_pre_hook(grab_output))

    def loss_fn(batch: Tensor) -> Tensor:
        captured.clear()
        with torch.no_grad():
            teacher(batch[:, :-1])
        losses = []
        for index, layer in enumerate(student.layers):
            x, cos, sin = captured[index]["args"][:3]
            predicted = layer.attention.attend(x, cos, sin).transpose(1, 2).flatten(2)
            losses.append(F.mse_loss(predicted.float(), captured[index]["target"].float()))
        return torch.stack(losses).mean()

    try:
        return _optimize(student, stage, loss_fn, next_batch, autocast=autocast, log=log, label="stage 1 (attention transfer)")
    finally:
        for handle in handles:
            handle.remove()


def finetune_lora(
    student: Lizard,
    stage: StageConfig,
    lora: LoraConfig,
    next_batch: Callable[[], Tensor],
    *,
    autocast=nullcontext,
    log: Callable[[str], None] = print,
) -> float:
    """Stage 2: next-token loss through LoRA adapters, then merge them into the weights (in place)."""
    apply_lora(student, lora)

    def loss_fn(batch: Tensor) -> Tensor:
        logits = student(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    try:
        return _optimize(student, stage, loss_fn, next_batch, autocast=autocast, log=log, label="stage 2 (LoRA)")
    finally:
        merge_and_unload(student)
        student.requires_grad_(True)


@torch.no_grad()
def eval_loss(model: nn.Module, batches, *, autocast=nullcontext) -> float:
    """Mean next-token cross-entropy of `model` over `batches` of (B, T + 1) windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast():
            logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(1, count)
