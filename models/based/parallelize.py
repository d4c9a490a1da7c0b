"""Activation checkpointing and FSDP2 for a `Based`: the shared recipe of `models.parallelize`,
applied to every `BasedBlock`."""

from __future__ import annotations

import functools

from models.based.model import BasedBlock
from models.parallelize import parallelize_blocks

__all__ = ["parallelize_based"]

parallelize_based = functools.partial(parallelize_blocks, block_type=BasedBlock)
