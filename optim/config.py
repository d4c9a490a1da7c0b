"""The `[optimizer]` section and its sub-tables, torch-free, so that reading a recipe does not import torch.

The optimizers themselves are built by `optim.builder` (registry `OPTIMIZERS`, whose keys are
`OPTIMIZER_NAMES`); GaLore is `optim.galore`, Fira `optim.fira`, low-rank and SLTrain `optim.lowrank`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_TARGETS",
    "FiraConfig",
    "GaLoreConfig",
    "LowRankConfig",
    "MEMORY_EFFICIENT",
    "OPTIMIZER_NAMES",
    "OptimizerConfig",
    "PROJECTING",
]

# The names `optim.builder` registers a builder under.
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "sgd", "galore", "fira", "lowrank")
# The optimizers built on ProjectedAdamW (momentum reset, refactorization of factorised weights).
MEMORY_EFFICIENT = ("galore", "fira", "lowrank")
PROJECTING = ("galore", "fira")  # those whose groups mark GaLore-projected parameters

# The 2-D attention and MLP weights of the model families in `models/` (GaLore's torchrun_main.py
# picks Linear modules whose name contains "attn" or "mlp"; these are wren's names for them):
# GaLore matches them against parameter names, low-rank against module names.
DEFAULT_TARGETS = ["*.attention.*", "*.feed_forward.*"]


@dataclass(kw_only=True)
class GaLoreConfig:
    """GaLore's projection, used by the `galore` and `fira` optimizers."""

    rank: int = 128  # r of the projected space (paper Table 2: 128 for 60M, 256 for 130M/350M)
    update_proj_gap_steps: int = 200  # T: new SVD every T optimizer steps (paper Sec. 4.1, Table 2)
    scale: float = 0.25  # alpha, applied on projecting back (paper Table 2)
    # Name globs (fnmatch, on parameter names) of the 2-D parameters to project.
    target_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Flip each refreshed basis vector to agree in sign with the one it replaces. The SVD's signs
    # are arbitrary and flip under rounding-level changes of the gradient (a sharded run sums it
    # in another order), and the moments carried over a refresh would then point the wrong way.
    # false reproduces galore_torch exactly (raw LAPACK signs).
    align_signs: bool = True

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"galore.rank: must be at least 1, got {self.rank}")
        if self.update_proj_gap_steps < 1:
            raise ValueError(f"galore.update_proj_gap_steps: must be at least 1, got {self.update_proj_gap_steps}")
        if not self.scale > 0:
            raise ValueError(f"galore.scale: must be positive, got {self.scale}")
        if not self.target_patterns:
            raise ValueError("galore.target_patterns: must name at least one pattern, got []")


@dataclass(kw_only=True)
class FiraConfig:
    """Fira's additions to GaLore (the projection itself is configured in `[optimizer.galore]`)."""

    limiter_gamma: float = 1.01  # max growth of the residual's norm per step (Fira Sec. 4.3)

    def validate(self) -> None:
        if not self.limiter_gamma >= 1:
            raise ValueError(f"fira.limiter_gamma: must be at least 1, got {self.limiter_gamma}")


@dataclass(kw_only=True)
class LowRankConfig:
    """Factorised weights W = (alpha / rank) B A; off while `rank` is 0."""

    rank: int = 0  # r of the factors; 0 keeps the model dense
    alpha: float = 32.0  # s = alpha / rank (reference default lora_alpha 32, scripts/60m_low_rank.sh)
    # Name globs (fnmatch, on module names) of the nn.Linear modules to factorise.
    target_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Rebalance B, A every this many optimizer steps; 0 = never (Glentis et al.: 200).
    refactor_every_steps: int = 0
    # SLTrain's sparse part: fraction of each factorised W's entries on S's fixed random support
    # (values trained, support frozen); 0 = pure low rank (SLTrain scripts: 0.03).
    sparse_density: float = 0.0

    def validate(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lowrank.rank: must be 0 (off) or positive, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lowrank.alpha: must be positive, got {self.alpha}")
        if not self.target_patterns:
            raise ValueError("lowrank.target_patterns: must name at least one pattern, got []")
        if self.refactor_every_steps < 0:
            raise ValueError(f"lowrank.refactor_every_steps: must be 0 or positive, got {self.refactor_every_steps}")
        if not 0 <= self.sparse_density < 1:
            raise ValueError(f"lowrank.sparse_density: must be in [0, 1), got {self.sparse_density}")


@dataclass(kw_only=True)
class OptimizerConfig:
    """The optimizer and its hyperparameters; `lr` is the peak the schedule scales."""

    name: str = "adamw"
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled; not applied to norms, biases or embeddings
    # Momentum reset (galore, fira, lowrank): zero moments and step counts every this many steps;
    # 0 = never (Glentis et al. 2025, Sec. 4: every 200 steps).
    reset_every_steps: int = 0
    # After each reset the lr ramps from 0.001x to 1x over this many steps (reference recovery_steps 10).
    reset_warmup_steps: int = 10
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)  # projection of galore and fira
    fira: FiraConfig = field(default_factory=FiraConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)  # factorised weights (rank 0 = off)

    def validate(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"name: unknown optimizer {self.name!r}; known: {', '.join(sorted(OPTIMIZER_NAMES))}")
        self.galore.validate()
        self.fira.validate()
        self.lowrank.validate()
        if self.name == "lowrank" and self.lowrank.rank == 0:
            raise ValueError('lowrank.rank: must be positive with name = "lowrank", got 0')
        family = ", ".join(MEMORY_EFFICIENT)
        if self.name not in MEMORY_EFFICIENT:
            if self.lowrank.rank:
                raise ValueError(
                    f"lowrank.rank: factorised weights need name = one of {family}, got name {self.name!r}"
                )
            if self.reset_every_steps:
                raise ValueError(f"reset_every_steps: momentum reset needs name = one of {family}, got {self.name!r}")
        if self.reset_every_steps < 0:
            raise ValueError(f"reset_every_steps: must be 0 or positive, got {self.reset_every_steps}")
        if self.reset_warmup_steps < 0:
            raise ValueError(f"reset_warmup_steps: must be 0 or positive, got {self.reset_warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if not self.eps > 0:
            raise ValueError(f"eps: must be positive, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be 0 or positive, got {self.weight_decay}")
