"""`MupConfig`, the `[mup]` section: torch-free, so that reading a recipe does not import torch.

What the fields do is `optim/mup.py`'s business (Yang et al. 2022, "Tensor Programs V").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MupConfig"]


@dataclass(kw_only=True)
class MupConfig:
    """muP: the base width at which it equals the standard parametrisation, and its multipliers."""

    enabled: bool = False
    base_dim: int = 256  # the width (model.dim) whose hyperparameters transfer
    base_ffn_hidden_dim: int = 0  # the MLP width at base_dim; 0 = model.ffn_hidden_dim * base_dim / model.dim
    input_mult: float = 1.0  # embedding output multiplier (MiniCPM's scale_emb)
    output_mult: float = 1.0  # logits multiplier at the base width (MuReadout's output_mult)
    attention_mult: float = 0.0  # softmax scale = attention_mult / head_dim; 0 = sqrt(base head_dim)
    zero_init_query: bool = False  # the mup README's recommendation for Transformers
    zero_init_readout: bool = False  # MuReadout(readout_zero_init=True); needs untied embeddings

    def validate(self) -> None:
        if self.base_dim < 1:
            raise ValueError(f"base_dim: must be a positive width, got {self.base_dim}")
        if self.base_ffn_hidden_dim < 0:
            raise ValueError(f"base_ffn_hidden_dim: must be 0 (proportional) or positive, got {self.base_ffn_hidden_dim}")
        for key in ("input_mult", "output_mult"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.attention_mult < 0:
            raise ValueError(f"attention_mult: must be 0 (sqrt of the base head_dim) or positive, got {self.attention_mult}")
