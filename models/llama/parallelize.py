"""Activation checkpointing and FSDP2 for a `Llama`: the shared recipe of `models.parallelize`,
applied to every `TransformerBlock`."""

from __future__ import annotations

import functools

from models.llama.model import TransformerBlock
from models.parallelize import parallelize_blocks

__all__ = ["parallelize_llama"]

parallelize_llama = functools.partial(parallelize_blocks, block_type=TransformerBlock)
