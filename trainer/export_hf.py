"""Export a wren checkpoint as a Hugging Face model directory that `transformers` loads.

The weights are read from the DCP checkpoint into a single-process model (DCP reshards them from
any world size), a low-rank run's factors merged into dense weights W = s B A (+ S)
(`optim.lowrank.merge_low_rank`), renamed by the model's `hf_adapter`, and written by `transformers`
itself (`save_pretrained`: config.json + model.safetensors), with the sentencepiece tokenizer beside them.

A fine-tuned run (`[finetune]`) is rebuilt as it trained (the architecture from `init_from`, the
method's structure) and exported either merged (every module with `unload_peft()` replaced by the
plain layer it folds into, then as above) or, with `adapter=True`, as the adapter alone (LoRA:
`peft`'s format, see `models.peft.adapter_io`). A method with its own `export` in
`trainer.finetune.FINETUNE_METHODS` (LoRAM) exports itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from optim.lowrank import factorise, merge_low_rank
from trainer.checkpoint import STEP_PREFIX, Checkpointer, CheckpointError
from trainer.config import JobConfig
from trainer.distributed import DistEnv
from trainer.errors import UserError


def load_model_from_run(run_dir: str | Path, step: int | None = None) -> tuple[torch.nn.Module, JobConfig, Path]:
    """Rebuild a run's model on CPU and load a checkpoint's weights (the latest by default)."""
    from data import Tokenizer
    from models import get_model_spec

    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise UserError(f"'{run_dir}' is not a wren run directory (no config.toml)")
    cfg = JobConfig.load(config_path)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last, env=env)
    path = checkpointer.latest() if step is None else run_dir / "checkpoints" / f"{STEP_PREFIX}{step:08d}"
    if path is None:
        raise CheckpointError(f"'{run_dir}' has no checkpoint yet")
    spec = get_model_spec(cfg.model.name)
    if cfg.finetune.enabled:
        model = _finetuned_model(cfg, env, spec)
    else:
        vocab_size = Tokenizer.load(run_dir / "tokenizer.model").vocab_size
        model = spec.model_cls(cfg.model.build_model_config(vocab_size))
        if cfg.optimizer.lowrank.rank:  # a low-rank run saved factors (and SLTrain's support): load those
            factorise(model, cfg.optimizer.lowrank)
    state = {"model_optim": {"model": model.state_dict()}}
    checkpointer.load(path, state)
    model.load_state_dict(state["model_optim"]["model"])
    merge_low_rank(model)  # W = s B A (+ S) as plain linears; a no-op without factorised layers
    return model, cfg, path


def _finetuned_model(cfg: JobConfig, env: DistEnv, spec) -> torch.nn.Module:
    """A fine-tuning run's model, unsharded on CPU, as its trainer built it (before its checkpoint is loaded)."""
    from trainer.extensions import BuildContext
    from trainer.finetune_build import (
        build_finetune_model,
        pretrained_model_config,
        pretrained_source,
    )

    source = pretrained_source(cfg)
    ctx = BuildContext(cfg=cfg, env=env, log=lambda *args, **kwargs: None)
    model = build_finetune_model(cfg, env, ctx, spec, source, pretrained_model_config(source))
    return model


def merge_peft_(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every module that has `unload_peft()` by the plain module it returns (adaptation folded in)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "unload_peft"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.unload_peft())
    return model


def export_hf(
    run_dir: str | Path, out_dir: str | Path, step: int | None = None, *, adapter: bool = False, log=print
) -> Path:
    """Write `out_dir` with config.json, model.safetensors and tokenizer files (or the adapter alone); returns `out_dir`."""
    from models import get_model_spec

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = JobConfig.load(run_dir / "config.toml") if (run_dir / "config.toml").is_file() else None
    if cfg is not None and cfg.finetune.enabled:
        custom = cfg.finetune.spec.load_export()
        if custom is not None:
            if step is not None:
                raise UserError(f"export-hf: method {cfg.finetune.method!r} exports its latest checkpoint only (no --step)")
            custom(run_dir, out_dir, merged=not adapter, log=log)
            return out_dir
    elif adapter:
        raise UserError(f"export-hf: --adapter needs a fine-tuned run; '{run_dir}' has no [finetune] method")
    model, cfg, _ = load_model_from_run(run_dir, step)
    if adapter:
        return _export_adapter(model, cfg, out_dir)
    if cfg.finetune.enabled:
        merge_peft_(model)
    adapter = get_model_spec(cfg.model.name).hf_adapter
    if adapter is None:
        raise UserError(f"export-hf: model {cfg.model.name!r} has no Hugging Face equivalent; its weights stay in {run_dir}/checkpoints")
    if cfg.mup.enabled:
        raise UserError("export-hf: the run trained under muP, whose multipliers have no Hugging Face Llama equivalent")
    try:
        hf_config = adapter.to_hf_config(model.config)
    except ValueError as err:
        raise UserError(f"export-hf: model.{err}") from None
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf_model.load_state_dict(adapter.to_hf_state_dict(model.state_dict(), model.config), strict=False)
    tied = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"hf_adapter mapping is incomplete: missing {missing}, unexpected {unexpected}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(run_dir, cfg, out_dir)
    return out_dir


def _export_adapter(model: torch.nn.Module, cfg: JobConfig, out_dir: Path) -> Path:
    """The adapter alone: LoRA in `peft`'s format, other methods' added tensors under wren names."""
    from models.peft.adapter_io import save_peft_lora, save_trainable

    try:
        if cfg.finetune.method == "lora":
            save_peft_lora(model, cfg.finetune.lora, out_dir, base_model=cfg.finetune.init_from)
        else:
            save_trainable(model, out_dir)
    except ValueError as err:
        raise UserError(f"export-hf --adapter: {err}") from None
    return out_dir


def copy_tokenizer(run_dir: Path, cfg: JobConfig, out_dir: Path) -> None:
    """The run's sentencepiece tokenizer in both formats, or a Hugging Face source's own tokenizer files."""
    if cfg.finetune.enabled:
        from trainer.finetune_build import pretrained_source

        source = pretrained_source(cfg)
        if source.kind == "hf":
            for path in source.path.iterdir():
                if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens")) or path.suffix == ".jinja"):
                    shutil.copyfile(path, out_dir / path.name)
            return
    _save_tokenizer(run_dir / "tokenizer.model", out_dir)


def _save_tokenizer(sentencepiece_model: Path, out_dir: Path) -> None:
    """Write the sentencepiece model and its Hugging Face fast-tokenizer files."""
    from data.hf_tokenizer import save_hf_tokenizer

    shutil.copyfile(sentencepiece_model, out_dir / "tokenizer.model")
    save_hf_tokenizer(out_dir / "tokenizer.model", out_dir)


def add_arguments(parser) -> None:
    """`wren export-hf RUN OUT [--step N] [--adapter]`."""
    parser.add_argument("run_dir", help="a run directory (holds config.toml and checkpoints/)")
    parser.add_argument("out_dir", help="where to write config.json, model.safetensors and the tokenizer")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--adapter", action="store_true",
        help="fine-tuned runs: write only the adapter (LoRA: peft's adapter_model.safetensors + adapter_config.json)",
    )


def run(args, extra: list[str]) -> int:
    """The `export-hf` command."""
    if extra:
        raise UserError(f"export-hf: unexpected arguments {' '.join(extra)}")
    print(f"wren: exported to {export_hf(args.run_dir, args.out_dir, step=args.step, adapter=args.adapter)}")
    return 0
