"""Fira against a transcription of the reference update (xichen-fy/Fira, optimizer_torch/fira_adamw.py)."""

import math

import torch

from optim.galore import ProjectedAdamW

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-6, 0.01


def reference_fira(weight: torch.Tensor, grads: list[torch.Tensor], rank: int, gap: int, alpha: float) -> torch.Tensor:
    """The paper's update, written out from the reference's equations for one matrix (std projection)."""
    w = weight.clone()
    m = v = proj = prev_norm = None
    for step, grad in enumerate(grads, start=1):
        rows, cols = grad.shape
        if proj is None or (step - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            proj = vh[:rank] if rows >= cols else u[:, :rank]
        low = grad @ proj.t() if rows >= cols else proj.t() @ grad
        back = (lambda x: (x @ proj) * alpha) if rows >= cols else (lambda x: (proj @ x) * alpha)
        m = torch.zeros_like(low) if m is None else m
        v = torch.zeros_like(low) if v is None else v
        m = BETAS[0] * m + (1 - BETAS[0]) * low
        v = BETAS[1] * v + (1 - BETAS[1]) * low * low
        psi = m / (v.sqrt() + EPS)
        step_size = LR * math.sqrt(1 - BETAS[1] ** step) / (1 - BETAS[0] ** step)
        dim = 0 if psi.shape[0] < psi.shape[1] else 1
        phi = psi.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
        residual = (grad - back(low)) * (phi.unsqueeze(1) if dim == 1 else phi)
        norm = residual.norm()
        if prev_norm is not None:
            limiter = max(norm / (prev_norm + 1e-8), 1.01) / 1.01
            residual, norm = residual / limiter, norm / limiter
        prev_norm = norm
        w = w - step_size * (back(psi) + residual)
        w = w - LR * WD * w
    return w


def run_ours(weight: torch.Tensor, grads: list[torch.Tensor], rank: int, gap: int, alpha: float, fira: bool = True):
    param = torch.nn.Parameter(weight.clone())
    optimizer = ProjectedAdamW(
        [{"params": [param], "projected": True, "weight_decay": WD}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        rank=rank,
        update_proj_gap=gap,
        scale=alpha,
        fira_gamma=1.01 if fira else None,
        align_signs=False,
    )
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


def gradients(shape, steps=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # a growing gradient exercises the norm-growth limiter
    return [torch.randn(shape, generator=generator) * (1 + 0.3 * k) for k in range(steps)]


def test_matches_the_reference_update_on_both_projection_sides():
    for shape in ((24, 10), (10, 24)):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        grads = gradients(shape)
        want = reference_fira(weight, grads, rank=3, gap=4, alpha=0.25)
        got = run_ours(weight, grads, rank=3, gap=4, alpha=0.25)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_at_full_rank_with_unit_scale_fira_is_galore():
    # Dossier 2.1: r = min(m, n) and alpha = 1 leave no residual.
    shape = (12, 7)
    weight = torch.randn(shape)
    grads = gradients(shape, steps=5)
    fira = run_ours(weight, grads, rank=7, gap=2, alpha=1.0)
    galore = run_ours(weight, grads, rank=7, gap=2, alpha=1.0, fira=False)
    torch.testing.assert_close(fira, galore, rtol=1e-5, atol=1e-6)


def test_residual_norm_grows_at_most_gamma_per_step():
    shape = (16, 6)
    param = torch.nn.Parameter(torch.zeros(shape))
    optimizer = ProjectedAdamW(
        [{"params": [param], "projected": True, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        rank=2,
        update_proj_gap=100,
        scale=0.25,
        fira_gamma=1.01,
    )
    norms = []
    for grad in [g * 10**k for k, g in enumerate(gradients(shape, steps=4))]:  # 10x larger each step
        param.grad = grad
        optimizer.step()
        norms.append(optimizer.state[param]["residual_norm"].item())
    for before, after in zip(norms, norms[1:]):
        assert after <= 1.01 * before * (1 + 1e-6)
