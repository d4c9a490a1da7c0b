"""Pretrained Llama weights into a (possibly FSDP2-sharded) wren model, one local shard at a time.

`load_hf_weights_` fills every base parameter of a wren Llama from a Hugging Face directory
(`*.safetensors`, with or without `model.safetensors.index.json`): the files are memory-mapped
and each rank reads, through `safe_open(...).get_slice`, only the rows of each tensor that its
FSDP2 shard owns, so no rank ever holds the full model. The same call fills an unsharded model
(every row is then local). Names are mapped by the model's `hf_adapter`.

`fill_parameter_` is the shared primitive: copy the rows of a full (global) tensor that this
rank owns into a plain or DTensor parameter. PEFT modules use it in `reset_peft_parameters()` so
that an init drawn whole from the (identically seeded) global RNG gives every rank its slice of
the same tensor as a single process would draw.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["base_parameter_names", "fill_parameter_", "hf_weight_files", "init_rope_", "load_hf_weights_", "local_slices"]

INDEX_FILE = "model.safetensors.index.json"


def local_slices(param: Tensor) -> tuple[slice, ...]:
    """The region of the global tensor that this rank holds: everything unless `param` is a DTensor."""
    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def _local(param: Tensor) -> Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


@torch.no_grad()
def fill_parameter_(param: Tensor, full: Tensor) -> None:
    """Copy this rank's region of `full` (the global tensor, same shape as `param`) into `param`."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"shape: expected {tuple(param.shape)}, got {tuple(full.shape)}")
    _local(param).copy_(full[local_slices(param)])


def base_parameter_names(model_config) -> list[str]:
    """Parameter names of a plain Llama of `model_config` (built on the meta device, no memory)."""
    from models.llama import Llama

    with torch.device("meta"):
        return [name for name, _ in Llama(model_config).named_parameters()]


def hf_weight_files(directory: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file holding it (index json, or every file's keys)."""
    from safetensors import safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


@torch.no_grad()
def load_hf_weights_(model: nn.Module, directory: str | Path, model_config, names: list[str]) -> None:
    """Fill parameters `names` of `model` (wren names) from the Hugging Face checkpoint in `directory`.

    Each rank reads only its own rows of each tensor (memory-mapped slices), converting to the
    parameter's dtype. ValueError names the missing tensor or the mismatched shape.
    """
    from safetensors import safe_open

    from models.llama.hf_adapter import to_hf_state_dict

    directory = Path(directory)
    hf_of = {wren: hf for hf, wren in to_hf_state_dict({n: n for n in names}, model_config).items()}
    files = hf_weight_files(directory)
    with ExitStack() as stack:
        handles = {}
        for name in names:
            hf_name = hf_of[name]
            if hf_name not in files:
                raise ValueError(f"init_from: {directory} has no tensor {hf_name!r} (for wren's {name})")
            path = files[hf_name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            tensor_slice = handles[path].get_slice(hf_name)
            param = model.get_parameter(name)
            if tuple(tensor_slice.get_shape()) != tuple(param.shape):
                raise ValueError(
                    f"init_from: {hf_name} in {path.name} has shape {tuple(tensor_slice.get_shape())}, "
                    f"wren's {name} needs {tuple(param.shape)}"
                )
            local = _local(param)
            local.copy_(tensor_slice[local_slices(param)].to(local.dtype))


@torch.no_grad()
def init_rope_(model: nn.Module) -> None:
    """Recompute a Llama's RoPE tables (buffers hold garbage after `to_empty`)."""
    from models.llama.rope import rope_cos_sin, rope_inv_freq

    cfg = model.config
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device=model.rope_cos.device)
    cos, sin = rope_cos_sin(inv_freq, cfg.max_seq_len)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
