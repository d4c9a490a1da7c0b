"""Export a wren checkpoint as a Hugging Face model directory that `transformers` loads.

The weights are read from the DCP checkpoint into a single-process model (DCP reshards them from
any world size), renamed by the model's `hf_adapter`, and written by `transformers` itself
(`save_pretrained`: config.json + model.safetensors), with the sentencepiece tokenizer beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

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
    vocab_size = Tokenizer.load(run_dir / "tokenizer.model").vocab_size
    model = get_model_spec(cfg.model.name).model_cls(cfg.model.build_model_config(vocab_size))
    state = {"model_optim": {"model": model.state_dict()}}
    checkpointer.load(path, state)
    model.load_state_dict(state["model_optim"]["model"])
    return model, cfg, path


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    """Write `out_dir` with config.json, model.safetensors and tokenizer files; returns `out_dir`."""
    from models import get_model_spec

    model, cfg, _ = load_model_from_run(run_dir, step)
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
    _save_tokenizer(Path(run_dir) / "tokenizer.model", out_dir)
    return out_dir


def _save_tokenizer(sentencepiece_model: Path, out_dir: Path) -> None:
    """Write the sentencepiece model and its Hugging Face fast-tokenizer files."""
    from data.hf_tokenizer import save_hf_tokenizer

    shutil.copyfile(sentencepiece_model, out_dir / "tokenizer.model")
    save_hf_tokenizer(out_dir / "tokenizer.model", out_dir)
