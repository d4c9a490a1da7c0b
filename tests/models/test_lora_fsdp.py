"""LoRA under FSDP2 on 2 gloo ranks equals one process: same adapter weights after training, frozen
base weights untouched, and merging on the sharded model gives the unmerged outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig, parallelize_llama
from models.peft import LoraConfig, LoRALinear, apply_lora, merge_lora, unmerge_lora
from tests.distributed import run_on_ranks

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128, max_seq_len=32)
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["wq", "wk", "wv", "wo", "w1"])
STEPS, BATCH = 4, 4


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _numpy(tree):
    """Tensors as numpy arrays: they cross the process boundary by value, not by shared memory."""
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return [_numpy(v) for v in tree]
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree


def _train(world_size: int) -> dict:
    """Train the adapters for a few AdamW steps; each rank takes its slice of the same global batch."""
    mesh = None
    rank = 0
    if world_size > 1:
        torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama(CFG)
    apply_lora(model, LORA)
    base = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad}
    model = parallelize_llama(model, mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    local = BATCH // world_size
    for _ in range(STEPS):
        tokens = torch.randint(0, CFG.vocab_size, (BATCH, 17), generator=generator)[rank * local : (rank + 1) * local]
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = {n: _full(p) for n, p in model.named_parameters()}  # before any merge (which rounds)
    probe = torch.randint(0, CFG.vocab_size, (2, 9), generator=generator)
    model.eval()
    with torch.no_grad():
        unmerged = model(probe)
        merge_lora(model)
        merged = model(probe)
        unmerge_lora(model)
        restored = model(probe)
    return _numpy({
        "adapters": {n: t for n, t in params.items() if n.endswith((".lora_A", ".lora_B"))},
        "base_changed": [n for n, t in base.items() if not torch.equal(params[n], t)],
        "outputs": (unmerged, merged, restored),
        "n_adapted": sum(isinstance(m, LoRALinear) for m in model.modules()),
    })


def _tensors(tree):
    if isinstance(tree, dict):
        return {k: _tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tensors(v) for v in tree]
    return torch.from_numpy(tree) if hasattr(tree, "dtype") and hasattr(tree, "shape") else tree


def test_lora_training_under_fsdp2_equals_one_process():
    single = _tensors(_train(1))
    sharded = [_tensors(r) for r in run_on_ranks(_train, 2, 2)]
    assert single["n_adapted"] == CFG.n_layers * 5
    for result in (single, *sharded):
        assert result["base_changed"] == []
        unmerged, merged, restored = result["outputs"]
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(restored, unmerged, rtol=1e-6, atol=1e-6)
    assert set(sharded[0]["adapters"]) == set(single["adapters"])
    moved = 0
    for name, want in single["adapters"].items():
        got = sharded[0]["adapters"][name]
        # atol: Adam divides tiny early gradients of A (B starts at 0) by their own rms, which
        # amplifies summation-order rounding to ~1e-6 of weights of size ~0.1.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
        moved += name.endswith("lora_B") and want.abs().max() > 0
    assert moved == CFG.n_layers * 5  # every B left zero: the adapters really trained
    torch.testing.assert_close(sharded[0]["outputs"][0], single["outputs"][0], rtol=1e-5, atol=1e-5)
