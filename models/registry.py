"""The model registry: one `ModelSpec` per model family, looked up by name.

A model folder (`models/llama/`, ...) builds its spec in its `__init__.py` and calls
`register_model`; `models/__init__.py` imports every folder so that the registry is complete as
soon as `models` is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelSpec", "get_model_spec", "lazy_exports", "register_model", "registered_models"]


def _resolve(path: str) -> Any:
    """The object at "package.module:attribute", or the module itself for "package.module"."""
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def lazy_exports(exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) that imports each name of `exports` from its path on first use.

    Model packages export their (torch-importing) model classes this way, so that importing a
    package to read its flavors stays torch-free.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module has no attribute {name!r}")
        return _resolve(exports[name])

    return __getattr__


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer needs to build, shard and export one model family.

    The model class, its `parallelize` and its Hugging Face adapter are given by dotted path and
    imported on first use, so that reading a recipe (flavors, config validation: `wren hparams`,
    `wren memory`'s arithmetic) does not import torch.

    Attributes:
        name: registry key, used as `model.name` in recipes.
        config_cls: the family's config dataclass (for example `LlamaConfig`); torch-free.
        flavors: flavor name -> config instance. Their `vocab_size` is a placeholder that the
            trainer replaces with the tokenizer's.
        model_path: "module:Class" of the model, built as `model_cls(config)`.
        parallelize_path: "module:function" of `parallelize(model, mesh, *, activation_checkpointing,
            param_dtype, reduce_dtype) -> model`.
        hf_adapter_path: module with `to_hf_config`, `from_hf_config`, `to_hf_state_dict`,
            `from_hf_state_dict`, or None when the family has no Hugging Face equivalent.
    """

    name: str
    config_cls: type
    flavors: dict[str, Any]
    model_path: str
    parallelize_path: str
    hf_adapter_path: str | None = None

    @property
    def model_cls(self) -> type:
        """The model class (imported now)."""
        return _resolve(self.model_path)

    @property
    def parallelize(self) -> Callable[..., Any]:
        """The family's `parallelize` function (imported now)."""
        return _resolve(self.parallelize_path)

    @property
    def hf_adapter(self) -> Any:
        """The Hugging Face adapter module (imported now), or None."""
        return None if self.hf_adapter_path is None else _resolve(self.hf_adapter_path)


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
