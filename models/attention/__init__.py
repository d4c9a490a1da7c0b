"""Attention kernels: the softmax dispatch (flash | sdpa | math), LSE merging, HyperAttention, and
the registry of attention kinds a model can select by name ("softmax", "hyper")."""

from models.attention.dispatch import (
    AUTO_PREFERENCE,
    AttentionBackend,
    attention,
    get_attention_backend,
    register_attention_backend,
    set_attention_backend,
)
from models.attention.hyper import HyperAttention, HyperParams, hyper_attention
from models.attention.kinds import (
    ATTENTION_KINDS,
    SoftmaxAttention,
    build_attention_kind,
)
from models.attention.lse import lse_merge

__all__ = [
    "ATTENTION_KINDS",
    "AUTO_PREFERENCE",
    "AttentionBackend",
    "HyperAttention",
    "HyperParams",
    "SoftmaxAttention",
    "attention",
    "build_attention_kind",
    "get_attention_backend",
    "hyper_attention",
    "lse_merge",
    "register_attention_backend",
    "set_attention_backend",
]
