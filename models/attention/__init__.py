"""Attention kernels and their dispatch (sdpa | flash); later, linear-attention mixers."""

from models.attention.dispatch import (
    AUTO_PREFERENCE,
    AttentionBackend,
    attention,
    get_attention_backend,
    register_attention_backend,
    set_attention_backend,
)

__all__ = [
    "AUTO_PREFERENCE",
    "AttentionBackend",
    "attention",
    "get_attention_backend",
    "register_attention_backend",
    "set_attention_backend",
]
