"""SpIEL drop/regrow: the published schedule (SftSelector), exact density at every step, AG's
support and Adam seeding against dense-gradient oracles, SM3's accumulator rule, and exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig
from models.peft.sparse_config import SpielConfig
from models.peft.sparse_delta import (
    apply_sparse_deltas,
    merge_and_unload_sparse,
    sparse_delta_modules,
)
from optim.sparse_select import (
    SpielSelector,
    capture_active,
    drop_and_grow,
    reselection_rate,
    selection_steps,
    sm3_accumulate,
)

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=16)


class _Ctx:
    optimizer = None


def test_schedule_matches_sft_selector_pseudocode():
    cfg = SpielConfig(reselection_steps=20, selection_accumulation_steps=5, initial_reselection_rate=0.2)
    assert selection_steps(100, 20, 5) == [5, 25, 45, 65, 85]
    assert reselection_rate(5, 100, cfg) == 1.0
    for t in (25, 45, 65, 85):
        assert reselection_rate(t, 100, cfg) == pytest.approx(0.2 * (1 - t / 100))
    cosine = SpielConfig(reselection_rate_policy="cosine")
    assert reselection_rate(25, 100, cosine) == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.25)) / 2)
    # Oracle: simulate SftSelector's begin/end events ((t + 1) % R == 0 begins, t % R == A ends).
    active, expected = True, []
    for t in range(100):
        expected.append(active)
        step = t + 1
        if (step + 1) % 20 == 0:
            active = True
        if step % 20 == 5:
            active = False
    assert [capture_active(t, 20, 5) for t in range(100)] == expected


def test_drop_and_grow_bookkeeping():
    indices = torch.tensor([10, 11, 12, 13, 14])
    values = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.9])
    candidates = torch.tensor([11, 20, 21, 22, 10])
    scores = torch.tensor([9.0, 1.0, 5.0, 0.5, 7.0])
    slots, positions = drop_and_grow(indices, values, candidates, scores, 3)
    # Drop: slots 1, 3, 2 (|v| 0.01, 0.02, 0.3). Eligible: 11 (dropped), 20, 21, 22 (10 is still active).
    # Grow top 3: 11, 21, 20. 11 is dropped and regrown -> kept; pair slots 3, 2 with 21, 20.
    assert slots.tolist() == [3, 2] and positions.tolist() == [21, 20]
    assert drop_and_grow(indices, values, candidates, scores, 0)[0].numel() == 0


def test_sm3_accumulate_matches_elementwise_loop():
    torch.manual_seed(0)
    rows, cols = torch.rand(4), torch.rand(5)
    indices, grad = torch.tensor([0, 7, 12, 19, 6]), torch.randn(5)
    ref_rows, ref_cols = rows.clone(), cols.clone()
    nus = [min(rows[i // 5], cols[i % 5]) + g**2 for i, g in zip(indices.tolist(), grad)]
    for i, nu in zip(indices.tolist(), nus):
        ref_rows[i // 5] = max(ref_rows[i // 5], nu)
        ref_cols[i % 5] = max(ref_cols[i % 5], nu)
    sm3_accumulate(rows, cols, indices, grad, 5)
    torch.testing.assert_close(rows, ref_rows)
    torch.testing.assert_close(cols, ref_cols)


def _setup(selection="ag", steps=12, seed=0):
    torch.manual_seed(seed)
    model = Llama(CFG)
    cfg = SpielConfig(density=0.02, selection=selection, reselection_steps=4, selection_accumulation_steps=2, initial_reselection_rate=0.5)
    apply_sparse_deltas(model, cfg, seed=seed)
    ctx = _Ctx()
    selector = SpielSelector(model, cfg, total_steps=steps, ctx=ctx)
    ctx.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    return model, selector, ctx.optimizer, cfg


def _batch(step):
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(100 + step))


def _train_step(model, optimizer, selector, step):
    tokens = _batch(step)
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()
    selector(step + 1)


def _dense_grads(model, step):
    """Oracle: the dense weight gradients of a plain model with W + scatter(delta) merged."""
    names = [name for name, _ in sparse_delta_modules(model)]
    observers = {name: m.grad_observer for name, m in sparse_delta_modules(model)}
    for _, m in sparse_delta_modules(model):
        m.grad_observer = None
    dense = merge_and_unload_sparse(copy.deepcopy(model))
    for name, m in sparse_delta_modules(model):
        m.grad_observer = observers[name]
    modules = {name: dense.get_submodule(name) for name in names}
    for module in modules.values():
        module.weight.requires_grad_(True)
    tokens = _batch(step)
    F.cross_entropy(dense(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {name: m.weight.grad.flatten().clone() for name, m in modules.items()}


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_density_exact_and_support_changes_only_on_schedule(selection):
    model, selector, optimizer, cfg = _setup(selection)
    modules = dict(sparse_delta_modules(model))
    ks = {n: m.k for n, m in modules.items()}
    for step in range(12):
        before = {n: m.delta_indices.clone() for n, m in modules.items()}
        _train_step(model, optimizer, selector, step)
        t = step + 1
        changed = 0
        for name, m in modules.items():
            assert m.k == ks[name] and m.delta_indices.unique().numel() == ks[name]
            assert optimizer.state[m.delta_values]["exp_avg"].numel() == ks[name]
            moved = ~torch.isin(m.delta_indices, before[name])
            changed += int(moved.sum())
            assert (m.delta_values[moved] == 0).all()
            if t in selection_steps(12, 4, 2):
                assert int(moved.sum()) <= math.floor(reselection_rate(t, 12, cfg) * ks[name])
        assert (changed > 0) == (t in (2, 6, 10)), t
        if t in selector.replaced:
            assert selector.replaced[t] == changed


def test_ag_regrows_top_accumulated_gradient_and_seeds_adam():
    model, selector, optimizer, _ = _setup("ag")
    modules = dict(sparse_delta_modules(model))
    sums = {}
    first = None
    initial = {n: m.delta_indices.clone() for n, m in modules.items()}
    for step in range(2):  # the first window: updates 1 and 2, selection after update 2 with p = 1
        grads = _dense_grads(model, step)
        first = first or grads
        _train_step(model, optimizer, selector, step)
        sums[step] = grads
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    for name, m in modules.items():
        candidates = torch.topk(first[name].abs(), m.k).indices  # window's first micro-batch
        g = sums[0][name][candidates] + sums[1][name][candidates]
        g2 = sums[0][name][candidates] ** 2 + sums[1][name][candidates] ** 2
        assert set(m.delta_indices.tolist()) == set(candidates.tolist())
        order = {p: i for i, p in enumerate(candidates.tolist())}
        moved = ~torch.isin(m.delta_indices, initial[name])  # regrown slots (a kept position keeps its state)
        rows = [order[p] for p in m.delta_indices[moved].tolist()]
        state = optimizer.state[m.delta_values]
        assert moved.sum() > m.k // 2
        torch.testing.assert_close(state["exp_avg"][moved], (g[rows] / 2) * (1 - beta1**2), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"][moved], (g2[rows] / 2) * (1 - beta2**2), rtol=1e-4, atol=1e-12)


def test_resume_from_state_dicts_is_exact():
    straight, sel_a, opt_a, _ = _setup("ag")
    for step in range(12):
        _train_step(straight, opt_a, sel_a, step)
    first, sel_b, opt_b, _ = _setup("ag")
    for step in range(5):  # stop inside the window of updates 4..6
        _train_step(first, opt_b, sel_b, step)
    saved = copy.deepcopy((first.state_dict(), opt_b.state_dict(), sel_b.state_dict()))
    resumed, sel_c, opt_c, _ = _setup("ag", seed=0)
    resumed.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    sel_c.load_state_dict(saved[2])
    for step in range(5, 12):
        _train_step(resumed, opt_c, sel_c, step)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_ma_regrows_top_sm3_row_col_product_among_inactive_positions():
    model, selector, optimizer, cfg = _setup("ma")
    modules = dict(sparse_delta_modules(model))
    rows = {n: torch.zeros(m.out_features) for n, m in modules.items()}  # oracle accumulators, elementwise
    cols = {n: torch.zeros(m.in_features) for n, m in modules.items()}
    for step in range(12):
        before = {n: m.delta_indices.clone() for n, m in modules.items()}
        tokens = _batch(step)
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for name, m in modules.items():
            nus = []
            for i, g in zip(m.delta_indices.tolist(), m.delta_values.grad.tolist()):
                nus.append((i, min(rows[name][i // m.in_features], cols[name][i % m.in_features]) + g * g))
            for i, nu in nus:
                rows[name][i // m.in_features] = max(rows[name][i // m.in_features], nu)
                cols[name][i % m.in_features] = max(cols[name][i % m.in_features], nu)
        optimizer.step()
        optimizer.zero_grad()
        selector(step + 1)
        t = step + 1
        for name, m in modules.items():
            incoming = m.delta_indices[~torch.isin(m.delta_indices, before[name])]
            if t not in selection_steps(12, 4, 2):
                assert incoming.numel() == 0
                continue
            n = math.floor(reselection_rate(t, 12, cfg) * m.k)
            assert incoming.numel() == n, (t, name)
            scores = torch.outer(rows[name], cols[name]).flatten()
            scores[before[name]] = -1.0
            torch.testing.assert_close(scores[incoming].sort().values, scores.topk(n).values.sort().values)
