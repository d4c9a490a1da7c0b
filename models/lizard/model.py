"""The Lizard decoder on one device: a Llama whose softmax attention is replaced by Lizard attention.

Lizard attention (Nguyen et al. 2025, arXiv:2507.09025, section 3) sums two branches over the
teacher's q/k/v projections:

    Y = Y_gate + alpha * Y_window

- Y_gate: gated linear attention over the whole prefix on RoPE-free q and k, with learnable
  Hedgehog feature maps phi_q, phi_k (one (head_dim x feature_dim) map per head, untied for q and
  k, as LoLCATs' `FeatureMapMLP` + `SoftmaxDim`) and the scalar gate gamma_i = sigmoid(W_gamma x_i)
  per head (the paper's default "scalar gating", its Table 4);
- Y_window: softmax attention over the last `window_size` tokens with `n_meta_tokens` learnable
  meta-memory logits per head as sinks.
The branches are normalised separately; alpha is a learnable per-head scalar (initialised at 1).

Parameter names follow `models.llama` (`layers.N.attention.wq`, ...) so a Llama checkpoint's
weights load by name; the new ones are `feature_map_q`, `feature_map_k`, `gate.weight`,
`meta_logits` and `window_factor` under `layers.N.attention`.

Generation keeps, per layer, the gated state (heads x 2F x (head_dim + 1)) and the last
`window_size` keys/values: memory independent of the context length (`LizardCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.lizard.config import LizardConfig
from models.lizard.ops import gla_chunked, gla_recurrent, hedgehog, window_attention
from models.llama.model import FeedForward, RMSNorm
from models.llama.rope import apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["Lizard", "LizardAttention", "LizardBlock", "LizardCache", "LizardLayerCache"]


@dataclass
class LizardLayerCache:
    """One layer's generation state.

    Attributes:
        state: (B, H, 2F, head_dim + 1) fp32, the gated linear attention state and its normaliser.
        keys: (B, H_kv, P, head_dim) with P <= window_size, the most recent keys (RoPE applied
            when `window_rope`).
        values: (B, H_kv, P, head_dim), their values.
    """

    state: Tensor
    keys: Tensor
    values: Tensor


@dataclass
class LizardCache:
    """Every layer's state plus the number of positions consumed (the next token's position)."""

    layers: list[LizardLayerCache]
    seq_len: int = 0

    def nbytes(self) -> int:
        """Bytes held, bounded by the window and the state size whatever the context length."""
        return sum(t.nbytes for layer in self.layers for t in (layer.state, layer.keys, layer.values))


class LizardAttention(nn.Module):
    """Gated linear attention + meta-memory sliding-window attention over shared q/k/v projections."""

    def __init__(self, config: LizardConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.window_size = config.window_size
        self.chunk_size = config.chunk_size
        self.window_rope = config.window_rope
        self.scale = config.attention_scale or 1.0 / math.sqrt(self.head_dim)
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.feature_map_q = nn.Parameter(torch.empty(self.n_heads, self.head_dim, config.feature_dim))
        self.feature_map_k = nn.Parameter(torch.empty(self.n_heads, self.head_dim, config.feature_dim))
        self.gate = nn.Linear(config.dim, self.n_heads, bias=False)
        self.meta_logits = nn.Parameter(torch.empty(self.n_heads, config.n_meta_tokens))
        self.window_factor = nn.Parameter(torch.empty(self.n_heads))

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _ = x.shape
        q = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _expand(self, t: Tensor) -> Tensor:
        """kv heads -> query heads (query head h reads kv head h // (H / H_kv), as GQA)."""
        groups = self.n_heads // self.n_kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def _gate_features(self, x: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """phi_q(q), phi_k(k) on RoPE-free q, k and log gamma = log sigmoid(W_gamma x), (B, H, T)."""
        log_gate = F.logsigmoid(self.gate(x).float()).transpose(1, 2)
        return hedgehog(q, self.feature_map_q), hedgehog(self._expand(k), self.feature_map_k), log_gate

    def _rotate(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, start: int) -> tuple[Tensor, Tensor]:
        if not self.window_rope:
            return q, k
        end = start + q.shape[2]
        return apply_rope(q, k, cos[start:end], sin[start:end])

    def _combine(self, y_gate: Tensor, y_window: Tensor) -> Tensor:
        return y_gate + self.window_factor.to(y_window.dtype)[None, :, None, None] * y_window

    def attend(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The per-head outputs before `wo`, (B, H, T, head_dim): what attention transfer matches."""
        q, k, v = self._project(x)
        phi_q, phi_k, log_gate = self._gate_features(x, q, k)
        y_gate, _ = gla_chunked(phi_q, phi_k, self._expand(v), log_gate, chunk_size=self.chunk_size)
        q_w, k_w = self._rotate(q, k, cos, sin, 0)
        y_window = window_attention(
            q_w, self._expand(k_w), self._expand(v), self.meta_logits, window=self.window_size, scale=self.scale
        )
        return self._combine(y_gate, y_window)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim), the chunked (training) form."""
        out = self.attend(x, cos, sin)
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LizardLayerCache, start: int) -> Tensor:
        """x (B, t, dim) at positions start .. start + t - 1, continuing `cache` (updated in place).

        One token uses the recurrence; several (a prompt) use the chunked form from the cached state.
        """
        q, k, v = self._project(x)
        phi_q, phi_k, log_gate = self._gate_features(x, q, k)
        gla = gla_recurrent if x.shape[1] == 1 else _chunked(self.chunk_size)
        y_gate, cache.state = gla(phi_q, phi_k, self._expand(v), log_gate, cache.state)
        q_w, k_w = self._rotate(q, k, cos, sin, start)
        y_window = window_attention(
            q_w, self._expand(k_w), self._expand(v), self.meta_logits, window=self.window_size, scale=self.scale,
            k_prefix=self._expand(cache.keys), v_prefix=self._expand(cache.values),
        )
        cache.keys = torch.cat((cache.keys, k_w), dim=2)[:, :, -self.window_size :]
        cache.values = torch.cat((cache.values, v), dim=2)[:, :, -self.window_size :]
        out = self._combine(y_gate, y_window)
        return self.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))

    def init_lizard_weights(self) -> None:
        """Initialise only the parameters Lizard adds (linearization keeps the teacher's q/k/v/o).

        Feature maps: Kaiming-uniform, as LoLCATs' `FeatureMapMLP`; gate: zero, so gamma starts at
        sigmoid(0) = 1/2 everywhere; meta logits: zero (each sink starts at exp(0) = 1); alpha: 1.
        """
        nn.init.kaiming_uniform_(self.feature_map_q)
        nn.init.kaiming_uniform_(self.feature_map_k)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.meta_logits)
        nn.init.ones_(self.window_factor)

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal init of the projections (`wo` with the depth-scaled `out_std`), then Lizard's own."""
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)
        self.init_lizard_weights()


