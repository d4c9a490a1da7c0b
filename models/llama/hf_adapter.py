"""Map wren Llama configs and weights to and from Hugging Face `LlamaForCausalLM`.

The weights map one-to-one by name, with no reshaping: wren's RoPE uses the same rotate-half
layout as Hugging Face, so q/k projections need no permutation. With tied embeddings Hugging Face
checkpoints leave `lm_head.weight` out (it is the embedding), and so does `to_hf_state_dict`.

`transformers` is an optional dependency and is imported inside the functions that need it. The
config mapping uses transformers 5's `rope_parameters`; `from_hf_config` also reads the older
`rope_theta` / `rope_scaling` attributes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from torch import Tensor

from models.llama.config import LlamaConfig

if TYPE_CHECKING:
    import transformers

__all__ = ["from_hf_config", "from_hf_state_dict", "to_hf_config", "to_hf_state_dict"]

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_WREN_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Older Hugging Face checkpoints store the RoPE table; wren recomputes it.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _rope_parameters(cfg: LlamaConfig) -> dict[str, Any]:
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "llama3",
        "rope_theta": cfg.rope_theta,
        "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_seq_len,
    }


def to_hf_config(cfg: LlamaConfig) -> transformers.LlamaConfig:
    """The Hugging Face config of the same architecture."""
    import transformers

    cfg.validate()
    for name, default in (("attention_scale", 0.0), ("embedding_scale", 1.0), ("logit_scale", 1.0)):
        if getattr(cfg, name) != default:
            raise ValueError(f"{name}: Hugging Face Llama has no equivalent of {name}={getattr(cfg, name)}")
    if cfg.attention != "softmax":
        raise ValueError(f"attention: Hugging Face Llama has no equivalent of attention={cfg.attention!r}")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_parameters(cfg),
        attention_bias=False,
        mlp_bias=False,
    )


def _hf_rope(hf: Any) -> dict[str, Any]:
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        params = {**(getattr(hf, "rope_scaling", None) or {}), "rope_theta": hf.rope_theta}
    if "type" in params and "rope_type" not in params:
        params = {**params, "rope_type": params["type"]}
    return params


def from_hf_config(hf: Any) -> LlamaConfig:
    """The wren config of a Hugging Face `LlamaConfig`; ValueError for features wren lacks.

    Multi-head attention (as many kv heads as query heads) comes back as `n_kv_heads=None`.
    """
    for name, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if getattr(hf, name, wanted) != wanted:
            raise ValueError(f"{name}: wren's Llama needs {wanted!r}, got {getattr(hf, name)!r}")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ValueError(
            f"head_dim: wren needs head_dim * num_attention_heads == hidden_size, got "
            f"{head_dim} * {hf.num_attention_heads} != {hf.hidden_size}"
        )
    rope = _hf_rope(hf)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} is not supported (wren has default, llama3)")
    scaling = {}
    if rope_type == "llama3":
        scaling = {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    cfg = LlamaConfig(
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=None if hf.num_key_value_heads in (None, hf.num_attention_heads) else hf.num_key_value_heads,
        vocab_size=hf.vocab_size,
        ffn_hidden_dim=hf.intermediate_size,
        norm_eps=hf.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
        **scaling,
    )
    cfg.validate()
    return cfg


def _expected_wren_keys(cfg: LlamaConfig) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{name}" for i in range(cfg.n_layers) for name in _PER_LAYER
    }
    return keys if cfg.tie_embeddings else keys | {"output.weight"}


def _check_keys(got: set[str], wanted: set[str], what: str) -> None:
    missing, unexpected = sorted(wanted - got), sorted(got - wanted)
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def _hf_name(key: str) -> str:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    layer, name = _WREN_LAYER.fullmatch(key).groups()
    return f"model.layers.{layer}.{_PER_LAYER[name]}"


def to_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Rename a wren state dict to Hugging Face names (same tensors, no copies)."""
    _check_keys(set(sd), _expected_wren_keys(cfg), "wren state dict")
    return {_hf_name(key): value for key, value in sd.items()}


def from_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    """Rename a Hugging Face state dict to wren names (same tensors, no copies).

    With tied embeddings a `lm_head.weight` entry, if present, is dropped: it is the embedding.
    """
    from_top = {hf: wren for wren, hf in _TOP_LEVEL.items()}
    from_layer = {hf: wren for wren, hf in _PER_LAYER.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _HF_IGNORED.fullmatch(key) or (cfg.tie_embeddings and key == "lm_head.weight"):
            continue
        match = _HF_LAYER.fullmatch(key)
        if key in from_top:
            out[from_top[key]] = value
        elif match is not None and match.group(2) in from_layer:
            out[f"layers.{match.group(1)}.{from_layer[match.group(2)]}"] = value
        else:
            raise ValueError(f"Hugging Face state dict: no wren parameter for key {key!r}")
    _check_keys(set(out), _expected_wren_keys(cfg), "Hugging Face state dict")
    return out
