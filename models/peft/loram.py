"""LoRAM and QLoRAM: train LoRA on a pruned (optionally NF4) model, merge it into the full one.

Zhang et al., "Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language
Models", ICLR 2025, arXiv:2502.13533 (the pipeline as its reference code
`junzhang-zj/LoRAM/loram/` runs it):

1. prune the pretrained model W0 (`models.peft.prune`: structured / random / semi-structured /
   unstructured), giving W0*, and optionally align it (a few steps of full-parameter training of
   W0* on plain text, `1_pruned_full_rank_weight_alignment.py`; `align_pruned_`);
2. train LoRA (B*, A*) on W0*, whose frozen linears are stored in NF4 for QLoRAM
   (`models.peft.nf4`);
3. recover (B, A) = R(B*, A*) to the original shapes, zero-filled at pruned positions
   (`3_recovered_low_rank_matrix_generation.py`, its default "zeroA"): for a linear
   pruned on its outputs (wq, wk, wv, w1, w3) the rows of B at pruned outputs are zero; for one
   pruned on its inputs (wo, w2) the columns of A at pruned inputs are zero. Shape-keeping
   variants need no recovery;
4. merge W = W0 + (alpha / r) B A into the ORIGINAL, unpruned model.

`apply_loram` is the trainer's fine-tuning method (steps 1-2, on the loaded, unsharded model);
the kept-index map goes into the checkpoint (`ctx.checkpoint_state["loram"]`, tensors only) so that
`export_loram` needs only the run directory (steps 3-4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.stateful import Stateful

from models.peft.lora import LoRALinear, apply_lora
from models.peft.loram_config import LoramConfig
from models.peft.nf4 import NF4Linear, NF4LoRALinear
from models.peft.prune import kept_indices, prune_model, pruned_layers

__all__ = [
    "LoramState",
    "align_pruned_",
    "apply_loram",
    "export_loram",
    "frozen_weight_bytes",
    "load_full_model",
    "quantize_frozen_",
    "recover_lora",
    "recover_lora_state",
]

STATE_KEY = "loram"
PRUNED_LAYERS_KEY = "pruned_layers"


class LoramState(Stateful):
    """The kept-index map of a LoRAM run, checkpointed so that export needs only the run directory.

    On resume the run prunes the pretrained weights again (deterministically); loading checks
    that the checkpoint was pruned the same way.
    """

    def __init__(self, kept: dict[str, Tensor], pruned_layer_ids: range) -> None:
        self.kept = {k: v.cpu() for k, v in kept.items()}
        self.kept[PRUNED_LAYERS_KEY] = torch.tensor(list(pruned_layer_ids), dtype=torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.kept.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, value in self.kept.items():
            if key not in state or not torch.equal(state[key].cpu(), value):
                raise ValueError(f"finetune.loram: the checkpoint's pruning differs from this run's at {key!r}")


def quantize_frozen_(model: nn.Module, cfg: LoramConfig) -> None:
    """Store every linear of the transformer blocks in NF4 (QLoRAM); LoRA layers keep their adapters.

    The embedding, the final norm and the output layer stay in full precision, as
    bitsandbytes' 4-bit loading keeps lm_head (QLoRA's setup).
    """
    for layer in model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, LoRALinear):
                new = NF4LoRALinear(module, block_size=cfg.nf4_block_size, double_quant=cfg.double_quant)
            elif type(module) is nn.Linear:
                new = NF4Linear.from_linear(module, block_size=cfg.nf4_block_size, double_quant=cfg.double_quant)
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, new)


def frozen_weight_bytes(model: nn.Module) -> tuple[int, int, int]:
    """(bytes of the NF4-stored weights, bytes of the same weights in bf16, bytes of every other frozen tensor).

    NF4 layers count their codes and constants; the other frozen parameters (the embedding,
    norms, unquantized linears) count their own storage.
    """
    nf4_bytes = nf4_as_bf16 = 0
    nf4_params = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            nf4_bytes += module.storage_bytes()
            nf4_as_bf16 += 2 * module.in_features * module.out_features
            nf4_params.update(id(p) for p in module.parameters())
    other = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and id(p) not in nf4_params
    )
    return nf4_bytes, nf4_as_bf16, other


def align_pruned_(model: nn.Module, ctx: Any) -> tuple[float, float]:
    """LoRAM's alignment: train every weight of the pruned model but the embedding and output layer.

    `finetune.loram.alignment_steps` AdamW steps (constant `alignment_lr`, no weight decay) of
    next-token loss on `[data]`'s training split (plain text, tokenised with the pretrained
    model's tokenizer), in `training.dtype` autocast. Every rank trains the same unsharded model
    on the same global batches, so all ranks end with the same weights. Returns the first and
    last step's loss.
    """
    import dataclasses

    import torch.nn.functional as F

    from data import TokenLoader, TokenShard, prepare_data
    from trainer.finetune_build import pretrained_source, tokenizer_for

    cfg = ctx.cfg
    tokenizer = tokenizer_for(cfg, pretrained_source(cfg))
    data_cfg = dataclasses.replace(cfg.data, tokenizer_path=str(tokenizer)) if tokenizer else cfg.data
    prepared = prepare_data(data_cfg, log=lambda *_: None)
    loader = TokenLoader(
        TokenShard(prepared.train_path), seq_len=cfg.training.seq_len,
        global_batch_size=cfg.training.global_batch_size, rank=0, world_size=1, shuffle_seed=cfg.run.seed + 1,
    )
    model.tok_embeddings.weight.requires_grad_(False)  # frozen, as the reference script freezes lm_head
    if model.output is not None:
        model.output.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.finetune.loram.alignment_lr, weight_decay=0.0)
    device = params[0].device
    dtype = getattr(torch, cfg.training.dtype)
    losses = []
    model.train()
    for _ in range(cfg.finetune.loram.alignment_steps):
        batch = loader.next_batch().to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses[0], losses[-1]  # apply_lora then freezes every base weight


def apply_loram(model: nn.Module, ctx: Any) -> nn.Module:
    """Fine-tuning method "loram": prune the loaded model, add `finetune.lora`'s adapters, maybe NF4.

    Runs on the unsharded model with the pretrained weights (identical on every rank, so every
    rank prunes identically); the trainer shards the result with FSDP2.
    """
    cfg: LoramConfig = ctx.cfg.finetune.loram
    before = sum(p.numel() for p in model.parameters())
    layer_ids = pruned_layers(len(model.layers), cfg)
    kept = prune_model(model, cfg)
    after = sum(p.numel() for p in model.parameters())
    if cfg.alignment_steps:
        first, last = align_pruned_(model, ctx)
        ctx.log(f"wren: LoRAM alignment: {cfg.alignment_steps} steps of the pruned model at lr {cfg.alignment_lr:g}: "
                f"loss {first:.4f} -> {last:.4f}")
    try:
        names = apply_lora(model, ctx.cfg.finetune.lora)
    except ValueError as err:
        raise ValueError(f"finetune.lora.{err}") from None
    if cfg.quantize == "nf4":
        quantize_frozen_(model, cfg)
    ctx.checkpoint_state[STATE_KEY] = LoramState(kept, layer_ids)
    ctx.log(
        f"wren: LoRAM {cfg.pruning} pruning (ratio {cfg.effective_ratio:g}) of layers "
        f"{layer_ids.start}..{layer_ids.stop - 1}: {before:,} -> {after:,} parameters "
        f"({before / after:.2f}x smaller); LoRA rank {ctx.cfg.finetune.lora.rank} on {len(names)} linear layers"
    )
    nf4_bytes, nf4_as_bf16, other = frozen_weight_bytes(model)
    if nf4_bytes:
        ctx.log(
            f"wren: QLoRAM: the blocks' frozen linears in NF4 take {nf4_bytes / 2**20:.2f} MiB, "
            f"{nf4_bytes / nf4_as_bf16:.3f}x of bf16; other frozen tensors {other / 2**20:.2f} MiB"
        )
    else:
        ctx.log(f"wren: LoRAM frozen tensors: {other / 2**20:.2f} MiB")
    return model


def recover_lora(
    lora_a: Tensor, lora_b: Tensor, rows: Tensor | None, cols: Tensor | None, full_shape: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """(A, B) of the full linear (d_out, d_in) = `full_shape`: B* at kept rows, A* at kept columns, zeros elsewhere."""
    d_out, d_in = full_shape
    a, b = lora_a, lora_b
    if cols is not None:
        a = lora_a.new_zeros(lora_a.shape[0], d_in)
        a[:, cols] = lora_a
    if rows is not None:
        b = lora_b.new_zeros(d_out, lora_b.shape[1])
        b[rows] = lora_b
    if a.shape[1] != d_in or b.shape[0] != d_out:
        raise ValueError(f"recovery: adapter shapes {tuple(lora_b.shape)} x {tuple(lora_a.shape)} do not fit {full_shape}")
    return a, b


def recover_lora_state(
    adapters: dict[str, Tensor], kept: dict[str, Tensor], full_model: nn.Module
) -> dict[str, Tensor]:
    """Every `<linear>.lora_A` / `.lora_B` of the pruned model recovered to `full_model`'s shapes."""
    cfg = full_model.config
    n_rep, head_dim = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    out: dict[str, Tensor] = {}
    for key in sorted(k for k in adapters if k.endswith(".lora_A")):
        linear = key[: -len(".lora_A")]
        rows, cols = kept_indices(kept, linear, n_rep=n_rep, head_dim=head_dim)
        weight = full_model.get_submodule(linear).weight
        a, b = recover_lora(adapters[key], adapters[f"{linear}.lora_B"], rows, cols, tuple(weight.shape))
        out[f"{linear}.lora_A"], out[f"{linear}.lora_B"] = a, b
    return out


