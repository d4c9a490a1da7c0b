"""Fine-tuning: the `[finetune]` config section and the registry of methods (torch-free).

A fine-tuning run starts from pretrained weights (`init_from`: a local Hugging Face Llama
directory, a wren run directory, or one of its checkpoint directories) and adapts them with a
`method`. Each method is a `FinetuneMethod` in `FINETUNE_METHODS`; the trainer calls its `apply`
after the pretraining model transforms (`trainer.extensions.MODEL_TRANSFORMS`) and before
activation checkpointing and FSDP2. The contract (docs/finetuning.md, "Adding a method"):

- `apply(model, ctx) -> model`, `ctx` the trainer's `BuildContext`; it reads its own table
  `ctx.cfg.finetune.<method>` and may fill `ctx.lr_scales`, `ctx.step_hooks` and
  `ctx.checkpoint_state`; `ctx.optimizer` and `ctx.model` are set later by the trainer (the
  optimizer right after it is built, the final sharded model right after FSDP2).
- `needs_pretrained_weights = False`: `apply` runs on a META-device model before the weights are
  loaded and may only change structure. Parameters it adds are initialised after the model is
  sharded, materialised and loaded, by `reset_peft_parameters()` on every module that has it,
  under the run's seed (identical on every rank).
- `needs_pretrained_weights = True`: `apply` gets the unsharded model with the pretrained weights
  loaded on every rank (the full model is materialised per rank for such a method).
- `export` (optional, "module:function"): `export(run_dir, out_dir, *, merged, log)` replaces the
  default export of `wren export-hf` (merged weights through each module's `unload_peft()`, or the
  adapter tensors alone).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.chat import ChatDataConfig
from models.peft.lora_config import LoraConfig
from models.peft.loram_config import LoramConfig
from models.peft.sparse_config import LtSftConfig, SpielConfig

__all__ = ["FINETUNE_METHODS", "FinetuneConfig", "FinetuneMethod", "PretrainedSource", "resolve_init_from"]


@dataclass(frozen=True)
class FinetuneMethod:
    """How the trainer applies (and `wren export-hf` exports) one fine-tuning method.

    Attributes:
        apply: "module:function" of `apply(model, ctx) -> model`, imported when a run starts.
        needs_pretrained_weights: whether `apply` reads weight values (then it runs on the loaded,
            unsharded model; otherwise on the meta-device model, before loading).
        export: optional "module:function" of `export(run_dir, out_dir, *, merged, log)`.
    """

    apply: str
    needs_pretrained_weights: bool = False
    export: str | None = None

    def load_apply(self) -> Callable[..., Any]:
        """The `apply` function, imported now."""
        return _import(self.apply)

    def load_export(self) -> Callable[..., Any] | None:
        """The `export` function, imported now, or None for the default export."""
        return _import(self.export) if self.export else None


def _import(path: str) -> Callable[..., Any]:
    module_name, fn_name = path.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


# "none" is pretraining (no entry): the model is built from the seeded init as always.
FINETUNE_METHODS: dict[str, FinetuneMethod] = {
    "full": FinetuneMethod(apply="trainer.finetune_build:apply_full"),
    "lora": FinetuneMethod(apply="models.peft.lora:apply_lora_method"),
    "spiel": FinetuneMethod(apply="models.peft.sparse_delta:apply_spiel"),
    "lt_sft": FinetuneMethod(apply="models.peft.lt_sft:apply_lt_sft"),
    "loram": FinetuneMethod(
        apply="models.peft.loram:apply_loram", needs_pretrained_weights=True, export="models.peft.loram:export_loram"
    ),
}


@dataclass(frozen=True)
class PretrainedSource:
    """Where `init_from` points: a Hugging Face Llama directory or a wren checkpoint.

    Attributes:
        kind: "hf" or "wren".
        path: the Hugging Face directory, or the wren checkpoint directory (`step_N/`).
        run_dir: the wren run directory (None for "hf").
    """

    kind: str
    path: Path
    run_dir: Path | None = None

    @property
    def tokenizer_model(self) -> Path | None:
        """The sentencepiece model beside the weights, if there is one."""
        path = (self.run_dir if self.kind == "wren" else self.path) / "tokenizer.model"
        return path if path.is_file() else None


def resolve_init_from(init_from: str) -> PretrainedSource:
    """Classify `init_from`; ValueError("init_from: ...") when it is neither kind.

    A Hugging Face directory holds config.json of a Llama model and *.safetensors; a wren run
    directory holds config.toml and checkpoints/latest (its latest checkpoint is used); a wren
    checkpoint directory is `<run>/checkpoints/step_N/` with DCP's `.metadata`.
    """
    path = Path(init_from)
    if not path.is_dir():
        raise ValueError(f"init_from: {init_from!r} is not a directory")
    if (path / "config.json").is_file():
        try:
            hf = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"init_from: {path / 'config.json'} is unreadable: {err}") from None
        if hf.get("model_type") != "llama":
            raise ValueError(f"init_from: {path} holds a {hf.get('model_type')!r} model; wren loads Llama (model_type 'llama')")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"init_from: {path} has no *.safetensors weights")
        return PretrainedSource(kind="hf", path=path)
    if (path / ".metadata").is_file() and (path.parent.parent / "config.toml").is_file():
        return PretrainedSource(kind="wren", path=path, run_dir=path.parent.parent)
    if (path / "config.toml").is_file():
        marker = path / "checkpoints" / "latest"
        if not marker.is_file():
            raise ValueError(f"init_from: wren run {path} has no checkpoint yet (no checkpoints/latest)")
        checkpoint = path / "checkpoints" / marker.read_text().strip()
        if not (checkpoint / ".metadata").is_file():
            raise ValueError(f"init_from: {marker} names {checkpoint}, which is not a complete checkpoint")
        return PretrainedSource(kind="wren", path=checkpoint, run_dir=path)
    raise ValueError(
        f"init_from: {path} is neither a Hugging Face Llama directory (config.json + *.safetensors) "
        f"nor a wren run (config.toml + checkpoints/)"
    )


@dataclass(kw_only=True)
class FinetuneConfig:
    """The `[finetune]` section: start from pretrained weights and adapt them with a method.

    Attributes:
        method: "none" (pretraining from the seeded init, the default), or a key of
            `FINETUNE_METHODS`: "full", "lora", "spiel", "lt_sft", "loram".
        init_from: a local Hugging Face Llama directory, a wren run directory (its latest
            checkpoint) or a wren checkpoint directory; required by every method. The model's
            architecture and vocabulary come from it, not from `[model]`.
        chat: instruction / chat data (JSONL) with the loss on responses only; with no paths the
            run trains on `[data]` as plain language modelling.
        lora: LoRA's adapters ("lora", and the adapters LoRAM trains).
        spiel: SpIEL's sparse deltas.
        lt_sft: LT-SFT's lottery-ticket deltas.
        loram: LoRAM's pruning and quantization of the frozen model.
    """

    method: str = "none"
    init_from: str = ""
    chat: ChatDataConfig = field(default_factory=ChatDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    spiel: SpielConfig = field(default_factory=SpielConfig)
    lt_sft: LtSftConfig = field(default_factory=LtSftConfig)
    loram: LoramConfig = field(default_factory=LoramConfig)

    @property
    def enabled(self) -> bool:
        """Whether the run fine-tunes (starts from `init_from`) rather than pretrains."""
        return self.method != "none"

    @property
    def spec(self) -> FinetuneMethod:
        """The registered method (only when `enabled`)."""
        return FINETUNE_METHODS[self.method]

    def validate(self) -> None:
        """Raise ValueError("key: what is wrong, got X"); nested keys are dotted (`lora.rank: ...`)."""
        if self.method != "none" and self.method not in FINETUNE_METHODS:
            known = ", ".join(["none", *FINETUNE_METHODS])
            raise ValueError(f"method: must be one of {known}, got {self.method!r}")
        for name in ("chat", "lora", "spiel", "lt_sft", "loram"):
            try:
                getattr(self, name).validate()
            except ValueError as err:
                raise ValueError(f"{name}.{err}") from None
        if not self.enabled:
            if self.init_from:
                raise ValueError(f'init_from: set, but method is "none"; choose a method (e.g. "full"), got {self.init_from!r}')
            if self.chat.paths:
                raise ValueError('chat.paths: chat data needs a fine-tuning method, but method is "none"')
            return
        if not self.init_from:
            raise ValueError(f"init_from: method {self.method!r} needs pretrained weights; name a Hugging Face or wren run directory")
        resolve_init_from(self.init_from)
