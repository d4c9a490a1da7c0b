"""Parameter-efficient fine-tuning: adapters and deltas applied to a model before sharding.

`lora` holds LoRA (low-rank adapters, merge/unmerge, adapter-only state dicts); sparse deltas
(SpIEL, LT-SFT) and structured pruning with LoRA recovery (LoRAM) build on its name matching
(`matches_any`, `target_linears`) and freezing (`freeze_except`). `pretrained` loads Hugging Face
weights shard by shard; `adapter_io` writes adapter-only exports.

The names below are imported on first use (PEP 562), so that the torch-free config modules
(`lora_config`, `sparse_config`, `loram_config`) import without torch.
"""

import importlib

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "apply_lora",
    "freeze_except",
    "lora_modules",
    "lora_state_dict",
    "matches_any",
    "merge_and_unload",
    "merge_lora",
    "target_linears",
    "unmerge_lora",
]
_EXPORTS = dict.fromkeys(__all__, "models.peft.lora")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models.peft' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
