"""wren models: a registry of model families, each in its own folder.

Importing this package imports every model folder, which registers its `ModelSpec`.
"""

from models.registry import ModelSpec, get_model_spec, register_model, registered_models

import models.llama  # noqa: E402,F401  (registers "llama")

__all__ = ["ModelSpec", "get_model_spec", "register_model", "registered_models"]
