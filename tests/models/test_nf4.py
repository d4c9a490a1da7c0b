"""NF4 against bitsandbytes (the oracle: same levels, same codes, same constants) and the format's bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.peft.lora import LoRALinear
from models.peft.nf4 import (
    NF4_LEVELS,
    NF4Linear,
    NF4LoRALinear,
    dequantize_absmax,
    dequantize_nf4,
    nf4_error_bound,
    quantize_absmax,
    quantize_nf4,
)
from optim.blockwise_quant import dynamic_map, max_quantization_error

bnbf = pytest.importorskip("bitsandbytes.functional")


def test_levels_are_bitsandbytes_nf4_table_and_the_qlora_quantiles():
    assert torch.equal(torch.tensor(NF4_LEVELS), bnbf.get_4bit_type("nf4", device="cpu"))
    # QLoRA appendix E: 8 positive quantiles of N(0, 1) on [0.5, offset], 7 negative, a zero, scaled to [-1, 1]
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), values / values.max(), rtol=0, atol=1e-6)


def test_codes_and_absmax_equal_bitsandbytes():
    torch.manual_seed(0)
    weight = torch.randn(24, 320) * 0.02
    codes, absmax = quantize_nf4(weight, 64)
    ref_codes, ref_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 160)
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    assert torch.equal(absmax.flatten(), ref_state.absmax)
    assert torch.equal(dequantize_nf4(codes, absmax, 320), bnbf.dequantize_4bit(ref_codes, ref_state))


def test_double_quantization_equals_bitsandbytes():
    torch.manual_seed(1)
    weight = torch.randn(4, 16384)  # 256 blocks per row: per-row second-level blocks coincide with bnb's flat ones
    codes, absmax = quantize_nf4(weight, 64)
    absmax_codes, scale, offset = quantize_absmax(absmax)
    ref_codes, ref_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(codes.flatten(), ref_codes.flatten())
    assert torch.equal(scale.flatten(), ref_state.state2.absmax)
    assert float(offset) == pytest.approx(float(ref_state.offset), rel=1e-6)
    # 8-bit absmax codes: equal, except at near-ties (within 0.1% of the midpoint of two adjacent
    # codes), where bnb's C++ CPU kernel does not always pick the nearer code and wren does
    ours, theirs = absmax_codes.flatten().long(), ref_state.absmax.long()
    differ = ours != theirs
    assert differ.float().mean() < 0.01
    code = dynamic_map(signed=True)
    normalised = ((absmax - offset) / scale.repeat_interleave(256, dim=1)).flatten()[differ]
    assert ((ours[differ] - theirs[differ]).abs() == 1).all()
    midpoint = (code[ours[differ]] + code[theirs[differ]]) / 2
    assert ((normalised - midpoint).abs() <= 1e-3 * midpoint.abs()).all()
    assert ((normalised - code[ours[differ]]).abs() <= (normalised - code[theirs[differ]]).abs()).all()
    same = ~differ.reshape(4, -1).repeat_interleave(64, dim=1)
    mine = dequantize_nf4(codes, dequantize_absmax(absmax_codes, scale, offset), 16384)
    torch.testing.assert_close(mine[same], bnbf.dequantize_4bit(ref_codes, ref_state)[same], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distribution", ["normal", "heavy_tailed", "with_zero_block"])
def test_error_within_half_the_largest_level_gap_times_absmax(distribution):
    torch.manual_seed(2)
    weight = torch.randn(33, 200)  # 200 inputs: the last block of each row is padded
    if distribution == "heavy_tailed":
        weight = weight ** 3
    if distribution == "with_zero_block":
        weight[:, :64] = 0
    codes, absmax = quantize_nf4(weight, 64)
    error = (weight - dequantize_nf4(codes, absmax, 200)).abs()
    bound = nf4_error_bound(weight, 64).repeat_interleave(64, dim=1)[:, :200]
    levels = torch.tensor(NF4_LEVELS)
    assert nf4_error_bound(torch.ones(1, 64)).item() == pytest.approx(float((levels[1:] - levels[:-1]).max() / 2))
    assert (error <= bound * (1 + 1e-6) + 1e-12).all()
    assert (error / bound.clamp_min(1e-30)).max() > 0.5  # the bound is tight, not vacuous
    if distribution == "with_zero_block":
        assert (dequantize_nf4(codes, absmax, 200)[:, :64] == 0).all()


def test_double_quantized_error_adds_at_most_the_absmax_error():
    torch.manual_seed(3)
    weight = torch.randn(16, 512)
    codes, absmax = quantize_nf4(weight, 64)
    absmax_codes, scale, offset = quantize_absmax(absmax)
    approx = dequantize_absmax(absmax_codes, scale, offset)
    absmax_bound = max_quantization_error(absmax - offset, dynamic_map(signed=True), 256)
    assert ((approx - absmax).abs() <= absmax_bound + 1e-6).all()  # 1e-6: fp32 rounding of values near 2.5
    error = (weight - dequantize_nf4(codes, approx, 512)).abs()
    bound = nf4_error_bound(weight, 64) + (approx - absmax).abs()  # |level| <= 1
    assert (error <= bound.repeat_interleave(64, dim=1) + 1e-6).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_forward_and_bytes(double_quant):
    torch.manual_seed(4)
    linear = nn.Linear(256, 96, bias=False)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    x = torch.randn(3, 5, 256)
    codes, absmax = quantize_nf4(linear.weight, 64)
    expected_absmax = dequantize_absmax(*quantize_absmax(absmax)) if double_quant else absmax
    torch.testing.assert_close(layer(x), F.linear(x, dequantize_nf4(codes, expected_absmax, 256)))
    assert all(not p.requires_grad for p in layer.parameters())
    # counted by hand: 4-bit codes, plus fp32 absmax per 64 (or uint8 per 64 + fp32 per 256 + one fp32 offset)
    constants = 96 * 4 * 4 if not double_quant else 96 * 4 + 96 * 1 * 4 + 4
    assert layer.storage_bytes() == 96 * 256 // 2 + constants
    assert layer.storage_bytes() <= 0.3 * (2 * 96 * 256)


def test_nf4_lora_linear_trains_only_the_adapter_and_refuses_to_merge():
    torch.manual_seed(5)
    lora = LoRALinear(nn.Linear(128, 64, bias=False), rank=4, alpha=8.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    qlora = NF4LoRALinear(lora)
    x = torch.randn(2, 128)
    base = F.linear(x, qlora.base.dequantize())
    expected = base + (x @ lora.lora_A.T @ lora.lora_B.T) * 2.0
    out = qlora(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
    assert {n for n, p in qlora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    torch.testing.assert_close(qlora.delta_weight(), (lora.lora_B @ lora.lora_A).detach() * 2.0)
    with pytest.raises(ValueError, match="not merged"):
        qlora.merge()


@pytest.mark.gpu
def test_cuda_path_through_bitsandbytes_equals_the_torch_path():
    torch.manual_seed(6)
    weight = torch.randn(128, 256, device="cuda")
    layer = NF4Linear(weight).cuda()
    cpu = NF4Linear(weight.cpu())
    torch.testing.assert_close(layer.dequantize().cpu(), cpu.dequantize(), rtol=0, atol=0)
    x = torch.randn(4, 256, device="cuda")
    torch.testing.assert_close(layer(x).cpu(), cpu(x.cpu()), rtol=1e-4, atol=1e-4)
