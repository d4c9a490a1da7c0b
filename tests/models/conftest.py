"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest
import torch


def plain_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale q k^T + mask) v (scale 1/sqrt(d) by default), each kv head repeated for its query heads."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        seq_len = q.shape[-2]
        future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


@pytest.fixture
def reference_attention():
    """The oracle for every attention backend: plain masked softmax attention, written out."""
    return plain_softmax_attention


@pytest.fixture(autouse=True)
def one_thread():
    """The model tests use tiny tensors, where intra-op threads cost more than they give (and on
    a busy 2-core box OpenMP barriers made a fwd+bwd ~20x slower); restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
