"""Low-rank training: chosen weights become W = s * B A, trained from scratch, with refactorization.

The model transform `apply_lowrank` replaces the `nn.Linear` modules named by
`optimizer.lowrank.target_patterns` by `LowRankLinear`: y = s * B (A x), B (out x r), A (r x in),
s = alpha / r, both factors Kaiming-uniform (a = sqrt 5) as the low-rank layer benchmarked by
Glentis et al. 2025 (arXiv 2505.22922; reference `pt_low_rank/low_rank_model.py`). A layer is
left dense where r (out + in) >= out * in, since factors would not be smaller.

Weight refactorization (Glentis et al. Sec. 4, Lemma 4.1; reference `SpLoRaLinear.merge_and_reinit`)
rebalances the factors without changing their product: with B A = U S V^T (thin SVD, rank r),
B <- U sqrt(S), A <- sqrt(S) V^T. It is computed from QR factors and an r x r SVD rather than the
SVD of the m x n product, which gives the same factors at O((m + n) r^2) cost. `ProjectedAdamW`
calls it on its period (`optimizer.lowrank.refactor_every_steps`) together with momentum reset.
On FSDP2 every rank gathers the two factors, computes the same balanced pair and keeps its rows.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from optim.projector import layout_of, local

DEFAULT_TARGETS = ["*.attention.*", "*.feed_forward.*"]  # module names; see optim/galore.py


@dataclass(kw_only=True)
class LowRankConfig:
    """Factorised weights W = (alpha / rank) B A; off while `rank` is 0."""

    rank: int = 0  # r of the factors; 0 keeps the model dense
    alpha: float = 32.0  # s = alpha / rank (reference default lora_alpha 32, scripts/60m_low_rank.sh)
    # Name globs (fnmatch, on module names) of the nn.Linear modules to factorise.
    target_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Rebalance B, A every this many optimizer steps; 0 = never (Glentis et al.: 200).
    refactor_every_steps: int = 0

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lowrank.rank: must be 0 (off) or positive, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lowrank.alpha: must be positive, got {self.alpha}")
        if not self.target_patterns:
            raise ValueError("lowrank.target_patterns: must name at least one pattern, got []")
        if self.refactor_every_steps < 0:
            raise ValueError(f"lowrank.refactor_every_steps: must be 0 or positive, got {self.refactor_every_steps}")


class LowRankLinear(nn.Module):
    """y = s * B (A x) without bias: a rank-`rank` replacement for a bias-free `nn.Linear`."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / rank
        self.factor_b = nn.Parameter(torch.empty(out_features, rank))
        self.factor_a = nn.Parameter(torch.empty(rank, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a = sqrt 5, nn.Linear's default) on both factors, as the reference."""
        nn.init.kaiming_uniform_(self.factor_b, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.factor_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.factor_a), self.factor_b) * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def worth_factorising(linear: nn.Linear, rank: int) -> bool:
    """Whether rank-`rank` factors hold fewer parameters than the dense weight."""
    out_features, in_features = linear.weight.shape
    return rank * (out_features + in_features) < out_features * in_features


def factorise(model: nn.Module, cfg: LowRankConfig) -> tuple[list[str], list[str]]:
    """Replace the matching bias-free linears in place; returns (factorised, left dense) names."""
    done, skipped = [], []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not any(fnmatch.fnmatchcase(name, p) for p in cfg.target_patterns):
            continue
        if module.bias is not None or not worth_factorising(module, cfg.rank):
            skipped.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(module.weight.device):
            replacement = LowRankLinear(module.in_features, module.out_features, cfg.rank, cfg.alpha)
        setattr(parent, child, replacement.to(module.weight.dtype))
        done.append(name)
    return done, skipped


def apply_lowrank(model: nn.Module, ctx) -> nn.Module:
    """Model transform: factorise the configured weights (returns `model` unchanged while rank is 0)."""
    cfg: LowRankConfig = ctx.cfg.optimizer.lowrank
    if cfg.rank == 0:
        return model
    before = sum(p.numel() for p in model.parameters())
    done, skipped = factorise(model, cfg)
    if not done:
        raise ValueError(f"optimizer.lowrank.target_patterns: no bias-free nn.Linear matches {cfg.target_patterns}")
    after = sum(p.numel() for p in model.parameters())
    note = f"; {len(skipped)} left dense (factors not smaller)" if skipped else ""
    ctx.log(
        f"wren: low-rank W = B A (rank {cfg.rank}, scale {cfg.alpha / cfg.rank:g}) on {len(done)} linears{note}: "
        f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters"
    )
    return model


def balanced_factors(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(U sqrt(S), sqrt(S) V^T) for the thin SVD U S V^T of b @ a, in float32, via QR of each factor."""
    q_b, r_b = torch.linalg.qr(b.float())
    q_a, r_a = torch.linalg.qr(a.float().t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    root = s.sqrt()
    return (q_b @ u) * root, root.unsqueeze(1) * (vh @ q_a.t())


def _full(param: Tensor) -> Tensor:
    return param.full_tensor() if isinstance(param, DTensor) else param


def _rows(param: Tensor) -> tuple[Tensor, slice]:
    return local(param), layout_of(param).rows


@torch.no_grad()
def refactorize(module: LowRankLinear) -> None:
    """Rebalance `module`'s factors in place (B A unchanged), on whole or FSDP2-sharded factors."""
    new_b, new_a = balanced_factors(_full(module.factor_b), _full(module.factor_a))
    for param, new in ((module.factor_b, new_b), (module.factor_a, new_a)):
        shard, rows = _rows(param)
        shard.copy_(new[rows].to(shard.dtype))
