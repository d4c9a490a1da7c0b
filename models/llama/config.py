"""`LlamaConfig`: the shape and numerics of a Llama-family decoder, with validation."""

from __future__ import annotations

from dataclasses import dataclass

from models.attention.params import ATTENTION_KIND_NAMES, HyperParams
from models.llama.rope_scaling import Llama3RopeScaling

__all__ = ["LlamaConfig"]


@dataclass(kw_only=True)
class LlamaConfig:
    """A Llama decoder: pre-norm RMSNorm blocks, RoPE, grouped-query attention, SwiGLU MLP.

    Attributes:
        dim: model width (residual stream).
        n_layers: number of transformer blocks.
        n_heads: query heads; must divide `dim`.
        n_kv_heads: key/value heads; None means `n_heads` (MHA), 1 is MQA, otherwise GQA.
        vocab_size: embedding rows (the flavors' value is a placeholder for the tokenizer's).
        ffn_hidden_dim: SwiGLU hidden width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling_factor: 0 turns Llama-3.1 RoPE scaling off; > 0 is its `factor`.
        rope_low_freq_factor: Llama-3.1 scaling `low_freq_factor`.
        rope_high_freq_factor: Llama-3.1 scaling `high_freq_factor`.
        rope_original_max_seq_len: Llama-3.1 scaling's original context length.
        max_seq_len: longest sequence the model accepts (size of the RoPE tables).
        tie_embeddings: share the token embedding with the output projection.
        init_std: standard deviation of the normal weight init.
        attention_scale: softmax temperature of q k^T; 0 = 1/sqrt(head_dim) (muP uses 1/head_dim).
        embedding_scale: multiplier on the token embedding's output (muP's input multiplier).
        logit_scale: multiplier on the output logits (muP's readout 1/width_mult).
        attention: attention kind, one of `models.attention.params.ATTENTION_KIND_NAMES`: "softmax" (exact)
            or "hyper" (HyperAttention). Both have the same weights, so a checkpoint trained with
            one runs with the other.
        hyper_lsh_num_projs: HyperAttention's LSH hyperplanes (2^r buckets).
        hyper_block_size: HyperAttention's keys per block of the block-diagonal part.
        hyper_sample_size: HyperAttention's sampled residual key columns per head.
        hyper_min_seq_len: HyperAttention is exact up to this many keys.
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
    embedding_scale: float = 1.0
    logit_scale: float = 1.0
    attention: str = "softmax"
    # HyperAttention's defaults (Han et al. 2024, insuhan/hyper-attn README).
    hyper_lsh_num_projs: int = 7
    hyper_block_size: int = 256
    hyper_sample_size: int = 256
    hyper_min_seq_len: int = 4096

    @property
    def hyper_params(self) -> HyperParams:
        """The HyperAttention parameters these fields describe."""
        return HyperParams(
            lsh_num_projs=self.hyper_lsh_num_projs,
            block_size=self.hyper_block_size,
            sample_size=self.hyper_sample_size,
            min_seq_len=self.hyper_min_seq_len,
        )

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
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std", "embedding_scale", "logit_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.attention_scale < 0:
            raise ValueError(f"attention_scale: must be 0 (1/sqrt(head_dim)) or positive, got {self.attention_scale!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"n_heads: {self.n_heads} does not divide dim={self.dim}")
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"n_heads: head_dim = dim / n_heads = {self.head_dim} must be even for RoPE"
            )
        if self.n_kv_heads is not None:
            if not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0:
                raise ValueError(f"n_kv_heads: must be a positive integer or None, got {self.n_kv_heads!r}")
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.attention not in ATTENTION_KIND_NAMES:
            raise ValueError(f"attention: must be one of {', '.join(ATTENTION_KIND_NAMES)}, got {self.attention!r}")
        try:
            self.hyper_params.validate()
        except ValueError as err:
            raise ValueError(f"hyper_{err}") from None
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling_factor < 0:
            raise ValueError(f"rope_scaling_factor: must be >= 0 (0 = off), got {self.rope_scaling_factor!r}")
        if self.rope_scaling_factor == 0:
            return
        if self.rope_original_max_seq_len <= 0:
            raise ValueError(
                f"rope_original_max_seq_len: must be positive, got {self.rope_original_max_seq_len!r}"
            )
        if not self.rope_low_freq_factor > 0:
            raise ValueError(f"rope_low_freq_factor: must be positive, got {self.rope_low_freq_factor!r}")
        if not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(
                f"rope_high_freq_factor: {self.rope_high_freq_factor} must exceed "
                f"rope_low_freq_factor={self.rope_low_freq_factor}"
            )
