"""The `[finetune.lora]` section: which linear layers get LoRA adapters, and their shape.

Torch-free, so that the trainer's config tree imports it without torch; `models.peft.lora`
re-exports `LoraConfig` beside the adapters it configures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LoraConfig"]


@dataclass(kw_only=True)
class LoraConfig:
    """Which linear layers get adapters, and their shape.

    Attributes:
        rank: r, the inner dimension of B A.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout probability on the adapter's input (0 = none).
        target_modules: module-name patterns; a linear layer is adapted when its dotted name
            equals a pattern, ends with "." + pattern (`"wq"` selects every `...attention.wq`, as
            `peft` matches), or matches it as a glob (`"layers.0.*"`).
        trainable_modules: parameter-name patterns (same rules, applied to parameter and module
            names) left trainable besides the adapters; everything else is frozen.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    trainable_modules: list[str] = field(default_factory=list)

    @property
    def scaling(self) -> float:
        """alpha / rank, the multiplier on B A."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank: must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(p, str) and p for p in self.target_modules):
            raise ValueError(f"target_modules: must be a non-empty list of names, got {self.target_modules!r}")
        if not all(isinstance(p, str) and p for p in self.trainable_modules):
            raise ValueError(f"trainable_modules: must be a list of names, got {self.trainable_modules!r}")
