"""The single attention dispatch point: softmax attention through a registry of backends.

Every model calls `attention(q, k, v, causal=...)` with q shaped (B, H, T_q, D) and k, v shaped
(B, H_kv, T_k, D), where H_kv divides H (H_kv = H: multi-head; 1 < H_kv < H: grouped-query;
H_kv = 1: multi-query). The optional masks share one meaning on every backend:

- `causal`: query i may read key j when j <= i + T_k - T_q, i.e. the mask is aligned to the
  bottom-right corner as in flash-attn, so that the last T_q positions of a KV cache attend
  correctly (for T_q = T_k it is the usual lower triangle). Causal attention needs T_q <= T_k.
- `window=w` (causal only): keys more than w positions behind the query are masked too, so a
  query reads at most w + 1 keys, itself included: flash-attn's `window_size=(w, 0)`.
- `document_ids` (B, T), T_q = T_k: a query reads only keys with the same id. Ids must label
  contiguous runs (documents packed into one row, e.g. the running count of EOS tokens), which is
  how the flash backend turns them into `flash_attn_varlen_func`'s `cu_seqlens`.
- `return_lse=True` also returns the row-wise log-sum-exp of the masked scores, (B, H, T_q) in
  fp32 (fp64 for fp64 inputs), which HyperAttention and any split attention need to merge
  partial results (see `lse.py`).

The backend is chosen once per process with `set_attention_backend`:

- "sdpa": `torch.nn.functional.scaled_dot_product_attention` with `enable_gqa`, which shares the
  k/v heads without materialising H/H_kv copies. On the 2-core AVX2 dev box (shared with other
  jobs, so timings are noisy) it was as fast as or faster than expanding k/v first in most shapes
  measured (fwd+bwd, fp32, D=64: B=8 H=4 H_kv=2 T=256 26.8 vs 27.4 ms; B=2 H=16 H_kv=4 T=1024
  195 vs 218 ms), and it saves the copies' memory. SDPA's public API returns no LSE: on CPU,
  calls with `return_lse=True` and no window/document mask run SDPA's fused CPU kernel through
  its private op, which returns the LSE (`_CpuFlashWithLse`, gradients exact in out and LSE);
  other LSE calls (CUDA without flash-attn, windows, documents, T_q < T_k causal) go to "math".
- "math": plain PyTorch, scores materialised in fp32; the reference the others are tested against,
  and the LSE path on CPU (differentiable in the LSE too).
- "flash": FlashAttention-2's `flash_attn_func`, or `flash_attn_varlen_func` with document ids
  (layout (B, T, H, D), native GQA, bottom-right causal, `window_size`, LSE through
  `return_attn_probs`). Usable only where `flash_attn` imports, the tensors are on CUDA, their
  dtype is fp16 or bf16 and the head size is a multiple of 8 up to 256 (the kernels' limits).
  Its backward ignores the gradient of the returned LSE (flash_attn_interface.py, FlashAttnFunc).
- "auto" (the default): the first usable backend of `AUTO_PREFERENCE` for the given call, so
  CPU and fp32 runs fall back to sdpa (and to math for the LSE).
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
    "AttentionCall",
    "attention",
    "attention_mask",
    "get_attention_backend",
    "register_attention_backend",
    "set_attention_backend",
]


@dataclass(frozen=True, kw_only=True)
class AttentionCall:
    """The options of one `attention` call besides the tensors (see the module docstring)."""

    causal: bool
    scale: float | None
    window: int | None
    document_ids: Tensor | None
    return_lse: bool


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """One way of computing softmax attention.

    Attributes:
        name: registry key.
        fn: `fn(q, k, v, call)`; returns (out (B, H, T_q, D), lse (B, H, T_q) fp32 or None when
            `call.return_lse` is false).
        installed: whether the backend's dependencies import in this process.
        supports: whether the backend can run this call on these query tensors.
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor, AttentionCall], tuple[Tensor, Tensor | None]]
    installed: Callable[[], bool]
    supports: Callable[[Tensor, AttentionCall], bool]


_BACKENDS: dict[str, AttentionBackend] = {}
AUTO_PREFERENCE: tuple[str, ...] = ("flash", "sdpa", "math")
_selected = "auto"


