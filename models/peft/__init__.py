"""Parameter-efficient fine-tuning: adapters and deltas applied to a model before sharding.

`lora` holds LoRA (low-rank adapters, merge/unmerge, adapter-only state dicts); sparse deltas
(SpIEL, LT-SFT) and structured pruning with LoRA recovery (LoRAM) build on its name matching
(`matches_any`, `target_linears`) and freezing (`freeze_except`).
"""

from models.peft.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    freeze_except,
    lora_modules,
    lora_state_dict,
    matches_any,
    merge_and_unload,
    merge_lora,
    target_linears,
    unmerge_lora,
)

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
