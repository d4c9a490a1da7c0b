"""4-bit NormalFloat (NF4) storage of frozen linear weights, for QLoRAM (and QLoRA).

NF4 (Dettmers et al., "QLoRA", NeurIPS 2023, arXiv:2305.14314, section 3 and appendix E) stores a
weight as one 4-bit index per value into 16 levels that are quantiles of N(0, 1) scaled to [-1, 1]
(an exact zero included), plus one absmax per block of 64 consecutive values: w = level[code] *
absmax(block). Double quantization stores those fp32 absmaxes as 8-bit dynamic-type codes (blocks
of 256, after subtracting their mean) plus one fp32 scale per block, so the constants cost about
8/64 + 32/(64*256) bits per weight instead of 32/64.

Layout (wren's own, chosen so FSDP2's row sharding keeps every block whole): blocks run along the
input dimension of each row, the row zero-padded to whole blocks; two codes per byte, the first in
the high nibble. For a weight whose input dimension is a multiple of the block size this is
byte-for-byte bitsandbytes' layout (which blocks the flattened tensor), and the levels are
bitsandbytes' NF4 table, which the tests use as the oracle.

`NF4Linear` is a frozen linear that dequantizes its weight on every forward (PyTorch ops on any
device; bitsandbytes' dequantization kernel on CUDA when bitsandbytes is installed and the layout
matches). `NF4LoRALinear` is LoRA over such a layer.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.peft.lora import LoRALinear
from optim.blockwise_quant import dequantize_blockwise, dynamic_map, quantize_blockwise

__all__ = [
    "NF4_LEVELS",
    "NF4Linear",
    "NF4LoRALinear",
    "dequantize_nf4",
    "nf4_error_bound",
    "quantize_nf4",
]

# The 16 NF4 values (QLoRA, arXiv:2305.14314, appendix E): the 2^3 + 1 positive and 2^3
# negative quantiles of N(0, 1) at offset 0.9677, joined at an exact zero and normalised to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044006, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64  # weights per absmax block (QLoRA section 3, "Double Quantization")
DOUBLE_QUANT_BLOCK_SIZE = 256  # absmaxes per second-level block (QLoRA section 3)


@functools.cache
def _levels(device: torch.device) -> Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.cache
def _midpoints(device: torch.device) -> Tensor:
    levels = _levels(device)
    return (levels[:-1] + levels[1:]) / 2


def _padded_blocks(weight: Tensor, block_size: int) -> Tensor:
    """(rows, blocks, block_size) fp32 view of a 2-D weight, each row zero-padded to whole blocks."""
    rows, cols = weight.shape
    pad = -cols % block_size
    w = F.pad(weight.detach().float(), (0, pad)) if pad else weight.detach().float()
    return w.reshape(rows, -1, block_size)


def quantize_nf4(weight: Tensor, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(packed uint8 codes (rows, padded_cols / 2), fp32 absmax (rows, blocks)) of a 2-D weight.

    Each value becomes the index of the nearest NF4 level of w / absmax(block) (ties to the lower
    level); an all-zero block has absmax 0 and codes of the level 0.
    """
    if weight.ndim != 2 or block_size % 2:
        raise ValueError(f"quantize_nf4: needs a 2-D weight and an even block size, got {tuple(weight.shape)}, {block_size}")
    blocks = _padded_blocks(weight, block_size)
    absmax = blocks.abs().amax(dim=-1)
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38)).unsqueeze(-1)).clamp(-1, 1)
    codes = torch.bucketize(scaled, _midpoints(weight.device)).to(torch.uint8).reshape(weight.shape[0], -1)
    return (codes[:, 0::2] << 4) | codes[:, 1::2], absmax


