"""GaLore's gradient projector, on whole matrices or on FSDP2 row shards (`DTensor`, `Shard(0)`).

GaLore (Zhao et al. 2024, arXiv 2403.03507, Alg. 2; reference `galore_torch/galore_projector.py`,
`proj_type="std"`) projects the gradient G (m x n) of a matrix onto a rank-r subspace taken from
the thin SVD of G, computed in float32 every `update_proj_gap` steps:

* m >= n: right projector P = Vh[:r] (r x n); R = G P^T (m x r); back: scale * N P;
* m <  n: left projector  P = U[:, :r] (m x r); R = P^T G (r x n); back: scale * P N.

Under FSDP2 each rank holds a block of rows of G. The right case is row-local: R's rows are the
rank's rows, so the moments (shaped like R) are sharded the same way and no step needs a
collective. In the left case R = sum over ranks of P_rows^T G_rows: one all-reduce of r x n per
step; the moments are then sharded by columns (`Shard(1)`) and N's columns are gathered once for
the back-projection. Only a refresh step sees the whole gradient: it is gathered one matrix at a
time, one rank (round-robin) computes the SVD and broadcasts P, so every rank holds the same
replicated projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local(tensor: Tensor) -> Tensor:
    """This rank's part of `tensor` (the tensor itself when it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class Layout:
    """Where this rank's rows of a parameter sit; `mesh` is None for an unsharded parameter."""

    mesh: object | None
    rows: slice

    @property
    def sharded(self) -> bool:
        return self.mesh is not None


def layout_of(param: Tensor) -> Layout:
    """The row block of `param` this rank holds (all rows for a plain tensor)."""
    if not isinstance(param, DTensor):
        return Layout(mesh=None, rows=slice(0, param.shape[0]))
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0 (FSDP2), got placements {param.placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return Layout(mesh=param.device_mesh, rows=slice(offset[0], offset[0] + shape[0]))


def sharded_like(local_tensor: Tensor, layout: Layout, dim: int, global_shape: tuple[int, ...]) -> Tensor:
    """Wrap `local_tensor` as the `Shard(dim)` part of a `global_shape` DTensor (as is when unsharded)."""
    if not layout.sharded:
        return local_tensor
    stride = torch.empty(global_shape, device="meta").stride()
    return DTensor.from_local(
        local_tensor, layout.mesh, [Shard(dim)], run_check=False, shape=torch.Size(global_shape), stride=stride
    )


def column_slice(layout: Layout, shape: tuple[int, int]) -> slice:
    """This rank's columns of a `shape` matrix sharded on dim 1 (all columns when unsharded)."""
    if not layout.sharded:
        return slice(0, shape[1])
    local_shape, offset = compute_local_shape_and_global_offset(torch.Size(shape), layout.mesh, [Shard(1)])
    return slice(offset[1], offset[1] + local_shape[1])


def side_for(shape: torch.Size | tuple[int, ...]) -> str:
    """Which side GaLore projects: "right" when rows >= cols, else "left" (galore_projector.py, std)."""
    return "right" if shape[0] >= shape[1] else "left"


def projector_from_svd(full_grad: Tensor, rank: int, side: str, previous: Tensor | None = None) -> Tensor:
    """P from the thin SVD of the whole gradient, in the gradient's dtype.

    The SVD runs in float32 for 16-bit gradients (as the reference) and in float64 for float64 ones.
    LAPACK returns U and Vh column-major; P keeps that layout (as the reference's views do, so the
    matmuls round the same way) but owns compact storage of its own r columns or rows only.

    With `previous` (the projector being replaced) each new basis vector's sign is flipped where
    needed to point the same way as the old one (`align_signs`; see `GaLoreConfig`).
    """
    matrix = full_grad if full_grad.dtype == torch.float64 else full_grad.float()
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    basis = vh[:rank, :] if side == "right" else u[:, :rank]
    if previous is not None and previous.shape == basis.shape:
        vector_dim = 1 if side == "right" else 0
        agreement = (basis * previous.to(basis.dtype)).sum(dim=vector_dim, keepdim=True)
        basis = basis * torch.where(agreement < 0, -1.0, 1.0).to(basis.dtype)
    return basis.to(full_grad.dtype).t().contiguous().t()


def refresh_projectors(items: list[tuple[Tensor, int, str, Tensor | None]]) -> list[Tensor]:
    """New projectors for `(param, rank, side, previous projector or None)` items, from whole gradients.

    Sharded gradients are gathered one at a time; rank `i % world` computes item i's SVD and
    broadcasts it, which spreads the SVDs over ranks and keeps the projector identical on all.
    """
    out = []
    for index, (param, rank, side, previous) in enumerate(items):
        grad = param.grad
        if not isinstance(grad, DTensor):
            out.append(projector_from_svd(grad, rank, side, previous))
            continue
        group = param.device_mesh.get_group()
        owner = index % dist.get_world_size(group)
        full = grad.full_tensor()
        m, n = full.shape
        keep = min(rank, m, n)
        if dist.get_rank(group) == owner:
            transposed = projector_from_svd(full, rank, side, previous).t()  # contiguous: P is column-major
        else:
            transposed = torch.empty((n, keep) if side == "right" else (keep, m), dtype=full.dtype, device=full.device)
        del full
        dist.broadcast(transposed, group=group, group_src=owner)
        out.append(transposed.t())
    return out


class ShardedProjection:
    """Project this rank's gradient rows and map projected updates back to its weight rows."""

    def __init__(self, param: Tensor, projector: Tensor, side: str, scale: float):
        self.layout = layout_of(param)
        self.shape = tuple(param.shape)
        self.projector = projector
        self.side = side
        self.scale = scale
        rank = projector.shape[0] if side == "right" else projector.shape[1]
        m, n = self.shape
        self.projected_shape = (m, rank) if side == "right" else (rank, n)
        # The moments' sharded dim: rows in the right case, columns of R in the left case.
        self.moment_dim = 0 if side == "right" else 1
        self.columns = column_slice(self.layout, self.projected_shape) if side == "left" else None

    def project(self, grad_rows: Tensor) -> tuple[Tensor, Tensor]:
        """(R for the moments on this rank, R needed by the back-projection: rows or the whole of it)."""
        if self.side == "right":
            low = grad_rows @ self.projector.t()
            return low, low
        low = self.projector[self.layout.rows].t() @ grad_rows
        if self.layout.sharded:
            dist.all_reduce(low, group=self.layout.mesh.get_group())
        return low[:, self.columns], low

    def gather(self, low_local: Tensor) -> Tensor:
        """What `project_back` needs of a projected tensor held as this rank's moment shard."""
        if self.side == "right" or not self.layout.sharded:
            return low_local
        return sharded_like(low_local.contiguous(), self.layout, 1, self.projected_shape).full_tensor()

    def project_back(self, low: Tensor) -> Tensor:
        """scale * (N P) or scale * (P N) for this rank's rows; `low` as returned by `gather`."""
        if self.side == "right":
            return (low @ self.projector) * self.scale
        return (self.projector[self.layout.rows] @ low) * self.scale
