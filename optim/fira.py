"""Fira's full-rank residual (Chen et al. 2024, arXiv 2410.01623, Sec. 4; reference `fira_adamw.py`).

GaLore drops the part of the gradient outside its rank-r subspace. Fira adds it back, scaled:

1. norm-based scaling: phi = ||psi(R)|| / (||R|| + 1e-8), the norms taken over the rank dimension
   (one factor per row of W in the right-projection case, per column in the left case), and the
   residual S = (G - projback(R)) * phi. As in the reference, `projback` includes GaLore's scale,
   so with scale != 1 the residual keeps (1 - scale) of the in-subspace gradient;
2. norm-growth limiter: ||S_t|| may grow by at most a factor gamma over ||S_{t-1}|| (gamma = 1.01,
   Fira Sec. 4.3); S_t is divided by max(||S_t|| / ||S_{t-1}||, gamma) / gamma.

Both work on FSDP2 row shards: the factors come from tensors that `ShardedProjection` already
holds in full where they are needed, and the Frobenius norm of S is summed over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from optim.projector import ShardedProjection

SCALE_EPS = 1e-8  # fira_adamw.py: denominators of the scaling factor and of the limiter
UNSET = -1.0  # residual-norm state before the first Fira step (norms are never negative)


def scaled_residual(grad_rows: Tensor, low: Tensor, update_low: Tensor, projection: ShardedProjection) -> Tensor:
    """S for this rank's rows: (G - projback(R)) times phi = ||psi(R)|| / ||R|| over the rank dim.

    `low` is R and `update_low` is psi(R) = M / (sqrt(V) + eps), both as `ShardedProjection`
    hands them to the back-projection (this rank's rows of R, or the whole of R).
    """
    norm_dim = 1 if projection.side == "right" else 0
    phi = update_low.norm(dim=norm_dim) / (low.norm(dim=norm_dim) + SCALE_EPS)
    if norm_dim == 1:
        phi = phi.unsqueeze(1)
    return (grad_rows - projection.project_back(low)) * phi


def limit_growth(residual: Tensor, previous_norm: Tensor, gamma: float, group) -> Tensor:
    """Divide `residual` so that its norm grows by at most `gamma`; updates `previous_norm` in place.

    `group` is the process group over which the rows of `residual` are spread (None: all here).
    """
    squared = residual.pow(2).sum()
    if group is not None:
        dist.all_reduce(squared, group=group)
    norm = squared.sqrt()
    if previous_norm.item() == UNSET:
        previous_norm.copy_(norm)
        return residual
    limiter = torch.clamp(norm / (previous_norm + SCALE_EPS), min=gamma) / gamma
    previous_norm.copy_(norm / limiter)
    return residual / limiter
