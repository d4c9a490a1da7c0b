"""`BasedConfig`: the shape of a BASED language model (Arora et al., ICML 2024, arXiv 2402.18668)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BasedConfig"]


@dataclass(kw_only=True)
class BasedConfig:
    """A BASED decoder: pre-norm RMSNorm blocks, each a sequence mixer plus a SwiGLU MLP.

    Every layer's mixer is one of three kinds: Taylor linear attention (the layers listed in
    `linear_attention_layers`), sliding-window softmax attention with RoPE (`sliding_window_layers`),
    or a gated short convolution (BaseConv, all other layers). There are no absolute position
    embeddings.

    Attributes:
        dim: model width (residual stream).
        n_layers: number of blocks.
        n_heads: heads of the linear-attention and sliding-window layers; must divide `dim`.
        vocab_size: embedding rows (the flavors' value is a placeholder for the tokenizer's).
        ffn_hidden_dim: SwiGLU hidden width (the reference uses 2 * dim).
        feature_dim: per-head q/k width d' of linear attention before the Taylor map
            (1 + d' + d'^2 features).
        linear_attention_layers: indices of the Taylor linear-attention layers.
        sliding_window_layers: indices of the sliding-window attention layers.
        window_tokens: keys behind the query that sliding-window attention reads (plus itself),
            flash-attn's window (w, 0).
        conv_kernel_size: taps of BaseConv's causal depthwise convolution.
        conv_expand: BaseConv's input projection widens dim to conv_expand * dim, split in two halves.
        chunk_size_tokens: chunk length of the chunked linear-attention training form.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base of the sliding-window layers.
        max_seq_len: longest sequence the model accepts (size of the RoPE tables).
        tie_embeddings: share the token embedding with the output projection.
        init_std: standard deviation of the normal weight init.
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int = 8192
    ffn_hidden_dim: int
    # BASED's published defaults (HazyResearch/based, train/configs/experiment/reference/
    # based-360m.yaml and based_1.3b_50b_tok.yaml): feature_dim 16, window_size 256 passed to
    # flash-attn as (256 // 2, 0), BaseConv kernel 3 with expand_proj 4.
    feature_dim: int = 16
    linear_attention_layers: list[int] = field(default_factory=list)
    sliding_window_layers: list[int] = field(default_factory=list)
    window_tokens: int = 128
    conv_kernel_size: int = 3
    conv_expand: int = 4
    chunk_size_tokens: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        """Width of one value head (and of one sliding-window head), `dim // n_heads`."""
        return self.dim // self.n_heads

    def mixer_kind(self, layer: int) -> str:
        """"linear_attention", "sliding_window" or "conv" for block `layer`."""
        if layer in self.linear_attention_layers:
            return "linear_attention"
        if layer in self.sliding_window_layers:
            return "sliding_window"
        return "conv"

    def validate(self) -> None:
        """Raise ValueError, starting with the offending field's name, if the shape is impossible."""
        for name in (
            "dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden_dim", "feature_dim", "conv_kernel_size",
            "chunk_size_tokens", "max_seq_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if self.window_tokens < 0:
            raise ValueError(f"window_tokens: must be 0 or positive, got {self.window_tokens}")
        if self.conv_expand < 2 or self.conv_expand % 2:
            raise ValueError(f"conv_expand: must be an even integer >= 2, got {self.conv_expand}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"n_heads: {self.n_heads} does not divide dim={self.dim}")
        if self.sliding_window_layers and self.head_dim % 2 != 0:
            raise ValueError(f"n_heads: head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        for name in ("linear_attention_layers", "sliding_window_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"{name}: layer indices {bad} are outside 0 .. {self.n_layers - 1}")
        both = sorted(set(self.linear_attention_layers) & set(self.sliding_window_layers))
        if both:
            raise ValueError(f"sliding_window_layers: layers {both} are also linear_attention_layers")
