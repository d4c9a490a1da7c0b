"""GaLore AdamW against the reference package `galore_torch` (step for step) and the paper's invariants."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from models.llama import Llama, LlamaConfig
from optim.builder import OptimizerConfig, build_optimizer
from optim.config import GaLoreConfig
from optim.galore import ProjectedAdamW
from optim.projector import ShardedProjection, projector_from_svd, side_for

galore_torch = pytest.importorskip("galore_torch")

# wk/wv (32 x 64) and w2 (64 x 96) take GaLore's left projector, wq/wo/w1/w3 the right one.
TINY = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, vocab_size=97, max_seq_len=32)


def galore_config(**galore) -> OptimizerConfig:
    return OptimizerConfig(
        name="galore", lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, galore=GaLoreConfig(**galore)
    )


def reference_optimizer(model, reference, ours: ProjectedAdamW, cfg: OptimizerConfig):
    """galore_torch.GaLoreAdamW over `reference` (a copy of `model`) with our groups and decay."""
    twin = {id(mine): theirs for mine, theirs in zip(model.parameters(), reference.parameters())}
    groups = []
    for group in ours.param_groups:
        ref = {"params": [twin[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
        if group["projected"]:
            ref.update(
                rank=cfg.galore.rank,
                update_proj_gap=cfg.galore.update_proj_gap_steps,
                scale=cfg.galore.scale,
                proj_type="std",
            )
        groups.append(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def step_both(models, optimizers, tokens):
    for model, optimizer in zip(models, optimizers):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_matches_galore_torch_step_for_step_across_a_projector_refresh():
    torch.manual_seed(0)
    model = Llama(TINY)
    reference = copy.deepcopy(model)
    cfg = galore_config(rank=8, update_proj_gap_steps=7, scale=0.25, align_signs=False)
    ours = build_optimizer(cfg, model)
    assert isinstance(ours, ProjectedAdamW)
    assert sum(len(g["params"]) for g in ours.param_groups if g["projected"]) == 2 * 7
    theirs = reference_optimizer(model, reference, ours, cfg)
    generator = torch.Generator().manual_seed(1)
    for step in range(20):  # SVDs at steps 0, 7 and 14
        tokens = torch.randint(0, TINY.vocab_size, (4, 17), generator=generator)
        step_both((model, reference), (ours, theirs), tokens)
        for (name, mine), want in zip(model.named_parameters(), reference.parameters()):
            rel = (mine - want).norm() / want.norm()
            assert rel <= 1e-6, (step, name, rel.item())
    # The moments live in the projected space: m x r (right projector) or r x n (left).
    for name, param in model.named_parameters():
        if name.endswith("attention.wk.weight"):
            assert ours.state[param]["exp_avg"].shape == (8, 64)
        if name.endswith("feed_forward.w1.weight"):
            assert ours.state[param]["exp_avg"].shape == (96, 8)


def test_full_rank_projection_round_trips_to_scale_times_gradient():
    # GaLore paper Sec. 3.3 / dossier 1.6: with r = min(m, n) the projector is a complete basis.
    torch.manual_seed(0)
    for shape in ((12, 5), (5, 12)):
        grad = torch.randn(shape)
        param = torch.nn.Parameter(torch.zeros(shape))
        side = side_for(shape)
        projection = ShardedProjection(param, projector_from_svd(grad, min(shape), side), side, scale=0.5)
        _, low = projection.project(grad)
        torch.testing.assert_close(projection.project_back(projection.gather(low)), 0.5 * grad, atol=1e-5, rtol=1e-5)


def test_svd_runs_exactly_at_steps_0_T_2T(monkeypatch):
    import optim.projector as projector

    calls = []
    real = projector.projector_from_svd

    def counting(grad, rank, side, previous=None):
        calls.append(optimizer_steps[0])
        return real(grad, rank, side, previous)

    monkeypatch.setattr(projector, "projector_from_svd", counting)
    torch.manual_seed(0)
    model = Llama(TINY)
    optimizer = build_optimizer(galore_config(rank=4, update_proj_gap_steps=3), model)
    optimizer_steps = [0]
    tokens = torch.randint(0, TINY.vocab_size, (2, 9))
    for step in range(7):
        optimizer_steps[0] = step
        step_both((model,), (optimizer,), tokens)
    projected = sum(len(g["params"]) for g in optimizer.param_groups if g["projected"])
    assert sorted(set(calls)) == [0, 3, 6]
    assert len(calls) == 3 * projected


def test_refreshed_basis_vectors_keep_the_sign_of_those_they_replace():
    generator = torch.Generator().manual_seed(0)
    for shape in ((20, 9), (9, 20)):
        grad = torch.randn(shape, generator=generator)
        side = side_for(shape)
        raw = projector_from_svd(grad, 4, side)
        flips = torch.tensor([1.0, -1.0, -1.0, 1.0])
        previous = raw * (flips if side == "left" else flips.unsqueeze(1))
        torch.testing.assert_close(projector_from_svd(grad, 4, side, previous), previous)
        torch.testing.assert_close(projector_from_svd(grad, 4, side, raw), raw)


def test_plain_adam_in_row_chunks_gives_the_same_numbers_as_in_one_piece(monkeypatch):
    """The unprojected parameters (embeddings, norms) are updated a block of rows at a time."""
    import optim.galore as galore

    results = []
    for chunk in (10**9, 7):  # one piece; blocks of one row of 7 (and a ragged last block)
        monkeypatch.setattr(galore, "CHUNK_ELEMENTS", chunk)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(11, 7)), torch.nn.Parameter(torch.randn(5))]
        optimizer = ProjectedAdamW(
            [{"params": params, "weight_decay": 0.1}],
            lr=0.01,
            betas=(0.9, 0.99),
            eps=1e-8,
            reset_every_steps=2,
            reset_warmup_steps=2,
        )
        generator = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for one_piece, chunked in zip(*results):
        assert torch.equal(one_piece, chunked)