def register_attention_backend(backend: AttentionBackend) -> None:
    """Add a backend to the registry; a second one under the same name is an error."""
    if backend.name in _BACKENDS or backend.name == "auto":
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def set_attention_backend(name: str) -> None:
    """Select the backend used by every later `attention` call ("auto", "sdpa", "flash", "math")."""
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


def _resolve(q: Tensor, call: AttentionCall) -> AttentionBackend:
    if _selected != "auto":
        backend = _BACKENDS[_selected]
        if backend.supports(q, call):
            return backend
        if call.return_lse and _selected == "sdpa":  # SDPA has no LSE output: the math path gives it
            return _BACKENDS["math"]
        raise ValueError(f"attention backend {_selected!r} cannot run on {q.dtype} tensors on {q.device.type}")
    for name in AUTO_PREFERENCE:
        backend = _BACKENDS[name]
        if backend.installed() and backend.supports(q, call):
            return backend
    raise ValueError(f"no attention backend supports {q.dtype} tensors on {q.device.type}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    document_ids: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention softmax(scale q k^T + mask) v; returns (B, H, T_q, D), or (out, lse).

    `scale` defaults to 1/sqrt(D). q is (B, H, T_q, D); k and v are (B, H_kv, T_k, D) with H_kv
    dividing H (query head h reads kv head h // (H / H_kv), the grouping of GQA and of Hugging
    Face's `repeat_kv`). The masks (`causal`, `window`, `document_ids`) and the LSE are described
    in the module docstring.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected 4-d (B, H, T, D) tensors, got {q.ndim}, {k.ndim}, {v.ndim} dims")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"attention: {k.shape[1]} kv heads do not divide {q.shape[1]} query heads")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"attention: causal attention needs T_q <= T_k, got {q.shape[2]} > {k.shape[2]}")
    if window is not None and (not causal or window < 0):
        raise ValueError(f"attention: window needs causal=True and window >= 0, got window={window}")
    if document_ids is not None and (q.shape[2] != k.shape[2] or document_ids.shape != (q.shape[0], q.shape[2])):
        raise ValueError(
            f"attention: document_ids must be (B, T) = {(q.shape[0], q.shape[2])} with T_q = T_k, "
            f"got {tuple(document_ids.shape)} for T_k = {k.shape[2]}"
        )
    call = AttentionCall(causal=causal, scale=scale, window=window, document_ids=document_ids, return_lse=return_lse)
    out, lse = _resolve(q, call).fn(q, k, v, call)
    return (out, lse) if return_lse else out


def attention_mask(
    q_len: int, k_len: int, call: AttentionCall, device: torch.device
) -> Tensor | None:
    """The boolean "may attend" mask of `call`, (B or 1, 1, T_q, T_k); None when nothing is masked."""
    mask = None
    if call.causal:
        rows = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
        cols = torch.arange(k_len, device=device).unsqueeze(0)
        mask = cols <= rows
        if call.window is not None:
            mask = mask & (cols >= rows - call.window)
        mask = mask[None, None]
    if call.document_ids is not None:
        ids = call.document_ids
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).unsqueeze(1)
        mask = same if mask is None else mask & same
    return mask


def _cpu_lse_op_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _sdpa_supports(q: Tensor, call: AttentionCall) -> bool:
    if not call.return_lse:
        return True
    # The LSE comes from the CPU fused kernel, which aligns causal masks top-left and takes no
    # window or document mask: only plain causal (T_q = T_k) or unmasked calls use it.
    return (
        q.device.type == "cpu"
        and _cpu_lse_op_available()
        and call.window is None
        and call.document_ids is None
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


class _CpuFlashWithLse(torch.autograd.Function):
    """SDPA's fused CPU kernel with its LSE, differentiable in both outputs.

    The private op `aten._scaled_dot_product_flash_attention_for_cpu` returns (out, lse) and its
    backward op ignores a gradient on the LSE. Since d lse_i / d s_ij = P_ij, that gradient is
    folded into one backward call by augmenting v with a column of ones, the output gradient
    with the column d lse, the output with a column of zeros and q, k with a zero column: the
    kernel's dS = P * (dO V^T - rowsum(dO * O)) then gains exactly P_ij * d lse_i.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.cat([grad_out, grad_lse.unsqueeze(-1).to(grad_out.dtype)], -1).contiguous(),
            F.pad(q, (0, 1)),
            F.pad(k, (0, 1)),
            torch.cat([v, torch.ones_like(v[..., :1])], -1),
            F.pad(out, (0, 1)),
            lse,
            0.0,
            ctx.causal,
            scale=ctx.scale,
        )
        return grad_q[..., :-1], grad_k[..., :-1], grad_v[..., :-1], None, None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    gqa = q.shape[1] != k.shape[1]
    if call.return_lse:
        square_or_unmasked = not call.causal or q.shape[2] == k.shape[2]
        if not square_or_unmasked:  # bottom-right causal: the fused CPU kernel is top-left only
            return _math(q, k, v, call)
        groups = q.shape[1] // k.shape[1]
        if gqa:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        out, lse = _CpuFlashWithLse.apply(q, k, v, call.causal, scale)
        return out, lse.to(torch.promote_types(q.dtype, torch.float32))
    square_causal = call.causal and q.shape[2] == k.shape[2] and call.window is None and call.document_ids is None
    if square_causal or not (call.causal or call.document_ids is not None):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=call.causal, scale=call.scale, enable_gqa=gqa)
    else:
        mask = attention_mask(q.shape[2], k.shape[2], call, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale, enable_gqa=gqa)
    return out, None


def _math(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
    """Scores in fp32 (fp64 stays fp64), grouped so that kv heads are broadcast rather than copied."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    scale = call.scale if call.scale is not None else head_dim**-0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(batch, kv_heads, heads // kv_heads, q_len, head_dim)
    scores = (qg @ k.to(dtype).unsqueeze(2).transpose(-2, -1)) * scale
    mask = attention_mask(q_len, k_len, call, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = (probs @ v.to(dtype).unsqueeze(2)).to(q.dtype)
    return out.view(batch, heads, q_len, head_dim), lse.view(batch, heads, q_len)


@functools.cache
def _flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401  (its CUDA extension loads here, or fails)
    except (ImportError, OSError):
        return False
    return True


def _flash_supports(q: Tensor, call: AttentionCall) -> bool:
    head_dim = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def _cu_seqlens(document_ids: Tensor) -> tuple[Tensor, int]:
    """Start offsets of the contiguous runs of `document_ids` (B, T) flattened, plus the final end."""
    batch, seq_len = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([batch * seq_len], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _flash(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window = (-1, -1) if call.window is None else (call.window, 0)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    batch, q_len, heads, head_dim = qt.shape
    if call.document_ids is None:
        result = flash_attn_func(
            qt, kt, vt, softmax_scale=call.scale, causal=call.causal, window_size=window,
            return_attn_probs=call.return_lse,
        )
        out, lse = (result[0], result[1]) if call.return_lse else (result, None)
        return out.transpose(1, 2), lse
    cu_seqlens, max_len = _cu_seqlens(call.document_ids)
    flat = [t.reshape(batch * q_len, t.shape[2], head_dim) for t in (qt, kt, vt)]
    result = flash_attn_varlen_func(
        *flat, cu_seqlens, cu_seqlens, max_len, max_len, softmax_scale=call.scale, causal=call.causal,
        window_size=window, return_attn_probs=call.return_lse,
    )
    out, lse = (result[0], result[1]) if call.return_lse else (result, None)
    out = out.view(batch, q_len, heads, head_dim).transpose(1, 2)
    if lse is not None:  # varlen LSE is (H, total_q) in flash-attn >= 2.4
        lse = lse.view(heads, batch, q_len).transpose(0, 1)
    return out, lse


register_attention_backend(
    AttentionBackend(name="sdpa", fn=_sdpa, installed=lambda: True, supports=_sdpa_supports)
)
register_attention_backend(
    AttentionBackend(name="flash", fn=_flash, installed=_flash_installed, supports=_flash_supports)
)
register_attention_backend(
    AttentionBackend(name="math", fn=_math, installed=lambda: True, supports=lambda q, call: True)
)
