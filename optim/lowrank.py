"""Low-rank training: chosen weights become W = s B A (+ S), trained from scratch, with refactorization.

The model transform `apply_lowrank` replaces the `nn.Linear` modules named by
`optimizer.lowrank.target_patterns` by `LowRankLinear` (`optim/lowrank_linear.py`): y = s B (A x),
B (out x r), A (r x in), s = alpha / r, as the low-rank layer benchmarked by Glentis et al. 2025
(arXiv 2505.22922; reference `pt_low_rank/low_rank_model.py`), plus, with `sparse_density` > 0,
SLTrain's sparse part S on a fixed random support (Han et al. 2024, arXiv 2406.02214). A layer is
left dense where its factors (and support) would not hold fewer entries than W.

Weight refactorization (Glentis et al. Sec. 4, Lemma 4.1; reference `SpLoRaLinear.merge_and_reinit`)
rebalances the factors without changing their product: with B A = U S V^T (thin SVD, rank r),
B <- U sqrt(S), A <- sqrt(S) V^T (S, the sparse part, is left alone). It is computed from QR
factors and an r x r SVD rather than the SVD of the m x n product, which gives the same factors
at O((m + n) r^2) cost and never forms an m x n matrix. `ProjectedAdamW` calls it on its period
(`optimizer.lowrank.refactor_every_steps`) together with momentum reset, one layer at a time.
On FSDP2 every rank gathers the two factors, computes the same balanced pair and keeps its rows.

`merge_low_rank` turns a factorised model back into plain linears W = s B A (+ S), for the Hugging
Face export; `factorised_flops_per_token` counts the training FLOPs of a factorised model for MFU.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from optim.config import LowRankConfig
from optim.lowrank_linear import LowRankLinear, sparse_count
from optim.projector import layout_of, local

def worth_factorising(linear: nn.Linear, rank: int, density: float = 0.0) -> bool:
    """Whether rank-`rank` factors (plus the sparse support) hold fewer parameters than the dense weight."""
    out_features, in_features = linear.weight.shape
    factored = rank * (out_features + in_features) + sparse_count(out_features, in_features, density)
    return factored < out_features * in_features


def factorise(model: nn.Module, cfg: LowRankConfig) -> tuple[list[str], list[str]]:
    """Replace the matching bias-free linears in place; returns (factorised, left dense) names."""
    done, skipped = [], []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not any(fnmatch.fnmatchcase(name, p) for p in cfg.target_patterns):
            continue
        if module.bias is not None or not worth_factorising(module, cfg.rank, cfg.sparse_density):
            skipped.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(module.weight.device):
            replacement = LowRankLinear(
                module.in_features,
                module.out_features,
                cfg.rank,
                cfg.alpha,
                cfg.sparse_density,
            )
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
    sparse = f" + S (density {cfg.sparse_density:g})" if cfg.sparse_density else ""
    ctx.log(
        f"wren: low-rank W = B A{sparse} (rank {cfg.rank}, scale {cfg.alpha / cfg.rank:g}) on {len(done)} linears{note}: "
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


def merge_low_rank(model: nn.Module) -> nn.Module:
    """Replace every `LowRankLinear` of `model` in place by a bias-free `nn.Linear` holding W = s B A (+ S).

    The merged model computes the same function with the dense architecture's parameter names, so
    its state dict is the plain model's (what the Hugging Face export maps). Returns `model`.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = module.dense_weight()
        dense = nn.Linear(module.in_features, module.out_features, bias=False, device=weight.device)
        with torch.no_grad():
            dense.weight.copy_(weight)
        setattr(parent, child, dense.to(module.factor_a.dtype))
    return model


def factorised_flops_per_token(model: nn.Module, dense_flops_per_token: float) -> float:
    """Training FLOPs per token of `model` after factorisation, from its dense count.

    The dense count charges 6 FLOPs per token for every weight of every matmul (2 forward, 4
    backward; PaLM appendix B). A `LowRankLinear` replaces its out x in weights by
    r (out + in) factor entries plus its support entries (`LowRankLinear.matmul_params`); the
    attention and other terms are unchanged. Model FLOPs: the recomputation of A x in backward
    and the dense form of S used on the way are not counted, as MFU does not count recomputation.
    """
    saved = 0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            saved += module.out_features * module.in_features - module.matmul_params()
    return dense_flops_per_token - 6.0 * saved