def _checkpoint_tensors(checkpoint: Path, wanted: Callable[[str], bool]) -> dict[str, Tensor]:
    """The tensors of a DCP checkpoint whose flat key ("model_optim.model.<name>") is `wanted`."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from trainer.checkpoint import Checkpointer, SafeFileSystemReader

    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    flat = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and wanted(key)
    }
    Checkpointer.load_into(checkpoint, flat)
    return flat


def _read_run(run_dir: Path) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
    """(the run's JobConfig, adapters by module-relative name, kept-index map) from its latest checkpoint."""
    from trainer.checkpoint import Checkpointer, CheckpointError
    from trainer.config import JobConfig
    from trainer.errors import UserError

    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"'{run_dir}' is not a wren run directory (no config.toml)")
    cfg = JobConfig.load(config_path)
    if cfg.finetune.method != "loram":
        raise UserError(f"export: run {run_dir} fine-tuned with {cfg.finetune.method!r}, not loram")
    checkpoint = Checkpointer(run_dir / "checkpoints", keep_last=1, env=None).latest()
    if checkpoint is None:
        raise CheckpointError(f"'{run_dir}' has no checkpoint yet")
    model_prefix = "model_optim.model."
    state_prefix = f"{STATE_KEY}."
    flat = _checkpoint_tensors(
        checkpoint,
        lambda key: key.startswith(state_prefix) or (key.startswith(model_prefix) and key.endswith((".lora_A", ".lora_B"))),
    )
    adapters = {k.removeprefix(model_prefix): v for k, v in flat.items() if k.startswith(model_prefix)}
    kept = {k.removeprefix(state_prefix): v for k, v in flat.items() if k.startswith(state_prefix)}
    if not adapters:
        raise CheckpointError(f"checkpoint {checkpoint} holds no LoRA adapters")
    return cfg, adapters, kept


