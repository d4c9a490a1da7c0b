"""AdamW with 8-bit block-wise quantized moments (Dettmers et al., ICLR 2022, arXiv 2110.02861).

Each step dequantizes a parameter's two moments, applies the AdamW update in float32 and
quantizes them again (`optim.blockwise_quant`): the first moment with the signed dynamic code,
the second with the unsigned one, 256 values per block, as bitsandbytes' `AdamW8bit` does on CPU
(and with the same decoupled weight decay, bias corrections and epsilon placement), so that
bitsandbytes is the test oracle. State per element: 2 bytes instead of AdamW's 8.

Only matrices (2-D) with at least `min_8bit_size` elements get 8-bit moments (bitsandbytes'
default threshold, 4096); norms, biases and small matrices keep float32 moments, which cost little.
Under FSDP2 the update runs on each rank's row shard; the codes and block scales are DTensors
sharded like the parameter's rows, so checkpoints reshard across world sizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from optim.blockwise_quant import BLOCK_SIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

MIN_8BIT_SIZE = 4096  # bitsandbytes' `min_8bit_size` default: smaller tensors keep float32 state


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like_param(local: Tensor, param: Tensor, global_shape: tuple[int, ...]) -> Tensor:
    """`local` as a state tensor of `param`: a DTensor row-sharded like it, or plain when it is plain."""
    if not isinstance(param, DTensor):
        return local
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=global_shape, stride=stride)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments of large matrices are stored in 8 bits, block-wise quantized."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    @staticmethod
    def quantizes(param: Tensor, min_8bit_size: int) -> bool:
        """Whether `param` gets 8-bit moments (2-D with at least `min_8bit_size` elements)."""
        return param.ndim == 2 and param.numel() >= min_8bit_size

    def _init_state(self, param: Tensor, min_8bit_size: int) -> dict:
        local = _local(param)
        state: dict = {"step": torch.zeros((), dtype=torch.float32)}
        if not self.quantizes(param, min_8bit_size):
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            return state
        blocks = -(-param.shape[1] // BLOCK_SIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            state[f"{name}_codes"] = _like_param(torch.zeros_like(local, dtype=torch.uint8), param, tuple(param.shape))
            absmax = torch.zeros(local.shape[0], blocks, dtype=torch.float32, device=local.device)
            state[f"{name}_absmax"] = _like_param(absmax, param, (param.shape[0], blocks))
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        signed, unsigned = dynamic_map(True), dynamic_map(False)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, group["min_8bit_size"]))
                state["step"] += 1
                step = state["step"].item()
                grad = _local(param.grad).float()
                weights = _local(param)
                quantized = "exp_avg_codes" in state
                if quantized:
                    codes1, absmax1 = _local(state["exp_avg_codes"]), _local(state["exp_avg_absmax"])
                    codes2, absmax2 = _local(state["exp_avg_sq_codes"]), _local(state["exp_avg_sq_absmax"])
                    exp_avg = dequantize_blockwise(codes1, absmax1, signed.to(grad.device))
                    exp_avg_sq = dequantize_blockwise(codes2, absmax2, unsigned.to(grad.device))
                else:
                    exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - beta1**step
                bias2_sqrt = math.sqrt(1 - beta2**step)
                updated = weights.float()
                if weight_decay:
                    updated.mul_(1 - lr * weight_decay)
                updated.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps), value=-lr / bias1)
                weights.copy_(updated)
                if quantized:
                    new1, scale1 = quantize_blockwise(exp_avg, signed.to(grad.device))
                    new2, scale2 = quantize_blockwise(exp_avg_sq, unsigned.to(grad.device))
                    codes1.copy_(new1)
                    absmax1.copy_(scale1)
                    codes2.copy_(new2)
                    absmax2.copy_(scale2)
        return loss
