"""The factorised layer y = s B (A x) [+ S x] and its memory-lean autograd function.

`LowRankLinear` replaces a bias-free `nn.Linear` (out x in) by factors B (out x r) and A (r x in),
scaled by s = alpha / r, and optionally a sparse part S with a fixed random support, as SLTrain
(Han et al., NeurIPS 2024, arXiv 2406.02214, Sec. 3; reference `andyjm3/SLTrain`,
`splora/splora_linear.py`): W = s B A + S, where the support (a `density` fraction of the out x in
entries, drawn once by `randperm` and sorted) is a buffer, and only its values are a parameter.

Memory: the dense W = s B A is never formed. Forward computes h = A x (rank r) and s B h; backward
recomputes h from x instead of saving it, so the layer keeps for backward exactly what a dense
linear keeps (its input x), not x plus h. The sparse part is applied as a dense out x in matrix
rebuilt on the fly from its values (SLTrain's reference does the same in its C++ kernel to avoid
storing W); that temporary lives for one layer at a time, as does the dense gradient of S from
which the support entries are gathered.

Initialisation: without a sparse part both factors are Kaiming-uniform (a = sqrt 5), as the
low-rank layer benchmarked by Glentis et al. 2025 (`pt_low_rank/low_rank_model.py`); with one,
SLTrain's: B = 0, A Kaiming-uniform (a = sqrt 5), S values U(-1/sqrt(in), 1/sqrt(in)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sparse_to_dense(values: Tensor, index: Tensor, shape: tuple[int, int]) -> Tensor:
    """The out x in matrix that holds `values` at the flat positions `index` and zeros elsewhere."""
    dense = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return dense.index_copy_(0, index, values).view(shape)


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LowRankSparseLinear(torch.autograd.Function):
    """y = s (x A^T) B^T [+ x S^T]; saves x (not x A^T) and recomputes x A^T in backward."""

    @staticmethod
    def forward(ctx, x, factor_a, factor_b, scaling, values, index, shape):
        dtype = _compute_dtype(x)  # under autocast, compute in its dtype as F.linear would
        with torch.autocast(x.device.type, enabled=False):
            x, a, b = x.to(dtype), factor_a.to(dtype), factor_b.to(dtype)
            y = F.linear(F.linear(x, a), b).mul_(scaling)
            if values is not None:
                values = values.to(dtype)
                y.add_(F.linear(x, sparse_to_dense(values, index, shape)))
        ctx.save_for_backward(x, a, b, values, index)
        ctx.scaling, ctx.shape = scaling, shape
        ctx.dtypes = (
            factor_a.dtype,
            factor_b.dtype,
            None if values is None else values.dtype,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, values, index = ctx.saved_tensors
        need_x, need_a, need_b, _, need_values, _, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = grad_values = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            flat_g, flat_x = (
                grad_y.reshape(-1, grad_y.shape[-1]),
                x.reshape(-1, x.shape[-1]),
            )
            grad_h = F.linear(grad_y, b.t()).mul_(ctx.scaling)  # d/dh of s B h
            if need_b:
                h = F.linear(flat_x, a)  # recomputed, not saved
                grad_b = (flat_g.t() @ h).mul_(ctx.scaling).to(ctx.dtypes[1])
            if need_a:
                grad_a = (grad_h.reshape(-1, grad_h.shape[-1]).t() @ flat_x).to(ctx.dtypes[0])
            if need_x:
                grad_x = F.linear(grad_h, a.t())
                if values is not None:
                    grad_x.add_(F.linear(grad_y, sparse_to_dense(values, index, ctx.shape).t()))
            if need_values:
                grad_values = (flat_g.t() @ flat_x).view(-1).index_select(0, index).to(ctx.dtypes[2])
        return grad_x, grad_a, grad_b, None, grad_values, None, None


class LowRankLinear(nn.Module):
    """y = s B (A x) [+ S x] without bias: a factorised replacement for a bias-free `nn.Linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        density: float = 0.0,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / rank
        self.factor_b = nn.Parameter(torch.empty(out_features, rank))
        self.factor_a = nn.Parameter(torch.empty(rank, in_features))
        self.nnz = sparse_count(out_features, in_features, density)
        if self.nnz:
            self.sparse_values = nn.Parameter(torch.empty(self.nnz))
            self.register_buffer("sparse_index", torch.empty(self.nnz, dtype=torch.long))
        else:
            self.register_parameter("sparse_values", None)
            self.register_buffer("sparse_index", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glentis et al.'s low-rank init, or SLTrain's when there is a sparse part (module docstring)."""
        nn.init.kaiming_uniform_(self.factor_a, a=math.sqrt(5))
        if self.sparse_values is None:
            nn.init.kaiming_uniform_(self.factor_b, a=math.sqrt(5))
            return
        nn.init.zeros_(self.factor_b)
        total = self.out_features * self.in_features
        device = self.sparse_index.device
        self.sparse_index.copy_(torch.randperm(total, device=device)[: self.nnz].sort().values)
        bound = 1 / math.sqrt(self.in_features)  # splora_linear.py: U(-1/sqrt(in), 1/sqrt(in))
        nn.init.uniform_(self.sparse_values, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return _LowRankSparseLinear.apply(
            x,
            self.factor_a,
            self.factor_b,
            self.scaling,
            self.sparse_values,
            self.sparse_index,
            (self.out_features, self.in_features),
        )

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The out x in matrix W = s B A (+ S) this layer applies, in float32."""
        weight = (self.factor_b.float() @ self.factor_a.float()) * self.scaling
        if self.sparse_values is not None:
            weight += sparse_to_dense(self.sparse_values.float(), self.sparse_index, weight.shape)
        return weight

    def matmul_params(self) -> int:
        """Multiply-adds per token of the layer as a model (the factors, plus one per support entry)."""
        return self.rank * (self.in_features + self.out_features) + self.nnz

    def extra_repr(self) -> str:
        sparse = f", sparse entries={self.nnz}" if self.nnz else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{sparse}"


def sparse_count(out_features: int, in_features: int, density: float) -> int:
    """Entries of S's support: int(density * out * in), as SLTrain's `_init_sparse_parameters`."""
    return int(density * out_features * in_features)