def load_full_model(cfg: Any) -> nn.Module:
    """The original, unpruned pretrained model of a run's `finetune.init_from`, on CPU in fp32."""
    from models.llama import Llama
    from models.peft.pretrained import (
        base_parameter_names,
        init_rope_,
        load_hf_weights_,
    )
    from trainer.checkpoint import Checkpointer
    from trainer.finetune_build import pretrained_model_config, pretrained_source

    source = pretrained_source(cfg)
    model_config = pretrained_model_config(source)
    with torch.device("meta"):
        model = Llama(model_config)
    model.to_empty(device="cpu")
    init_rope_(model)
    names = base_parameter_names(model_config)
    with torch.no_grad():
        if source.kind == "hf":
            load_hf_weights_(model, source.path, model_config, names)
        else:
            Checkpointer.load_into(source.path, {"model_optim": {"model": {n: model.get_parameter(n) for n in names}}})
    return model


def _write_hf_model(model: nn.Module, cfg: Any, run_dir: Path, out_dir: Path) -> None:
    """config.json + model.safetensors (transformers' `save_pretrained`) and the tokenizer, as `wren export-hf` writes them."""
    from transformers import AutoModelForCausalLM

    from models.llama.hf_adapter import to_hf_config, to_hf_state_dict
    from trainer.export_hf import copy_tokenizer

    hf_model = AutoModelForCausalLM.from_config(to_hf_config(model.config))
    hf_model.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=not model.config.tie_embeddings)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(run_dir, cfg, out_dir)


def _write_adapter(recovered: dict[str, Tensor], full_model: nn.Module, cfg: Any, out_dir: Path) -> None:
    """The recovered adapter as `peft` saves one: adapter_model.safetensors + adapter_config.json."""
    from safetensors.torch import save_file

    from models.peft.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, hf_module_names

    hf_names = hf_module_names(full_model.config)
    tensors = {}
    for key, value in recovered.items():
        linear, _, part = key.rpartition(".")
        tensors[f"base_model.model.{hf_names[linear]}.{part}.weight"] = value.contiguous()
    save_file(tensors, out_dir / ADAPTER_WEIGHTS)
    lora = cfg.finetune.lora
    targets = sorted({hf_names[k.rpartition(".")[0]] for k in recovered})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "inference_mode": True, "base_model_name_or_path": str(cfg.finetune.init_from),
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def export_loram(run_dir: str | Path, out_dir: str | Path, *, merged: bool, log: Callable[..., None]) -> None:
    """Recover a LoRAM run's adapters to the full model and write it (merged) or them (adapter).

    merged: the original model from `finetune.init_from` plus (alpha / r) B A of every recovered
    adapter, as a Hugging Face directory. Otherwise the recovered adapter in `peft`'s format,
    to load onto that original model.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg, adapters, kept = _read_run(run_dir)
    full = load_full_model(cfg)
    recovered = recover_lora_state(adapters, kept, full)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not merged:
        _write_adapter(recovered, full, cfg, out_dir)
        log(f"wren: LoRAM adapter recovered to the full model's shapes ({len(recovered) // 2} layers) in {out_dir}")
        return
    scaling = cfg.finetune.lora.scaling
    with torch.no_grad():
        for key in (k for k in recovered if k.endswith(".lora_A")):
            linear = key[: -len(".lora_A")]
            weight = full.get_submodule(linear).weight
            delta = (recovered[f"{linear}.lora_B"].float() @ recovered[key].float()) * scaling
            weight.add_(delta.to(weight.dtype))
    _write_hf_model(full, cfg, run_dir, out_dir)
    log(f"wren: LoRAM adapters recovered and merged into the full model ({len(recovered) // 2} layers): {out_dir}")
