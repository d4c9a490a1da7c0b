"""Lizard decoders (gated linear attention + meta-memory sliding window): flavors and the "lizard" `ModelSpec`.

The shapes are the Llama flavors' (a Lizard model is normally made by linearizing a Llama of the
same shape, `wren linearize`); `vocab_size` is a placeholder the trainer replaces with the
tokenizer's. Lizard has no Hugging Face architecture, so the spec has no `hf_adapter`.
"""

from models.lizard.config import LizardConfig
from models.registry import ModelSpec, lazy_exports, register_model

__all__ = ["Lizard", "LizardCache", "LizardConfig", "flavors", "parallelize_lizard"]

# The model and its sharding import torch: loaded on first use.
__getattr__ = lazy_exports({"Lizard": "models.lizard.model:Lizard", "parallelize_lizard": "models.lizard.parallelize:parallelize_lizard", "LizardCache": "models.lizard.model:LizardCache"})

flavors: dict[str, LizardConfig] = {
    # The Llama "tiny" shape with a window and feature map sized to it; trains on 2 CPU cores.
    "tiny": LizardConfig(
        dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=688, tie_embeddings=True, max_seq_len=1024,
        window_size=64, feature_dim=64,
    ),
    # Llama-3.2-1B's shape (paper appendix linearizes Llama-3.2-1B) with the paper's w = 128, m = 4, F = 128.
    "1B": LizardConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, rope_theta=500000.0,
        rope_scaling_factor=32.0, rope_original_max_seq_len=8192, max_seq_len=8192, tie_embeddings=True,
    ),
    # Llama-3-8B's shape, the paper's main teacher (Table 1).
    "8B": LizardConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, rope_theta=500000.0,
        rope_scaling_factor=8.0, rope_original_max_seq_len=8192, max_seq_len=8192,
    ),
}

register_model(
    ModelSpec(
        name="lizard",
        config_cls=LizardConfig,
        flavors=flavors,
        model_path="models.lizard.model:Lizard",
        parallelize_path="models.lizard.parallelize:parallelize_lizard",
    )
)
