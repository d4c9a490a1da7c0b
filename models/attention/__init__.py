"""Attention kernels: the softmax dispatch (flash | sdpa | math), LSE merging, HyperAttention, and
the registry of attention kinds a model can select by name ("softmax", "hyper")."""

from models.registry import lazy_exports

# Imported on first use: the kernels import torch, and configs read `models.attention.params`.
_EXPORTS = {
    "AUTO_PREFERENCE": "models.attention.dispatch:AUTO_PREFERENCE",
    "AttentionBackend": "models.attention.dispatch:AttentionBackend",
    "attention": "models.attention.dispatch:attention",
    "get_attention_backend": "models.attention.dispatch:get_attention_backend",
    "register_attention_backend": "models.attention.dispatch:register_attention_backend",
    "set_attention_backend": "models.attention.dispatch:set_attention_backend",
    "HyperAttention": "models.attention.hyper:HyperAttention",
    "HyperParams": "models.attention.params:HyperParams",
    "hyper_attention": "models.attention.hyper:hyper_attention",
    "ATTENTION_KINDS": "models.attention.kinds:ATTENTION_KINDS",
    "SoftmaxAttention": "models.attention.kinds:SoftmaxAttention",
    "build_attention_kind": "models.attention.kinds:build_attention_kind",
    "lse_merge": "models.attention.lse:lse_merge",
}
__getattr__ = lazy_exports(_EXPORTS)

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
