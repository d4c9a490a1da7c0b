"""The BASED decoder on one device (Arora et al., ICML 2024, arXiv 2402.18668).

Module layout follows `HazyResearch/based` (based/models/mixers/): `LinearAttention` (Taylor
feature map, `proj_q`/`proj_k` to feature_dim per head, `proj_v`, `out_proj`, no biases),
`SlidingWindowAttention` (`wqkv`, `out_proj`, no biases, full-head RoPE, the reference's
`qkv_proj_bias`/`out_proj_bias` false), `BaseConv` (`in_proj` dim -> conv_expand * dim with bias,
u = SiLU(causal depthwise conv(u1)) * u2, `out_proj` with bias; the convolution has no bias as in
the reference's `ShortConvolution` default). Blocks reuse wren's Llama RMSNorm and SwiGLU MLP.

Generation: `make_cache` / `forward_cached` (the interface of trainer/generate.py). The state is
constant in the context length: linear attention keeps S (H x F x d_h) and z (H x F) with F = 153
for feature_dim 16 (the compact Taylor map, see models/attention/linear.py), sliding
window attention its last window_tokens + 1 keys and values, BaseConv its last kernel - 1 inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import attention
from models.attention.linear import (
    linear_attention_chunked,
    linear_attention_recurrent,
    taylor_state_dim,
)
from models.based.config import BasedConfig
from models.llama.model import FeedForward, RMSNorm
from models.llama.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["BaseConv", "Based", "BasedBlock", "BasedCache", "LinearAttention", "SlidingWindowAttention"]


class LinearAttention(nn.Module):
    """Causal Taylor linear attention; trains with the chunked form, decodes with the recurrent one."""

    def __init__(self, config: BasedConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.feature_dim = config.n_heads, config.head_dim, config.feature_dim
        self.chunk_size = config.chunk_size_tokens
        self.proj_q = nn.Linear(config.dim, self.feature_dim * self.n_heads, bias=False)
        self.proj_k = nn.Linear(config.dim, self.feature_dim * self.n_heads, bias=False)
        self.proj_v = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        q = self.proj_q(x).view(batch, seq_len, self.n_heads, self.feature_dim).transpose(1, 2)
        k = self.proj_k(x).view(batch, seq_len, self.n_heads, self.feature_dim).transpose(1, 2)
        v = self.proj_v(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        out, _ = linear_attention_chunked(*self._qkv(x), chunk_size=self.chunk_size)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def make_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Empty (S, z) in fp32."""
        features = taylor_state_dim(self.feature_dim)
        return (
            torch.zeros(batch_size, self.n_heads, features, self.head_dim, device=device),
            torch.zeros(batch_size, self.n_heads, features, device=device),
        )

    def forward_cached(self, x: Tensor, state: Any, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Any]:
        """Continue from `state`: chunked for a prompt, recurrent for single tokens."""
        q, k, v = self._qkv(x)
        if x.shape[1] == 1:
            out, state = linear_attention_recurrent(q, k, v, state)
        else:
            out, state = linear_attention_chunked(q, k, v, chunk_size=self.chunk_size, state=state)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1)), state

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal init; the output projection gets the depth-scaled `out_std`."""
        for linear in (self.proj_q, self.proj_k, self.proj_v):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)


class SlidingWindowAttention(nn.Module):
    """Exact causal softmax attention over the last `window_tokens` keys plus the query's own, with RoPE."""

    def __init__(self, config: BasedConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = config.n_heads, config.head_dim, config.window_tokens
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out_proj = nn.Linear(config.dim, config.dim, bias=False)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        qkv = self.wqkv(x).view(batch, seq_len, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[0], qkv[1], cos, sin)
        return q, k, qkv[2]

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        out = attention(*self._qkv(x, cos, sin), causal=True, window=self.window)
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def make_state(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Empty key and value windows (B, H, 0, d_h); they grow to window_tokens + 1 positions."""
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device)
        return empty, empty.clone()

    def forward_cached(self, x: Tensor, state: Any, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Any]:
        """Attend from positions start .. start + t - 1 over the cached window and the new keys."""
        end = start + x.shape[1]
        q, k, v = self._qkv(x, cos[start:end], sin[start:end])
        keys, values = torch.cat([state[0].to(k.dtype), k], dim=2), torch.cat([state[1].to(v.dtype), v], dim=2)
        out = attention(q, keys, values, causal=True, window=self.window)
        keep = self.window + 1
        return self.out_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1)), (keys[:, :, -keep:], values[:, :, -keep:])

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal init; the output projection gets the depth-scaled `out_std`."""
        nn.init.normal_(self.wqkv.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)


class BaseConv(nn.Module):
    """Gated short convolution: out_proj(SiLU(causal_depthwise_conv(u1)) * u2), [u1, u2] = in_proj(x)."""

    def __init__(self, config: BasedConfig) -> None:
        super().__init__()
        self.inner = config.conv_expand * config.dim // 2
        self.kernel_size = config.conv_kernel_size
        self.in_proj = nn.Linear(config.dim, 2 * self.inner, bias=True)
        self.conv = nn.Conv1d(self.inner, self.inner, self.kernel_size, groups=self.inner, bias=False)
        self.out_proj = nn.Linear(self.inner, config.dim, bias=True)

    def _mix(self, u1: Tensor, u2: Tensor, history: Tensor) -> Tensor:
        """history (B, inner, kernel - 1) holds the inputs before u1 (B, t, inner)."""
        conv = self.conv(torch.cat([history.to(u1.dtype), u1.transpose(1, 2)], dim=2)).transpose(1, 2)
        return self.out_proj(F.silu(conv) * u2)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        return self._mix(u1, u2, self.make_state(x.shape[0], x.device).to(x.dtype))

    def make_state(self, batch_size: int, device: torch.device) -> Tensor:
        """The last kernel - 1 convolution inputs, zeros before the first token."""
        return torch.zeros(batch_size, self.inner, self.kernel_size - 1, device=device)

    def forward_cached(self, x: Tensor, state: Any, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Any]:
        """Convolve the new inputs after the cached ones; keep the last kernel - 1."""
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        out = self._mix(u1, u2, state)
        history = torch.cat([state.to(u1.dtype), u1.transpose(1, 2)], dim=2)
        return out, history[:, :, history.shape[2] - (self.kernel_size - 1):]

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal projections (depth-scaled output), zero biases, PyTorch's default convolution init."""
        nn.init.normal_(self.in_proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=out_std)
        nn.init.zeros_(self.out_proj.bias)
        self.conv.reset_parameters()


# mixer kind (BasedConfig.mixer_kind) -> module class
MIXERS: dict[str, type[nn.Module]] = {
    "linear_attention": LinearAttention,
    "sliding_window": SlidingWindowAttention,
    "conv": BaseConv,
}


class BasedBlock(nn.Module):
    """Pre-norm block: h = x + mixer(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, config: BasedConfig, layer: int) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = MIXERS[config.mixer_kind(layer)](config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        h = x + self.mixer(self.mixer_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_cached(self, x: Tensor, state: Any, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Any]:
        """`forward` continuing from the mixer's `state`; returns (out, new state)."""
        mixed, state = self.mixer.forward_cached(self.mixer_norm(x), state, cos, sin, start)
        h = x + mixed
        return h + self.feed_forward(self.ffn_norm(h)), state

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Initialise the mixer, the MLP and both norms."""
        self.mixer_norm.init_weights()
        self.mixer.init_weights(std=std, out_std=out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std=std, out_std=out_std)


@dataclass
class BasedCache:
    """Per-layer recurrent state of a `Based` model and the number of tokens it has read.

    Attributes:
        states: one entry per layer, the mixer's state (see each mixer's `make_state`).
        seq_len: tokens consumed so far (the next token's position).
        max_seq_len: positions the cache may reach (bounded by the RoPE tables).
    """

    states: list[Any]
    max_seq_len: int
    seq_len: int = 0

    def nbytes(self) -> int:
        """Bytes of state; bounded by a constant independent of the context length."""
        tensors = [t for s in self.states for t in (s if isinstance(s, tuple) else (s,))]
        return sum(t.nbytes for t in tensors)


class Based(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    Built on the meta device and materialised on the current default device, then filled by
    `init_weights` (the construction protocol of `models.llama.Llama`).
    """

    def __init__(self, config: BasedConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(BasedBlock(config, i) for i in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
            self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.to_empty(device=torch.get_default_device())
        self.init_weights()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for every position."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {tokens.shape[1]} tokens exceeds {self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self._logits(h)

    def make_cache(self, batch_size: int, max_seq_len: int) -> BasedCache:
        """Empty recurrent state for `forward_cached` (the generation interface, trainer/generate.py)."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's {self.config.max_seq_len}")
        device = self.tok_embeddings.weight.device
        return BasedCache([layer.mixer.make_state(batch_size, device) for layer in self.layers], max_seq_len)

    def forward_cached(self, tokens: Tensor, cache: BasedCache) -> Tensor:
        """Logits (B, t, V) of `tokens` (B, t) continuing the cached context; updates the cache."""
        start, end = cache.seq_len, cache.seq_len + tokens.shape[1]
        if end > cache.max_seq_len:
            raise ValueError(f"max_seq_len: the cache allows {cache.max_seq_len} positions, {end} requested")
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h, cache.states[i] = layer.forward_cached(h, cache.states[i], self.rope_cos, self.rope_sin, start)
        cache.seq_len = end
        return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        return F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables from torch's global RNG.

        Linears and the embedding are N(0, init_std); the residual-branch output projections use
        init_std / sqrt(2 * n_layers) (GPT-2's depth scaling, Radford et al. 2019, section 2.3),
        as wren's Llama does.
        """
        cfg = self.config
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=cfg.init_std)
        for layer in self.layers:
            layer.init_weights(std=cfg.init_std, out_std=out_std)
        self.norm.init_weights()
        if self.output is not None:
            nn.init.normal_(self.output.weight, mean=0.0, std=cfg.init_std)
        with torch.no_grad():
            cos, sin = rope_cos_sin(rope_inv_freq(cfg.head_dim, cfg.rope_theta, device=self.rope_cos.device), cfg.max_seq_len)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once); optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.tok_embeddings.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), 6 * N_matmul plus the mixers' own products.

        N_matmul counts every linear's weights and the output projection (the convention of
        `Llama.flops_per_token`). Each linear-attention layer adds 6 * 2 * H * F * d_h for its state
        update and read-out (the recurrent form's products, F = taylor_state_dim(d')); each sliding-window
        layer adds 12 * dim * min(seq_len, window_tokens + 1) for QK^T and AV over the keys it reads.
        Convolution and feature-map elementwise work is not counted.
        """
        cfg = self.config
        linears = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul_params = linears + (cfg.vocab_size * cfg.dim if self.output is None else 0)
        features = taylor_state_dim(cfg.feature_dim)
        linear_attention = 12.0 * cfg.n_heads * features * cfg.head_dim * len(cfg.linear_attention_layers)
        window = 12.0 * cfg.dim * min(seq_len, cfg.window_tokens + 1) * len(cfg.sliding_window_layers)
        return 6.0 * matmul_params + linear_attention + window
