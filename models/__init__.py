"""wren models: a registry of model families, each in its own folder.

Importing this package imports every model folder, which registers its `ModelSpec`.
"""

from models.registry import ModelSpec, get_model_spec, register_model, registered_models

import models.llama  # noqa: E402,F401  (registers "llama")
import models.based  # noqa: E402,F401  (registers "based")
import models.lizard  # noqa: E402,F401  (registers "lizard")

__all__ = ["ModelSpec", "get_model_spec", "register_model", "registered_models"]
