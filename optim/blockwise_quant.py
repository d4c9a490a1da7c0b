"""Block-wise 8-bit quantization of optimizer states (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022, arXiv 2110.02861).

A tensor is cut into blocks of `block_size` consecutive values along its last dimension; each
block is divided by its absolute maximum, and each normalised value in [-1, 1] is stored as the
index (uint8) of the nearest of 256 values of the *dynamic* data type (section 2.2 of the paper:
an exponent that takes as many leading bits as needed, then a sign-less linear fraction), which
spends its resolution on small magnitudes, where most Adam moments live.

Blocks run along the last dimension only, never across rows, so that a row-sharded tensor (FSDP2
shards dimension 0) has the same blocks however it is sharded, and its quantized state reshards
with it. For a contiguous tensor whose last dimension is a multiple of the block size this is
exactly the flat blocking of bitsandbytes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK_SIZE = 256  # bitsandbytes' block size for 8-bit optimizer states on CPU (paper section 2.1 uses 2048 on GPU)


@functools.cache
def dynamic_map(signed: bool, exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The 256 sorted values of the dynamic data type (Dettmers 2016, arXiv 1511.04561; 2022 section 2.2).

    For each exponent e = 0 .. exponent_bits-1 the fraction takes the midpoints of a linear grid
    on [0.1, 1] with 2^(e + fraction bits) intervals (one bit fewer when signed, as the sign takes it),
    scaled by 10^(e - exponent_bits + 1); the signed type mirrors them; 0 and 1 complete the set and
    unused codes are 0. These are the values bitsandbytes' `create_dynamic_map` builds.
    """
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for exponent in range(exponent_bits):
        intervals = 2 ** (exponent + non_sign_bits - exponent_bits + (0 if signed else 1))
        grid = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        means = ((grid[:-1] + grid[1:]) / 2.0) * 10 ** (exponent - exponent_bits + 1)
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """x viewed as (rows, blocks, block_size), the last dimension zero-padded to whole blocks."""
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    pad = -rows.shape[-1] % block_size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, block_size)


def absmax_shape(shape: torch.Size, block_size: int = BLOCK_SIZE) -> tuple[int, int]:
    """Shape of the per-block scales of a tensor of `shape`: (rows, blocks per row)."""
    last = shape[-1] if len(shape) else 1
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows, -(-last // block_size)


def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(uint8 codes shaped like x, float32 absmax of shape `absmax_shape(x.shape)`).

    Each value goes to the nearest code value (ties to the lower one) of x / absmax(block).
    """
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=-1)
    normalised = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    midpoints = (code[1:] + code[:-1]) / 2
    codes = torch.bucketize(normalised, midpoints, right=False).to(torch.uint8)
    codes = codes.reshape(blocks.shape[0], -1)[:, : (x.shape[-1] if x.ndim else 1)]
    return codes.reshape(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """The float32 tensor that `codes` and `absmax` stand for."""
    values = _blocks(code[codes.long()], block_size) * absmax.unsqueeze(-1)
    last = codes.shape[-1] if codes.ndim else 1
    return values.reshape(values.shape[0], -1)[:, :last].reshape(codes.shape)


def max_quantization_error(x: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """The format's per-element bound on |x - dequantize(quantize(x))|.

    With v = x / absmax(block): half the gap between the two code values that bracket v, or the
    distance to the end of the code where v lies beyond it (the signed code stops short of -1);
    times absmax.
    """
    blocks = _blocks(x.float(), block_size)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    normalised = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    upper = torch.bucketize(normalised, code, right=False).clamp(1, code.numel() - 1)
    half_gap = (code[upper] - code[upper - 1]) / 2
    beyond = (code[0] - normalised).clamp_min(0) + (normalised - code[-1]).clamp_min(0)
    bound = torch.maximum(half_gap, beyond) * absmax
    last = x.shape[-1] if x.ndim else 1
    return bound.reshape(bound.shape[0], -1)[:, :last].reshape(x.shape)
