"""The Llama decoder on one device, with no parallelism (that lives in `parallelize.py`).

Module names follow torchtitan (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`,
`attention_norm`, `ffn_norm`, `norm`, `output`); `hf_adapter.py` maps them to Hugging Face's.
The numerics follow Hugging Face's `LlamaForCausalLM` (fp32 RMSNorm, rotate-half RoPE), which is
the test oracle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention import attention, build_attention_kind
from models.llama.cache import KVCache
from models.llama.config import LlamaConfig
from models.llama.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["Attention", "FeedForward", "Llama", "LlamaConfig", "RMSNorm", "TransformerBlock"]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight, as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of x."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def init_weights(self) -> None:
        """Set the gain to one."""
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads (no biases).

    The attention itself is `kernel`, the kind `config.attention` names (exact softmax or
    HyperAttention; `layer_id` seeds HyperAttention's hyperplanes). Incremental decoding with a
    KV cache always uses exact attention for the new queries against the cache.
    """

    def __init__(self, config: LlamaConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale or None  # None: SDPA's 1/sqrt(head_dim)
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.kernel = build_attention_kind(config.attention, self.head_dim, config.hyper_params, seed=layer_id)

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        q, k, v = self._qkv(x, cos, sin)
        out = self.kernel(q, k, v, causal=True, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """x (B, t, dim) at positions start .. start + t - 1; writes their k, v into the cache."""
        end = start + x.shape[1]
        q, k, v = self._qkv(x, cos[start:end], sin[start:end])
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        if start == 0:  # prefill: the configured kind, as in training
            out = self.kernel(q, k, v, causal=True, scale=self.scale)
        else:
            out = attention(q, keys[:, :, :end], values[:, :, :end], causal=True, scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal init; the output projection gets the depth-scaled `out_std`."""
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)
        self.kernel.init_weights()


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x) (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal init; the down projection gets the depth-scaled `out_std`."""
        nn.init.normal_(self.w1.weight, mean=0.0, std=std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, config: LlamaConfig, layer_id: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """`forward` for new positions start .. start + t - 1, reading and extending the KV cache."""
        h = x + self.attention.forward_cached(self.attention_norm(x), cos, sin, keys, values, start)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Initialise both sub-layers and both norms."""
        self.attention_norm.init_weights()
        self.attention.init_weights(std=std, out_std=out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std=std, out_std=out_std)


class Llama(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    The modules are created on the meta device and materialised on the current default device
    (`torch.get_default_device()`, so `with torch.device("meta")` keeps the model abstract), then
    `init_weights` fills them. Construction therefore draws nothing from the RNG besides
    `init_weights`, and a meta build followed by `to_empty` + `init_weights` under the same seed
    gives the same weights as a direct build.

    With `tie_embeddings`, `output` is None and the logits reuse `tok_embeddings.weight`, so there
    is a single parameter however the model is moved, materialised or sharded.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
            self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.to_empty(device=torch.get_default_device())
        self.init_weights()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for every position, in the compute dtype (bf16 under autocast)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {tokens.shape[1]} tokens exceeds {self.config.max_seq_len}")
        h = self._embed(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self._logits(h)

    def make_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """An empty KV cache for `forward_cached` (the generation interface, trainer/generate.py)."""
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's {self.config.max_seq_len}")
        weight = self.tok_embeddings.weight
        return KVCache.allocate(
            self.config.n_layers, batch_size, self.config.kv_heads, max_seq_len, self.config.head_dim,
            dtype=weight.dtype, device=weight.device,
        )

    def forward_cached(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, t, V) of `tokens` (B, t) continuing the cached context; extends the cache.

        Equal to the last t rows of `forward` on the whole context (exact attention for the new
        queries; the first call, the prefill, uses the configured attention kind).
        """
        start, end = cache.seq_len, cache.seq_len + tokens.shape[1]
        if end > cache.max_seq_len:
            raise ValueError(f"max_seq_len: the cache holds {cache.max_seq_len} positions, {end} requested")
        h = self._embed(tokens)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            h = layer.forward_cached(h, self.rope_cos, self.rope_sin, keys, values, start)
        cache.seq_len = end
        return self._logits(h)

    def _embed(self, tokens: Tensor) -> Tensor:
        h = self.tok_embeddings(tokens)
        if self.config.embedding_scale != 1.0:
            h = h * self.config.embedding_scale
        return h

    def _logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if self.output is None:
            logits = F.linear(h, self.tok_embeddings.weight)
        else:
            logits = self.output(h)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        return logits

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables from torch's global RNG.

        Linears and the embedding are N(0, init_std); the residual-branch output projections
        (`wo`, `w2`) use init_std / sqrt(2 * n_layers), the depth scaling of GPT-2 (Radford et al.
        2019, section 2.3) as torchtitan applies it; norm gains are one.
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
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device=self.rope_cos.device)
            cos, sin = rope_cos_sin(inv_freq, cfg.max_seq_len)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied matrix counts once); optionally without the token embedding.

        With tied embeddings, excluding the embedding also excludes the output projection, which
        is the same matrix.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 * N + 12 * n_layers * dim * seq_len, the convention of PaLM (Chowdhery et al. 2022,
        appendix B) and Chinchilla (Hoffmann et al. 2022, appendix F): N counts the weights of
        every matmul, i.e. all linears including the output projection (tied or not) and not the
        embedding lookup or the norms; each weight costs 2 FLOPs forward and 4 backward. The
        attention term is the QK^T and AV products over all `seq_len` keys, counted in full for
        causal attention as PaLM does.
        """
        cfg = self.config
        kv_dim = cfg.kv_heads * cfg.head_dim
        per_layer = 2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim + 3 * cfg.dim * cfg.ffn_hidden_dim
        matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim
        return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.dim * seq_len
