"""8-bit block-wise optimizer states: the code against bitsandbytes, the error bound, the optimizer
against bitsandbytes' AdamW8bit and float32 AdamW, and FSDP2 sharding and resharding."""

from __future__ import annotations

import pytest
import torch

from optim.adamw8bit import AdamW8bit
from optim.blockwise_quant import (
    dequantize_blockwise,
    dynamic_map,
    max_quantization_error,
    quantize_blockwise,
)
from tests.distributed import run_on_ranks

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_code(signed):
    assert torch.equal(dynamic_map(signed), bnb_functional.create_dynamic_map(signed=signed))
    assert dynamic_map(signed).unique().numel() == 256  # every one of the 8 bits carries information


@pytest.mark.parametrize("shape", [(64, 512), (7, 300), (1000,)])
def test_quantization_error_within_the_block_wise_bound(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 1, shape[-1])  # magnitudes over 5 decades
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    restored = dequantize_blockwise(codes, absmax, code)
    error = (x - restored).abs()
    bound = max_quantization_error(x, code)
    assert (error <= bound + 1e-6 * absmax.max()).all()


def test_quantization_agrees_with_bitsandbytes():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)) * 3
    code = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, code)
    bnb_codes, bnb_state = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.allclose(absmax.flatten(), bnb_state.absmax)
    assert (codes != bnb_codes).float().mean() < 0.005
    # Where the two disagree, wren's choice is the nearer code (bitsandbytes' CPU kernel rounds near-ties either way).
    ours = (x - dequantize_blockwise(codes, absmax, code)).abs()
    theirs = (x - bnb_functional.dequantize_blockwise(bnb_codes, bnb_state)).abs()
    assert (ours <= theirs + 1e-6).all()


def _run_steps(optimizer_cls, w0, grads, **kwargs):
    param = torch.nn.Parameter(w0.clone())
    optimizer = optimizer_cls([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach(), optimizer


def test_adamw8bit_tracks_bitsandbytes_and_float32_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(128, 512, generator=gen) * 0.02
    grads = [torch.randn(128, 512, generator=gen) * (1 + s % 3) for s in range(30)]
    ours, optimizer = _run_steps(AdamW8bit, w0, grads)
    theirs, _ = _run_steps(bnb.optim.AdamW8bit, w0, grads)
    exact, _ = _run_steps(torch.optim.AdamW, w0, grads)

    def distance(a, b):
        return ((a - b).norm() / (exact - w0).norm()).item()

    # Both 8-bit optimizers sit at the same distance from float32 AdamW, and far closer to each other.
    assert distance(ours, exact) == pytest.approx(distance(theirs, exact), rel=0.05)
    assert distance(ours, theirs) < 0.25 * distance(theirs, exact)
    assert distance(ours, exact) < 0.05
    state = optimizer.state[next(iter(optimizer.state))]
    assert state["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in state


def test_small_and_vector_parameters_keep_float32_moments():
    w0 = torch.randn(16, 16)
    grads = [torch.randn(16, 16) for _ in range(5)]
    ours, optimizer = _run_steps(AdamW8bit, w0, grads)
    exact, _ = _run_steps(torch.optim.AdamW, w0, grads)
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-7)
    assert not AdamW8bit.quantizes(torch.empty(8192), 4096)


def _sharded_steps(checkpoint_dir: str, save: bool) -> dict:
    """Train a 2-layer MLP with AdamW8bit under FSDP2 on the launcher's ranks (plainly on one process).

    With `save`: 3 steps, a DCP checkpoint, 3 more steps. Without: load that checkpoint, 3 steps.
    """
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False), torch.nn.Tanh(), torch.nn.Linear(128, 256, bias=False))
    if world_size > 1:
        dist.init_process_group("gloo")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.1)
    data = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    rank = dist.get_rank() if world_size > 1 else 0
    local = data.chunk(world_size)[rank]

    def step():
        loss = (model(local) - local).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    if not save:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for _ in range(3):
        step()
    if save:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_dir)
        for _ in range(3):
            step()
    # numpy arrays travel back from a rank by value (a tensor would be shared through a file
    # descriptor that dies with the rank's process).
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy() for name, p in model.named_parameters()}


def _assert_same_training(got: dict, want: dict) -> None:
    """Equal up to rare one-code flips: sharding changes gradients by float rounding (~1e-7), and a
    value within rounding of a code midpoint then rounds to the neighbouring code."""
    for name in want:
        got_tensor, want_tensor = torch.from_numpy(got[name]), torch.from_numpy(want[name])
        close = torch.isclose(got_tensor, want_tensor, rtol=1e-5, atol=1e-6)
        assert close.float().mean() > 0.99, name
        assert (got_tensor - want_tensor).norm() < 1e-3 * want_tensor.norm(), name


def test_fsdp2_shards_match_one_process_and_reshard_through_checkpoints(tmp_path):
    one = _sharded_steps(str(tmp_path / "one"), save=True)
    two = run_on_ranks(_sharded_steps, 2, str(tmp_path / "two"), True)[0]
    _assert_same_training(two, one)
    # A checkpoint written on 2 ranks resumes on 1 process (and the reverse) and trains on the same way.
    _assert_same_training(_sharded_steps(str(tmp_path / "two"), save=False), one)
    _assert_same_training(run_on_ranks(_sharded_steps, 2, str(tmp_path / "one"), False)[0], one)
