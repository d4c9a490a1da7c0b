"""Adapter-only exports of a fine-tuned wren Llama.

`save_peft_lora` writes LoRA adapters the way Hugging Face `peft` saves them, so that
`peft.PeftModel.from_pretrained(base, out_dir)` loads them onto the Hugging Face base model:

    adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight (r x d_in) and
                                .lora_B.weight (d_out x r), e.g. model.layers.0.self_attn.q_proj
    adapter_config.json         peft_type LORA, r, lora_alpha (peft scales by lora_alpha / r, as
                                wren does), lora_dropout, target_modules (the full HF module names)

`save_trainable` writes every state tensor a method added (parameters and persistent buffers,
such as sparse indices, whose names are not in the base model), under wren names, for methods
without a `peft` equivalent.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["hf_module_names", "save_peft_lora", "save_trainable"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def hf_module_names(model_config) -> dict[str, str]:
    """wren linear name -> Hugging Face module name ("layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj")."""
    from models.llama.hf_adapter import to_hf_state_dict
    from models.peft.pretrained import base_parameter_names

    names = base_parameter_names(model_config)
    renamed = to_hf_state_dict({n: n for n in names}, model_config)
    return {wren.removesuffix(".weight"): hf.removesuffix(".weight") for hf, wren in renamed.items()}


def save_peft_lora(model: nn.Module, lora_cfg, out_dir: Path, base_model: str) -> int:
    """Write the LoRA adapters of `model` (unsharded, unmerged) in peft's format; returns the adapted layer count."""
    from safetensors.torch import save_file

    from models.peft.lora import lora_modules

    names = hf_module_names(model.config)
    tensors, targets = {}, []
    for name, module in lora_modules(model):
        if module.merged:
            raise ValueError(f"{name}: the adapter is merged into the weight; unmerge it before saving the adapter")
        hf = names[name]
        targets.append(hf)
        tensors[f"base_model.model.{hf}.lora_A.weight"] = module.lora_A.detach().contiguous()
        tensors[f"base_model.model.{hf}.lora_B.weight"] = module.lora_B.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return len(targets)


def save_trainable(model: nn.Module, out_dir: Path) -> int:
    """Write the state tensors `model` has beyond a plain Llama (wren names) to adapter_model.safetensors."""
    from safetensors.torch import save_file

    from models.peft.pretrained import base_parameter_names

    base = set(base_parameter_names(model.config))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in base}
    if not tensors:
        raise ValueError("the run's method added no parameters; export the merged weights instead")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / ADAPTER_WEIGHTS)
    return len(tensors)
