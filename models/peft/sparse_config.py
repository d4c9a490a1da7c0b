"""Configs of sparse fine-tuning: SpIEL (Ansell et al. 2024, arXiv:2401.16405) and LT-SFT
(Ansell et al., ACL 2022). Torch-free, so the trainer's config tree can import them cheaply.

Both keep, per targeted linear weight W (d_out x d_in), k trainable entries: the trained model is
W + S(eta, phi), S scattering the k values phi at the flat positions eta into a zero matrix of W's
shape. How many entries (`density` or `match_lora_rank`) and which layers (`target_modules`, the
same name rules as LoRA's) are shared; the methods differ in how eta is chosen:

- SpIEL re-selects eta during training: every `reselection_steps` it drops the entries whose delta
  moved least and regrows the most promising ones (accumulated gradient, "ag", or SM3 momenta, "ma").
- LT-SFT fine-tunes every targeted entry for `full_finetune_steps`, keeps the K entries that moved
  most (the lottery ticket), rewinds to the base weights and retrains only those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RATE_POLICIES", "SELECTION_ALGORITHMS", "LtSftConfig", "SparseTargetConfig", "SpielConfig"]

SELECTION_ALGORITHMS = ("ag", "ma")
RATE_POLICIES = ("linear", "cosine")
DELTA_DTYPES = ("float32", "bfloat16")


def _default_targets() -> list[str]:
    # SpIEL paper scripts target every attention and MLP projection (ducdauge/sft-llm scripts,
    # q,k,v,o,gate,up,down_proj); wren's Llama names them wq, wk, wv, wo, w1, w2, w3.
    return ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass(kw_only=True)
class SparseTargetConfig:
    """Which entries are tunable: the part shared by SpIEL and LT-SFT.

    Attributes:
        density: tunable entries as a fraction of ALL model parameters (embeddings included),
            as SpIEL's `SftModel` counts them; split over the targeted weights in proportion to
            their size. Ignored when `match_lora_rank` > 0.
        match_lora_rank: when > 0, tune as many entries as LoRA of this rank would train on the
            same targets: rank * sum over targets of (d_in + d_out) (SpIEL section 4 parameter
            matching; `PARAMS_PER_RANK` in ducdauge/sft-llm scripts).
        target_modules: linear-module name patterns (a name equals, ends with "." + , or
            glob-matches a pattern, as `models.peft.lora.matches_any`).
        trainable_modules: parameter-name patterns trained densely besides the deltas.
        delta_dtype: dtype of the delta values ("float32", or "bfloat16" as in qSpIEL).
    """

    density: float = 0.01
    match_lora_rank: int = 0
    target_modules: list[str] = field(default_factory=_default_targets)
    trainable_modules: list[str] = field(default_factory=list)
    delta_dtype: str = "float32"

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if isinstance(self.match_lora_rank, bool) or not isinstance(self.match_lora_rank, int) or self.match_lora_rank < 0:
            raise ValueError(f"match_lora_rank: must be a non-negative integer, got {self.match_lora_rank!r}")
        if self.match_lora_rank == 0 and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density: must be in (0, 1], got {self.density!r}")
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise ValueError(f"target_modules: must be a non-empty list of names, got {self.target_modules!r}")
        if not all(isinstance(p, str) and p for p in self.trainable_modules):
            raise ValueError(f"trainable_modules: must be a list of names, got {self.trainable_modules!r}")
        if self.delta_dtype not in DELTA_DTYPES:
            raise ValueError(f"delta_dtype: must be one of {DELTA_DTYPES}, got {self.delta_dtype!r}")


@dataclass(kw_only=True)
class SpielConfig(SparseTargetConfig):
    """SpIEL: sparse deltas whose support is re-selected during training (arXiv:2401.16405).

    Defaults are `SftConfig`'s in AlanAnsell/peft (src/peft/tuners/sft/config.py).

    Attributes:
        selection: regrowth criterion: "ag" (top accumulated gradient, SpIEL-AG) or "ma"
            (top SM3 row x column accumulator product, SpIEL-MA; the deltas then train with SM3).
        reselection_steps: R, optimizer steps between two re-selections.
        selection_accumulation_steps: A, optimizer steps over which AG accumulates candidate
            gradients before a re-selection (the re-selection happens at steps t = A mod R).
        initial_reselection_rate: rho_0, the fraction of each weight's k entries replaced at the
            second re-selection (the first one, at t = A, replaces all of them).
        reselection_rate_policy: decay of the rate to 0 at the last step: "linear"
            (rho_0 (1 - t/T)) or "cosine" (rho_0 (1 + cos(pi t/T)) / 2).
    """

    selection: str = "ag"
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    reselection_rate_policy: str = "linear"

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        super().validate()
        if self.selection not in SELECTION_ALGORITHMS:
            raise ValueError(f"selection: must be one of {SELECTION_ALGORITHMS}, got {self.selection!r}")
        for name in ("reselection_steps", "selection_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.selection_accumulation_steps >= self.reselection_steps:
            raise ValueError(
                "selection_accumulation_steps: must be smaller than reselection_steps "
                f"({self.reselection_steps}), got {self.selection_accumulation_steps}"
            )
        if not 0 <= self.initial_reselection_rate <= 1:
            raise ValueError(f"initial_reselection_rate: must be in [0, 1], got {self.initial_reselection_rate!r}")
        if self.reselection_rate_policy not in RATE_POLICIES:
            raise ValueError(f"reselection_rate_policy: must be one of {RATE_POLICIES}, got {self.reselection_rate_policy!r}")


@dataclass(kw_only=True)
class LtSftConfig(SparseTargetConfig):
    """LT-SFT: lottery-ticket sparse fine-tuning with composable deltas (Ansell et al., ACL 2022).

    The run's first `full_finetune_steps` optimizer steps train a dense delta on every targeted
    weight; then the K = (density or LoRA-matched) entries with the largest |delta| are kept, all
    deltas rewind to 0 (the base weights), the optimizer state is reset, and the remaining steps
    train only the kept entries (`composable-sft` src/sft/lt_sft.py, n_ft_iterations = 1).

    Attributes:
        full_finetune_steps: optimizer steps of the full (dense) phase; the run's remaining steps
            are the sparse phase, so it must be smaller than the run's `train.steps`.
    """

    full_finetune_steps: int = 100

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        super().validate()
        steps = self.full_finetune_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"full_finetune_steps: must be a positive integer, got {steps!r}")
