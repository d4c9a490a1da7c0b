"""Build a fine-tuning run's model: pretrained architecture, method, FSDP2, then weights shard by shard.

Order (method with `needs_pretrained_weights = False`, the usual case):

1. the architecture from `init_from` (Hugging Face config.json, or the wren run's `[model]` and
   tokenizer), built on the META device: no memory;
2. the pretraining model transforms (no-ops: the config refuses low-rank and muP with fine-tuning),
   then the method's `apply` (structure only);
3. activation checkpointing and FSDP2 (`parallelize`) on the meta model, then `to_empty` on the
   device: each rank allocates only its shards;
4. the pretrained weights into each rank's shards (Hugging Face: memory-mapped row slices of the
   safetensors; wren: its DCP checkpoint, which loads into sharded state dicts natively);
5. `reset_peft_parameters()` on every module that has it, under the run's seed.

A method with `needs_pretrained_weights = True` (LoRAM) gets the materialised, loaded model on
every rank at step 2 instead, and the model is sharded after it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from trainer.config import JobConfig, ModelConfig
from trainer.config_loader import build_dataclass, load_toml
from trainer.errors import ConfigError, UserError
from trainer.extensions import BuildContext, apply_model_transforms
from trainer.finetune import PretrainedSource, resolve_init_from

__all__ = ["apply_full", "build_finetune_model", "pretrained_model_config", "pretrained_source", "trainable_summary"]


def apply_full(model: nn.Module, ctx: BuildContext) -> nn.Module:
    """Fine-tuning method "full": every parameter trains (the model is returned unchanged)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def pretrained_source(cfg: JobConfig) -> PretrainedSource:
    """`finetune.init_from` classified, as a user error when it is unusable."""
    try:
        return resolve_init_from(cfg.finetune.init_from)
    except ValueError as err:
        raise ConfigError(f"finetune.{err}") from None


def pretrained_model_config(source: PretrainedSource):
    """The `LlamaConfig` of the pretrained model (architecture and vocabulary from the checkpoint)."""
    from models.llama.hf_adapter import from_hf_config

    if source.kind == "hf":
        import transformers

        try:
            return from_hf_config(transformers.LlamaConfig.from_pretrained(source.path))
        except ValueError as err:
            raise UserError(f"finetune.init_from: {source.path}/config.json: {err}") from None
    from data.tokenizer import Tokenizer

    table = load_toml(source.run_dir / "config.toml")
    model_cfg = build_dataclass(ModelConfig, table.get("model", {}), "model")
    if model_cfg.name != "llama" or table.get("mup", {}).get("enabled", False):
        raise UserError(f"finetune.init_from: run {source.run_dir} is not a plain (non-muP) Llama run")
    if table.get("optimizer", {}).get("lowrank", {}).get("rank", 0):
        raise UserError(f"finetune.init_from: run {source.run_dir} trained factorised (low-rank) weights")
    vocab_size = Tokenizer.load(source.run_dir / "tokenizer.model").vocab_size
    return model_cfg.build_model_config(vocab_size)


def _load_weights(model: nn.Module, source: PretrainedSource, model_config, names: list[str], log) -> None:
    """Fill parameters `names` of `model` (sharded or not) from the pretrained checkpoint."""
    if source.kind == "hf":
        from models.peft.pretrained import load_hf_weights_

        try:
            load_hf_weights_(model, source.path, model_config, names)
        except ValueError as err:
            raise UserError(str(err)) from None
    else:
        from trainer.checkpoint import Checkpointer

        state = {"model_optim": {"model": {name: model.get_parameter(name) for name in names}}}
        with torch.no_grad():
            Checkpointer.load_into(source.path, state)
    log(f"wren: loaded {len(names)} pretrained tensors from {source.path} ({source.kind})")


def build_finetune_model(cfg: JobConfig, env, ctx: BuildContext, spec, source: PretrainedSource, model_config) -> nn.Module:
    """The sharded model of a fine-tuning run, pretrained weights loaded and the method applied."""
    from models.peft.pretrained import base_parameter_names, init_rope_

    method = cfg.finetune.spec
    names = base_parameter_names(model_config)
    parallelize = functools.partial(spec.parallelize, mesh=env.mesh, activation_checkpointing=cfg.training.activation_checkpointing)
    with torch.device("meta"):
        model = spec.model_cls(model_config)
    model = apply_model_transforms(model, ctx)
    apply = method.load_apply()
    if not method.needs_pretrained_weights:
        model = parallelize(_applied(apply, model, ctx))
        model.to_empty(device=env.device)
        init_rope_(model)
        _load_weights(model, source, model_config, names, ctx.log)
    else:
        model.to_empty(device=env.device)
        init_rope_(model)
        _load_weights(model, source, model_config, names, ctx.log)
        model = parallelize(_applied(apply, model, ctx))
    torch.manual_seed(cfg.run.seed)
    for module in model.modules():
        if hasattr(module, "reset_peft_parameters"):
            module.reset_peft_parameters()
    return model


def _applied(apply, model: nn.Module, ctx: BuildContext) -> nn.Module:
    """`apply(model, ctx)`, its ValueErrors (bad method settings) as config errors."""
    try:
        return apply(model, ctx)
    except ConfigError:
        raise
    except ValueError as err:
        message = str(err)
        raise ConfigError(message if message.startswith("finetune.") else f"finetune.{ctx.cfg.finetune.method}.{message}") from None


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the global model (DTensors count their global size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def tokenizer_for(cfg: JobConfig, source: PretrainedSource) -> Path | None:
    """The sentencepiece model the data must be tokenised with: `data.tokenizer_path`, else the checkpoint's."""
    if cfg.data.tokenizer_path:
        return Path(cfg.data.tokenizer_path)
    return source.tokenizer_model