def _chunked(chunk_size: int):
    def run(phi_q: Tensor, phi_k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return gla_chunked(phi_q, phi_k, v, log_gate, state, chunk_size=chunk_size)

    return run


class LizardBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, config: LizardConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = LizardAttention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, T, dim) -> (B, T, dim)."""
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, cache: LizardLayerCache, start: int) -> Tensor:
        """`forward` for new positions, continuing this layer's cache."""
        h = x + self.attention.forward_cached(self.attention_norm(x), cos, sin, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Initialise both sub-layers and both norms."""
        self.attention_norm.init_weights()
        self.attention.init_weights(std=std, out_std=out_std)
        self.ffn_norm.init_weights()
        self.feed_forward.init_weights(std=std, out_std=out_std)


class Lizard(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size), with Lizard attention in every block.

    Built like `models.llama.Llama`: modules on the meta device, materialised on the default
    device, then `init_weights` (the only RNG use). `tie_embeddings` shares the embedding matrix.
    """

    def __init__(self, config: LizardConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(LizardBlock(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
            self.register_buffer("rope_cos", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(config.max_seq_len, config.head_dim), persistent=False)
        self.to_empty(device=torch.get_default_device())
        self.init_weights()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits for every position (chunked form), in the compute dtype."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape (batch, seq_len), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: sequence of {tokens.shape[1]} tokens exceeds {self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self._logits(h)

    def make_cache(self, batch_size: int, max_seq_len: int) -> LizardCache:
        """An empty generation cache (the interface of trainer/generate.py); its size ignores `max_seq_len`.

        With `window_rope`, positions index the RoPE table, so `max_seq_len` may not exceed the model's.
        """
        if self.config.window_rope and max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's {self.config.max_seq_len} (window_rope)")
        cfg = self.config
        device, dtype = self.tok_embeddings.weight.device, self.tok_embeddings.weight.dtype
        layers = [
            LizardLayerCache(
                state=torch.zeros(batch_size, cfg.n_heads, 2 * cfg.feature_dim, cfg.head_dim + 1, device=device),
                keys=torch.zeros(batch_size, cfg.kv_heads, 0, cfg.head_dim, device=device, dtype=dtype),
                values=torch.zeros(batch_size, cfg.kv_heads, 0, cfg.head_dim, device=device, dtype=dtype),
            )
            for _ in range(cfg.n_layers)
        ]
        return LizardCache(layers=layers)

    def forward_cached(self, tokens: Tensor, cache: LizardCache) -> Tensor:
        """Logits (B, t, V) of `tokens` (B, t) continuing the cached context; updates `cache` in place.

        Equal to the last t rows of `forward` on the whole context.
        """
        start = cache.seq_len
        if self.config.window_rope and start + tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"max_seq_len: position {start + tokens.shape[1]} exceeds {self.config.max_seq_len} (window_rope)")
        h = self.tok_embeddings(tokens)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer.forward_cached(h, self.rope_cos, self.rope_sin, layer_cache, start)
        cache.seq_len = start + tokens.shape[1]
        return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables from torch's global RNG, as `Llama.init_weights`."""
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
        """Distinct parameters (a tied matrix counts once); optionally without the token embedding."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), counted as `Llama.flops_per_token` does.

        6 * N over every matmul weight (projections, gate, feature maps, MLP, output), plus per
        layer and token the window branch (q k^T and p v over `window_size` keys: 4 * dim * w
        forward) and the gated branch (state read and write, 2 * 2 * H * 2F * (head_dim + 1)
        forward, plus the intra-chunk q k^T and p v over `chunk_size` keys), times 3 for backward.
        """
        cfg = self.config
        kv_dim = cfg.kv_heads * cfg.head_dim
        features = 2 * cfg.feature_dim
        per_layer = (
            2 * cfg.dim * cfg.dim + 2 * cfg.dim * kv_dim + 3 * cfg.dim * cfg.ffn_hidden_dim
            + cfg.dim * cfg.n_heads + 2 * cfg.n_heads * cfg.head_dim * cfg.feature_dim
        )
        matmul_params = cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim
        window = min(cfg.window_size, seq_len)
        chunk = min(cfg.chunk_size, seq_len)
        mixing = (
            4 * cfg.dim * window
            + 4 * cfg.n_heads * features * (cfg.head_dim + 1)
            + 2 * cfg.n_heads * chunk * (features + cfg.head_dim + 1)
        )
        return 6.0 * matmul_params + 3.0 * cfg.n_layers * mixing
