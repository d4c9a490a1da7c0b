"""`parallelize_llama`: activation checkpointing and FSDP2 change no numbers and no names."""

from __future__ import annotations

import copy
import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import get_model_spec
from models.llama import Llama, LlamaConfig, parallelize_llama

CFG = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=160, max_seq_len=32)


def _loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return loss.detach(), grads


def _count_feed_forward_calls(model: torch.nn.Module) -> list[int]:
    """Count entries into the blocks' MLPs (a pre-hook: recomputation stops as soon as the last
    saved tensor is rebuilt, inside the MLP, so its post-forward hooks do not run again)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for layer in model.layers:
        layer.feed_forward.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("tied", [False, True])
def test_activation_checkpointing_keeps_loss_grads_and_names(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    torch.manual_seed(0)
    plain = Llama(cfg)
    checkpointed = parallelize_llama(copy.deepcopy(plain), None, activation_checkpointing=True)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    calls = _count_feed_forward_calls(checkpointed)
    loss, grads = _loss_and_grads(plain, tokens)
    ac_loss, ac_grads = _loss_and_grads(checkpointed, tokens)
    assert calls[0] == 2 * cfg.n_layers  # each block ran again in backward: it was checkpointed
    assert torch.equal(loss, ac_loss)
    for name in grads:
        assert torch.equal(grads[name], ac_grads[name]), name


def test_no_mesh_no_checkpointing_is_identity():
    model = Llama(CFG)
    calls = _count_feed_forward_calls(model)
    assert parallelize_llama(model, None) is model
    _loss_and_grads(model, torch.randint(0, CFG.vocab_size, (2, 9)))
    assert calls[0] == CFG.n_layers
    assert get_model_spec("llama").parallelize is parallelize_llama


@pytest.fixture
def one_rank_mesh():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_on_one_rank_matches_plain_model(one_rank_mesh, tied):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    torch.manual_seed(0)
    plain = Llama(cfg)
    sharded = parallelize_llama(copy.deepcopy(plain), one_rank_mesh, activation_checkpointing=True)
    assert isinstance(sharded, FSDPModule) and all(isinstance(b, FSDPModule) for b in sharded.layers)
    assert list(sharded.state_dict()) == list(plain.state_dict())
    assert list(get_model_state_dict(sharded)) == list(plain.state_dict())
    assert sum(1 for _ in sharded.parameters()) == sum(1 for _ in plain.parameters())

    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    loss, grads = _loss_and_grads(plain, tokens)
    fsdp_loss, fsdp_grads = _loss_and_grads(sharded, tokens)
    torch.testing.assert_close(fsdp_loss, loss, atol=0, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(fsdp_grads[name], grads[name], atol=1e-7, rtol=1e-5, msg=name)
