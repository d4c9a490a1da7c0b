"""The model registry: one `ModelSpec` per model family, looked up by name.

A model folder (`models/llama/`, ...) builds its spec in its `__init__.py` and calls
`register_model`; `models/__init__.py` imports every folder so that the registry is complete as
soon as `models` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelSpec", "get_model_spec", "register_model", "registered_models"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer needs to build, shard and export one model family.

    Attributes:
        name: registry key, used as `model.name` in recipes.
        config_cls: the family's config dataclass (for example `LlamaConfig`).
        model_cls: built as `model_cls(config)`.
        flavors: flavor name -> config instance. Their `vocab_size` is a placeholder that the
            trainer replaces with the tokenizer's.
        parallelize: `parallelize(model, mesh, *, activation_checkpointing, param_dtype,
            reduce_dtype) -> model`.
        hf_adapter: module with `to_hf_config`, `from_hf_config`, `to_hf_state_dict`,
            `from_hf_state_dict`, or None when the family has no Hugging Face equivalent.
    """

    name: str
    config_cls: type
    model_cls: type
    flavors: dict[str, Any]
    parallelize: Callable[..., Any]
    hf_adapter: Any


_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Add `spec` to the registry; a second spec under the same name is an error."""
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _MODELS[spec.name] = spec


def get_model_spec(name: str) -> ModelSpec:
    """The registered spec called `name`; a ValueError listing the known names otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def registered_models() -> list[str]:
    """Names of all registered model families, sorted."""
    return sorted(_MODELS)
