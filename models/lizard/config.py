"""`LizardConfig`: a Llama-shaped decoder whose attention is Lizard's (gated linear + meta-memory window).

The shape fields mean exactly what they mean in `LlamaConfig`, so a Llama teacher's weights
(embeddings, norms, q/k/v/o projections, MLPs) load into a Lizard model of the same shape; the
Lizard fields add the new attention's hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.llama.rope_scaling import Llama3RopeScaling

__all__ = ["LizardConfig"]


@dataclass(kw_only=True)
class LizardConfig:
    """A Lizard decoder (Nguyen et al. 2025, "Lizard: An Efficient Linearization Framework", arXiv:2507.09025).

    Attributes:
        dim: model width (residual stream).
        n_layers: number of blocks.
        n_heads: query heads; must divide `dim`.
        n_kv_heads: key/value heads (None = `n_heads`), as in the Llama teacher.
        vocab_size: embedding rows (the flavors' value is a placeholder for the tokenizer's).
        ffn_hidden_dim: SwiGLU hidden width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base, used only by the window branch when `window_rope` is on.
        rope_scaling_factor: Llama-3.1 RoPE scaling factor (0 = off), as in `LlamaConfig`.
        rope_low_freq_factor: Llama-3.1 scaling `low_freq_factor`.
        rope_high_freq_factor: Llama-3.1 scaling `high_freq_factor`.
        rope_original_max_seq_len: Llama-3.1 scaling's original context length.
        max_seq_len: longest training sequence (and the RoPE table size); generation with the
            recurrent cache has no length limit unless `window_rope` is on.
        tie_embeddings: share the token embedding with the output projection.
        init_std: standard deviation of the normal weight init.
        attention_scale: softmax temperature of the window branch; 0 = 1/sqrt(head_dim).
        window_size: w, keys of the sliding-window branch, the query's own included.
        n_meta_tokens: m, learnable meta-memory logits per head (attention sinks with no value).
        feature_dim: output width of each Hedgehog projection; phi(x) has 2 * feature_dim entries.
        chunk_size: tokens per chunk of the chunked (training) form of gated linear attention.
        window_rope: rotate q/k of the window branch with RoPE (the gated branch never uses RoPE).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = 8192
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_scale: float = 0.0
    # Lizard's defaults, paper section 4 and Table 13: w = 128, m = 4, Hedgehog feature dimension 128.
    window_size: int = 128
    n_meta_tokens: int = 4
    feature_dim: int = 128
    chunk_size: int = 64
    window_rope: bool = False

    @property
    def head_dim(self) -> int:
        """Width of one attention head, `dim // n_heads`."""
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads with the MHA default resolved."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rope_scaling(self) -> Llama3RopeScaling | None:
        """The Llama-3.1 RoPE scaling these fields describe, or None when it is off."""
        if self.rope_scaling_factor == 0:
            return None
        return Llama3RopeScaling(
            factor=self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_seq_len=self.rope_original_max_seq_len,
        )

    def validate(self) -> None:
        """Raise ValueError, starting with the offending field's name, if the shape is impossible."""
        for name in (
            "dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden_dim", "max_seq_len",
            "window_size", "feature_dim", "chunk_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not isinstance(self.n_meta_tokens, int) or self.n_meta_tokens < 0:
            raise ValueError(f"n_meta_tokens: must be a non-negative integer, got {self.n_meta_tokens!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.attention_scale < 0:
            raise ValueError(f"attention_scale: must be 0 (1/sqrt(head_dim)) or positive, got {self.attention_scale!r}")
        if self.rope_scaling_factor < 0:
            raise ValueError(f"rope_scaling_factor: must be >= 0 (0 = off), got {self.rope_scaling_factor!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"n_heads: {self.n_heads} does not divide dim={self.dim}")
        if self.window_rope and self.head_dim % 2 != 0:
            raise ValueError(f"window_rope: head_dim = {self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None:
            if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
                raise ValueError(f"n_kv_heads: must be a positive integer or None, got {self.n_kv_heads!r}")
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
