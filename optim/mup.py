"""muP (Maximal Update Parametrisation, issue 5): config section and model transform."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(kw_only=True)
class MupConfig:
    """Whether to train under muP."""

    enabled: bool = False

    def validate(self) -> None:
        pass


def apply_mup(model: nn.Module, ctx) -> nn.Module:
    """Apply muP's multipliers and init; returns `model` unchanged while muP is off."""
    return model
