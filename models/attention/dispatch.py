"""The single attention dispatch point: softmax attention through a registry of backends.

Every model calls `attention(q, k, v, causal=...)` with q shaped (B, H, T, D) and k, v shaped
(B, H_kv, T, D), where H_kv divides H (H_kv = H: multi-head; 1 < H_kv < H: grouped-query;
H_kv = 1: multi-query). The backend is chosen once per process with `set_attention_backend`:

- "sdpa": `torch.nn.functional.scaled_dot_product_attention` with `enable_gqa`, which shares the
  k/v heads without materialising H/H_kv copies. On the 2-core AVX2 dev box (shared with other
  jobs, so timings are noisy) it was as fast as or faster than expanding k/v first in most shapes
  measured (fwd+bwd, fp32, D=64: B=8 H=4 H_kv=2 T=256 26.8 vs 27.4 ms; B=2 H=16 H_kv=4 T=1024
  195 vs 218 ms), and it saves the copies' memory.
- "flash": FlashAttention-2's `flash_attn_func` (layout (B, T, H, D), native GQA). Usable only
  where `flash_attn` imports, the tensors are on CUDA, their dtype is fp16 or bf16 and the head
  size is a multiple of 8 up to 256 (the kernels' limits).
- "auto" (the default): the first usable backend of `AUTO_PREFERENCE` for the given tensors, so
  CPU and fp32 runs fall back to sdpa.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AUTO_PREFERENCE",
    "AttentionBackend",
    "attention",
    "get_attention_backend",
    "register_attention_backend",
    "set_attention_backend",
]


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """One way of computing softmax attention.

    Attributes:
        name: registry key.
        fn: `fn(q, k, v, causal, scale)` with the arguments of `attention`; returns (B, H, T, D).
        installed: whether the backend's dependencies import in this process.
        supports: whether the backend can run on these query tensors (device, dtype).
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor, bool, float | None], Tensor]
    installed: Callable[[], bool]
    supports: Callable[[Tensor], bool]


_BACKENDS: dict[str, AttentionBackend] = {}
AUTO_PREFERENCE: tuple[str, ...] = ("flash", "sdpa")
_selected = "auto"


def register_attention_backend(backend: AttentionBackend) -> None:
    """Add a backend to the registry; a second one under the same name is an error."""
    if backend.name in _BACKENDS or backend.name == "auto":
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def set_attention_backend(name: str) -> None:
    """Select the backend used by every later `attention` call ("auto", "sdpa", "flash", ...)."""
    global _selected
    if name != "auto":
        if name not in _BACKENDS:
            known = ", ".join(["auto", *_BACKENDS])
            raise ValueError(f"unknown attention backend {name!r}; known: {known}")
        if not _BACKENDS[name].installed():
            raise ValueError(f"attention backend {name!r} is not installed in this environment")
    _selected = name


def get_attention_backend() -> str:
    """The selected backend's name ("auto" unless `set_attention_backend` chose another)."""
    return _selected


def _resolve(q: Tensor) -> AttentionBackend:
    if _selected != "auto":
        backend = _BACKENDS[_selected]
        if not backend.supports(q):
            raise ValueError(
                f"attention backend {_selected!r} cannot run on {q.dtype} tensors on {q.device.type}"
            )
        return backend
    for name in AUTO_PREFERENCE:
        backend = _BACKENDS[name]
        if backend.installed() and backend.supports(q):
            return backend
    raise ValueError(f"no attention backend supports {q.dtype} tensors on {q.device.type}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Softmax attention softmax(scale q k^T) v, optionally causal; returns (B, H, T, D).

    `scale` defaults to 1/sqrt(D).

    q is (B, H, T, D); k and v are (B, H_kv, T, D) with H_kv dividing H (query head h reads
    kv head h // (H / H_kv), the grouping of GQA and of Hugging Face's `repeat_kv`).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected 4-d (B, H, T, D) tensors, got {q.ndim}, {k.ndim}, {v.ndim} dims")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: {k.shape[1]} kv heads do not divide {q.shape[1]} query heads")
    return _resolve(q).fn(q, k, v, causal, scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@functools.cache
def _flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401  (its CUDA extension loads here, or fails)
    except (ImportError, OSError):
        return False
    return True


def _flash_supports(q: Tensor) -> bool:
    head_dim = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, softmax_scale=scale)
    return out.transpose(1, 2)


register_attention_backend(
    AttentionBackend(name="sdpa", fn=_sdpa, installed=lambda: True, supports=lambda q: True)
)
register_attention_backend(
    AttentionBackend(name="flash", fn=_flash, installed=_flash_installed, supports=_flash_supports)
)
