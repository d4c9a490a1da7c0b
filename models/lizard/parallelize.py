"""Activation checkpointing and FSDP2 for a `Lizard`: the shared recipe of `models.parallelize`,
applied to every `LizardBlock`."""

from __future__ import annotations

import functools

from models.lizard.model import LizardBlock
from models.parallelize import parallelize_blocks

__all__ = ["parallelize_lizard"]

parallelize_lizard = functools.partial(parallelize_blocks, block_type=LizardBlock)