def dequantize_nf4(packed: Tensor, absmax: Tensor, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (rows, cols) weight that `quantize_nf4` codes stand for, in `dtype`."""
    rows = packed.shape[0]
    codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(rows, absmax.shape[1], -1)
    values = _levels(packed.device)[codes.long()] * absmax.unsqueeze(-1)
    return values.reshape(rows, -1)[:, :cols].to(dtype)


def nf4_error_bound(weight: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """The format's bound on |w - dequantize(quantize(w))| per block: half the largest gap
    between adjacent NF4 levels times the block's absmax, shaped (rows, blocks)."""
    levels = _levels(weight.device)
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    return half_gap * _padded_blocks(weight, block_size).abs().amax(dim=-1)


def quantize_absmax(absmax: Tensor, block_size: int = DOUBLE_QUANT_BLOCK_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization (QLoRA section 3): (uint8 codes, fp32 scales, fp32 offset) of absmax - mean."""
    offset = absmax.mean()
    codes, scale = quantize_blockwise(absmax - offset, dynamic_map(signed=True), block_size)
    return codes, scale, offset


def dequantize_absmax(codes: Tensor, scale: Tensor, offset: Tensor, block_size: int = DOUBLE_QUANT_BLOCK_SIZE) -> Tensor:
    """The fp32 absmax that `quantize_absmax` codes stand for."""
    return dequantize_blockwise(codes, scale, dynamic_map(signed=True).to(codes.device), block_size) + offset


@functools.cache
def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _bitsandbytes_usable(device: torch.device) -> bool:
    """Whether to dequantize with bitsandbytes' CUDA kernel (on CUDA, when bitsandbytes is installed)."""
    return device.type == "cuda" and _bitsandbytes_installed()


class NF4Linear(nn.Module):
    """A frozen, bias-free linear whose weight is stored in NF4 and dequantized per forward.

    Storage (all frozen; uint8 parameters so FSDP2 shards them by rows with the rest):
    `nf4_codes` (out, padded_in / 2) and either `nf4_absmax` (out, blocks) fp32, or with double
    quantization `nf4_absmax_codes` (out, blocks) uint8 + `nf4_absmax_scale` fp32 per 256 of them
    and the buffer `nf4_absmax_offset` (one fp32 scalar, the same on every rank).
    """

    def __init__(self, weight: Tensor, *, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.double_quant = double_quant
        codes, absmax = quantize_nf4(weight, block_size)
        frozen = lambda t: nn.Parameter(t.contiguous(), requires_grad=False)  # FSDP2 shards contiguous tensors only
        self.nf4_codes = frozen(codes)
        if double_quant:
            absmax_codes, scale, offset = quantize_absmax(absmax)
            self.nf4_absmax_codes = frozen(absmax_codes)
            self.nf4_absmax_scale = frozen(scale)
            self.register_buffer("nf4_absmax_offset", offset)
        else:
            self.nf4_absmax = frozen(absmax)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> NF4Linear:
        """Quantize a bias-free `nn.Linear`'s weight."""
        if linear.bias is not None:
            raise ValueError("NF4Linear: quantizes bias-free linears only (Llama has no biases)")
        return cls(linear.weight, block_size=block_size, double_quant=double_quant)

    def absmax(self) -> Tensor:
        """The fp32 block absmaxes (dequantized first under double quantization)."""
        if not self.double_quant:
            return self.nf4_absmax
        return dequantize_absmax(self.nf4_absmax_codes, self.nf4_absmax_scale, self.nf4_absmax_offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The (out, in) weight in `dtype`."""
        absmax = self.absmax()
        if _bitsandbytes_usable(self.nf4_codes.device) and self.in_features % self.block_size == 0:
            import bitsandbytes.functional as bnbf

            state = bnbf.QuantState(
                absmax=absmax.reshape(-1), shape=torch.Size((self.out_features, self.in_features)),
                code=_levels(self.nf4_codes.device), blocksize=self.block_size, quant_type="nf4", dtype=dtype,
            )
            return bnbf.dequantize_4bit(self.nf4_codes.reshape(-1, 1), quant_state=state)
        return dequantize_nf4(self.nf4_codes, absmax, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x W^T with W dequantized to x's dtype (autocast then casts as it does for nn.Linear)."""
        return F.linear(x, self.dequantize(x.dtype))

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its constants (what replaces the dense weight)."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


_NO_MERGE = "NF4LoRALinear: a 4-bit weight is not merged in place; export the adapter and merge it into the full model"


class NF4LoRALinear(LoRALinear):
    """LoRA over an `NF4Linear`: y = dequant(W) x + scaling * B A dropout(x) (QLoRA, section 3).

    Keeps LoRALinear's adapter (`lora_A`, `lora_B`, same names and init), so adapter state dicts
    and optimizer groups are unchanged; the frozen weight lives in `base`. Merging into a 4-bit
    weight would re-quantize it, so `merge` refuses: LoRAM merges the recovered adapter into the
    full-precision, unpruned model at export instead.
    """

    def __init__(self, lora: LoRALinear, *, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> None:
        nn.Module.__init__(self)
        if lora.merged or lora.bias is not None:
            raise ValueError("NF4LoRALinear: needs an unmerged, bias-free LoRALinear")
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.rank, self.scaling = lora.rank, lora.scaling
        self.base = NF4Linear(lora.weight, block_size=block_size, double_quant=double_quant)
        self.bias = None
        self.lora_dropout = lora.lora_dropout
        self.lora_A, self.lora_B = lora.lora_A, lora.lora_B
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        """The NF4 base layer plus the low-rank update."""
        return self.base(x) + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """scaling * B A as a dense fp32 tensor (this rank's rows of B under FSDP2)."""
        a, b = self.lora_A, self.lora_B
        if hasattr(a, "full_tensor"):
            a, b = a.full_tensor(), b.to_local()
        return (b.float() @ a.float()) * self.scaling

    def merge(self) -> None:
        """Refused: see the class docstring."""
        raise ValueError(_NO_MERGE)

    def unmerge(self) -> None:
        """Nothing to undo (never merged)."""

    def to_linear(self) -> nn.Linear:
        """Refused, as `merge`."""
        raise ValueError(_NO_MERGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scaling={self.scaling}"
