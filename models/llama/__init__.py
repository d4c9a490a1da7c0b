"""Llama-family decoders: flavors (sizes) and the registered "llama" `ModelSpec`.

`vocab_size` in every flavor is a placeholder: the trainer replaces it with the tokenizer's.
"""

from models.llama.config import LlamaConfig
from models.registry import ModelSpec, lazy_exports, register_model

__all__ = ["Llama", "LlamaConfig", "flavors", "parallelize_llama"]

# The model and its sharding import torch: loaded on first use (`from models.llama import Llama`).
__getattr__ = lazy_exports({"Llama": "models.llama.model:Llama", "parallelize_llama": "models.llama.parallelize:parallelize_llama"})

flavors: dict[str, LlamaConfig] = {
    # A few M parameters; trains quickly on 2 CPU cores.
    "tiny": LlamaConfig(
        dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=688, tie_embeddings=True, max_seq_len=1024
    ),
    "small": LlamaConfig(dim=512, n_layers=8, n_heads=8, ffn_hidden_dim=1376, max_seq_len=1024),
    "125M": LlamaConfig(dim=768, n_layers=12, n_heads=12, ffn_hidden_dim=2048),
    # Llama-3.2-1B's shape (Meta's released config.json): llama3 RoPE scaling, factor 32.
    "1B": LlamaConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_dim=8192,
        rope_theta=500000.0,
        rope_scaling_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_seq_len=8192,
        max_seq_len=8192,
        tie_embeddings=True,
    ),
    # Llama-3-8B's shape with Llama-3.1's RoPE scaling (factor 8; Meta's released config.json).
    "8B": LlamaConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden_dim=14336,
        rope_theta=500000.0,
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_seq_len=8192,
        max_seq_len=8192,
    ),
}

register_model(
    ModelSpec(
        name="llama",
        config_cls=LlamaConfig,
        flavors=flavors,
        model_path="models.llama.model:Llama",
        parallelize_path="models.llama.parallelize:parallelize_llama",
        hf_adapter_path="models.llama.hf_adapter",
    )
)
