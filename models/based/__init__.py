"""BASED decoders (Arora et al., ICML 2024, arXiv 2402.18668): flavors and the registered "based" spec.

Hugging Face `transformers` has no BASED architecture, so the spec has no `hf_adapter` (None):
BASED weights live in wren's DCP checkpoints only.

Layer mixes: the 360M and 1.3B flavors are the reference configs' shapes
(HazyResearch/based, train/configs/experiment/reference/based-360m.yaml and
based_1.3b_50b_tok.yaml): linear attention at layers 1, 6, 11, ..., sliding-window attention at
2, 7, 12, ..., BaseConv elsewhere; SwiGLU width 2 * dim; 16 heads; feature_dim 16. The small
flavors keep the same period-5 pattern. `vocab_size` is a placeholder for the tokenizer's.
"""

from models.based.config import BasedConfig
from models.registry import ModelSpec, lazy_exports, register_model

__all__ = ["Based", "BasedConfig", "flavors", "parallelize_based"]

# The model and its sharding import torch: loaded on first use.
__getattr__ = lazy_exports({"Based": "models.based.model:Based", "parallelize_based": "models.based.parallelize:parallelize_based"})

flavors: dict[str, BasedConfig] = {
    # A few M parameters; trains quickly on 2 CPU cores.
    "tiny": BasedConfig(
        dim=256, n_layers=5, n_heads=4, ffn_hidden_dim=512,
        linear_attention_layers=[1], sliding_window_layers=[2], max_seq_len=1024,
    ),
    "small": BasedConfig(
        dim=512, n_layers=10, n_heads=8, ffn_hidden_dim=1024,
        linear_attention_layers=[1, 6], sliding_window_layers=[2, 7], max_seq_len=1024,
    ),
    "360M": BasedConfig(
        dim=1024, n_layers=27, n_heads=16, ffn_hidden_dim=2048,
        linear_attention_layers=[1, 6, 11, 16, 21], sliding_window_layers=[2, 7, 12, 17, 22],
    ),
    "1.3B": BasedConfig(
        dim=1792, n_layers=36, n_heads=16, ffn_hidden_dim=3584,
        linear_attention_layers=[1, 6, 11, 16, 21, 27, 33], sliding_window_layers=[2, 7, 12, 17, 22, 28, 34],
    ),
}

register_model(
    ModelSpec(
        name="based",
        config_cls=BasedConfig,
        flavors=flavors,
        model_path="models.based.model:Based",
        parallelize_path="models.based.parallelize:parallelize_based",
    )
)
