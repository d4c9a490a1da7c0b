"""SpIEL under FSDP2 on 2 gloo ranks equals one process: same supports after every re-selection,
same delta values within 1e-5 relative, frozen weights untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig, parallelize_llama
from models.peft.sparse_config import SpielConfig
from models.peft.sparse_delta import (
    apply_sparse_deltas,
    sparse_delta_modules,
    sparse_deltas,
)
from optim.sparse_select import SpielSelector
from tests.distributed import run_on_ranks

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=16)
STEPS, BATCH = 8, 4
SELECTIONS = ["ag", "ma"]  # SpIEL-AG (accumulated gradients) and SpIEL-MA (SM3 momenta)


class _Ctx:
    optimizer = None


def _train(world_size: int, selection: str) -> dict:
    mesh, rank = None, 0
    if world_size > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        rank = torch.distributed.get_rank()
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world_size,))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama(CFG)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SpielConfig(density=0.02, selection=selection, reselection_steps=4, selection_accumulation_steps=2, initial_reselection_rate=0.5)
    apply_sparse_deltas(model, cfg, seed=0)
    ctx = _Ctx()
    selector = SpielSelector(model, cfg, total_steps=STEPS, ctx=ctx)
    model = parallelize_llama(model, mesh)
    ctx.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    local = BATCH // world_size
    supports = []
    for step in range(STEPS):
        tokens = torch.randint(0, CFG.vocab_size, (BATCH, 13), generator=generator)[rank * local : (rank + 1) * local]
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        ctx.optimizer.step()
        ctx.optimizer.zero_grad()
        selector(step + 1)
        supports.append({n: m.delta_indices.clone().numpy() for n, m in sparse_delta_modules(model)})
    deltas = {n: (i.numpy(), v.numpy()) for n, (i, v, _) in sparse_deltas(model).items()}
    frozen_changed = [
        n for n, p in model.named_parameters()
        if n in base and not torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p.detach(), base[n])
    ]
    return {"supports": supports, "deltas": deltas, "frozen_changed": frozen_changed, "replaced": dict(selector.replaced)}


def _train_each(world_size: int, selections: list[str]) -> dict:
    """`_train` for every selection in turn, in this process: selection -> result."""
    return {selection: _train(world_size, selection) for selection in selections}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Both selections trained on 2 gloo ranks, in one launch: per rank, selection -> result."""
    return run_on_ranks(_train_each, 2, 2, SELECTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("selection", SELECTIONS)
def test_spiel_two_ranks_equal_one_process(selection, two_ranks):
    single = _train(1, selection)
    ranks = [results[selection] for results in two_ranks]
    assert single["frozen_changed"] == []
    assert sum(single["replaced"].values()) > 0
    for result in ranks:
        assert result["frozen_changed"] == []
        assert result["replaced"] == single["replaced"]
        for step, (ours, theirs) in enumerate(zip(result["supports"], single["supports"])):
            for name in theirs:
                assert (ours[name] == theirs[name]).all(), (step, name)
        for name, (indices, values) in single["deltas"].items():
            got_indices, got_values = result["deltas"][name]
            assert (got_indices == indices).all()
            torch.testing.assert_close(torch.from_numpy(got_values), torch.from_numpy(values), rtol=1e-5, atol=1e-7)
