"""Attention kinds a model selects by name: modules `kind(q, k, v, *, causal, scale) -> out`.

"softmax" is exact attention through the dispatch; "hyper" is HyperAttention. Neither holds
parameters or persistent buffers, so a checkpoint trained with one loads into the other (for
example HyperAttention at inference on a model trained with softmax attention).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from models.attention.dispatch import attention
from models.attention.hyper import HyperAttention
from models.attention.params import HyperParams

__all__ = ["ATTENTION_KINDS", "SoftmaxAttention", "build_attention_kind"]


class SoftmaxAttention(nn.Module):
    """Exact softmax attention through `models.attention.attention`."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
        """softmax(scale q k^T + causal mask) v."""
        return attention(q, k, v, causal=causal, scale=scale)

    def init_weights(self) -> None:
        """Nothing to initialise."""


# name -> factory(head_dim, hyper params, seed) -> module
ATTENTION_KINDS: dict[str, Callable[[int, HyperParams, int], nn.Module]] = {
    "softmax": lambda head_dim, params, seed: SoftmaxAttention(),
    "hyper": lambda head_dim, params, seed: HyperAttention(head_dim, params, seed=seed),
}


def build_attention_kind(name: str, head_dim: int, params: HyperParams, seed: int = 0) -> nn.Module:
    """The attention module called `name`; ValueError listing the known kinds otherwise."""
    if name not in ATTENTION_KINDS:
        raise ValueError(f"attention: unknown kind {name!r}; known: {', '.join(ATTENTION_KINDS)}")
    return ATTENTION_KINDS[name](head_dim, params, seed)
