"""`wren linearize TEACHER OUT_DIR`: turn a trained softmax Llama into a Lizard model (a wren run directory).

TEACHER is a wren Llama run directory (config.toml + checkpoints/) or a Hugging Face Llama
directory (config.json + *.safetensors + a sentencepiece tokenizer.model). The student is a Lizard
model of the teacher's shape holding copies of all its weights; stage 1 (attention transfer) and
stage 2 (LoRA fine-tuning) of `models.lizard.transfer` train it, the adapters are merged, and
OUT_DIR is written as a wren run: config.toml (the teacher's recipe with `[model]` switched to
lizard, plus any `--section.key=value` overrides such as `--model.window_size=64`), the tokenizer,
and a DCP checkpoint at step 0 with the layout of `trainer.checkpoint` (model, fresh optimizer
state, loader cursor, RNG). `wren train OUT_DIR/config.toml` then fine-tunes it further (resuming
from that checkpoint) and `wren generate OUT_DIR` samples from it. OUT_DIR/linearize.json records
the eval losses of the teacher and of the student after each stage.

Linearization runs in one process (on CUDA when present, else CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import tomllib
import torch

from models.lizard import Lizard, LizardConfig
from models.lizard.transfer import (
    LIZARD_PARAMS,
    StageConfig,
    attention_transfer,
    eval_loss,
    finetune_lora,
)
from models.llama import Llama, LlamaConfig
from models.peft import LoraConfig, matches_any
from trainer.config import JobConfig
from trainer.config_loader import apply_overrides, build_dataclass
from trainer.errors import ConfigError, UserError

__all__ = ["LinearizeConfig", "add_arguments", "linearize", "run"]

RESULT_FILE = "linearize.json"
# Table 13 of the Lizard paper: 20M tokens per stage, peak lr 1e-3 (stage 1) and 5e-4 (stage 2),
# global batch 8; LoRA r = 8, alpha = 16, dropout 0 on W_q, W_k, W_v.
PAPER_STAGE_TOKENS = 20_000_000


@dataclass(kw_only=True)
class LinearizeConfig:
    """What `linearize` trains, beyond the recipe of the output run.

    Attributes:
        stage1_tokens: attention-transfer training tokens (0 skips stage 1: the paper's ablation).
        stage2_tokens: LoRA fine-tuning tokens (0 skips stage 2).
        stage1_lr: stage 1 peak learning rate.
        stage2_lr: stage 2 peak learning rate.
        batch_size: sequences per optimizer step in both stages.
        seq_len: tokens per sequence; 0 = the recipe's `training.seq_len`.
        lora: the stage 2 adapters.
        teacher_step: the teacher run's checkpoint step (None = latest).
    """

    stage1_tokens: int = PAPER_STAGE_TOKENS
    stage2_tokens: int = PAPER_STAGE_TOKENS
    stage1_lr: float = 1e-3
    stage2_lr: float = 5e-4
    batch_size: int = 8
    seq_len: int = 0
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=["wq", "wk", "wv"]))
    teacher_step: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the offending option."""
        for name in ("stage1_tokens", "stage2_tokens", "seq_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or positive, got {getattr(self, name)}")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        try:
            self.lora.validate()
        except ValueError as err:
            raise ValueError(f"lora_{err}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `wren linearize` arguments (unknown `--section.key=value` ones override the output recipe)."""
    defaults = LinearizeConfig()
    p.add_argument("teacher", help="a wren Llama run directory, or a Hugging Face Llama directory")
    p.add_argument("out_dir", help="the Lizard run directory to write")
    p.add_argument("--config", default=None, help="recipe for data/training settings (default: the teacher run's own; required for a Hugging Face teacher unless the defaults suit)")
    p.add_argument("--step", type=int, default=None, help="the teacher run's checkpoint step (default: latest)")
    p.add_argument("--stage1-tokens", type=int, default=defaults.stage1_tokens, help="attention-transfer tokens (0 = skip stage 1)")
    p.add_argument("--stage2-tokens", type=int, default=defaults.stage2_tokens, help="LoRA fine-tuning tokens (0 = skip stage 2)")
    p.add_argument("--stage1-lr", type=float, default=defaults.stage1_lr)
    p.add_argument("--stage2-lr", type=float, default=defaults.stage2_lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the recipe's training.seq_len)")
    p.add_argument("--lora-rank", type=int, default=defaults.lora.rank)
    p.add_argument("--lora-alpha", type=float, default=defaults.lora.alpha)
    p.add_argument("--lora-targets", default=",".join(defaults.lora.target_modules), help="comma-separated module names")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Entry point of `wren linearize`."""
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0, target_modules=[t for t in args.lora_targets.split(",") if t])
    cfg = LinearizeConfig(
        stage1_tokens=args.stage1_tokens, stage2_tokens=args.stage2_tokens, stage1_lr=args.stage1_lr,
        stage2_lr=args.stage2_lr, batch_size=args.batch_size, seq_len=args.seq_len, lora=lora, teacher_step=args.step,
    )
    bad = [a for a in extra if not a.startswith("--") or "=" not in a]
    if bad:
        raise UserError(f"linearize: unexpected arguments {' '.join(bad)} (overrides look like --section.key=value)")
    result = linearize(args.teacher, args.out_dir, cfg, config_path=args.config, overrides=extra)
    print(f"wren: linearized into {args.out_dir}: eval loss {result['eval_loss']:.4f} (teacher {result['teacher_eval_loss']:.4f})")
    return 0


def load_teacher(path: Path, step: int | None, config_path: str | None) -> tuple[Llama, JobConfig]:
    """The teacher model (on CPU) and the recipe the student run starts from."""
    if (path / "config.toml").is_file():
        from trainer.export_hf import load_model_from_run

        model, run_cfg, _ = load_model_from_run(path, step)
        if run_cfg.model.name != "llama":
            raise UserError(f"linearize: '{path}' is a {run_cfg.model.name} run; the teacher must be a llama")
        recipe = JobConfig.load(config_path) if config_path else run_cfg
        recipe.data.tokenizer_path = str(path / "tokenizer.model")  # the teacher's tokenizer, whatever the corpus
        return model, recipe
    if (path / "config.json").is_file():
        return _load_hf_teacher(path), _hf_recipe(path, config_path)
    raise UserError(f"linearize: '{path}' is neither a wren run (config.toml) nor a Hugging Face model (config.json)")


def _load_hf_teacher(path: Path) -> Llama:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from models.llama import hf_adapter

    try:
        llama_cfg = hf_adapter.from_hf_config(AutoConfig.from_pretrained(path))
    except ValueError as err:
        raise UserError(f"linearize: '{path}/config.json': {err}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"linearize: '{path}' has no *.safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    model = Llama(llama_cfg)
    model.load_state_dict(hf_adapter.from_hf_state_dict(state, llama_cfg))
    return model


def _hf_recipe(path: Path, config_path: str | None) -> JobConfig:
    tokenizer = path / "tokenizer.model"
    if not tokenizer.is_file():
        raise UserError(f"linearize: '{path}' has no sentencepiece tokenizer.model, which wren's data pipeline needs")
    recipe = JobConfig.load(config_path)
    recipe.data.tokenizer_path = str(tokenizer)
    return recipe


def student_job_config(recipe: JobConfig, teacher: LlamaConfig, out_dir: Path, overrides: list[str]) -> JobConfig:
    """The output run's config: `recipe` with `[model]` set to a Lizard of the teacher's shape, then `overrides`."""
    shared = {f.name for f in dataclasses.fields(LizardConfig)} & {f.name for f in dataclasses.fields(LlamaConfig)}
    for f in dataclasses.fields(LlamaConfig):
        if f.name not in shared and f.default is not dataclasses.MISSING and getattr(teacher, f.name) != f.default:
            raise UserError(f"linearize: the teacher sets model.{f.name} = {getattr(teacher, f.name)!r}, which Lizard does not support")
    table = tomllib.loads(recipe.to_toml())
    lizard_defaults = {f.name: f.default for f in dataclasses.fields(LizardConfig) if f.name not in shared}
    shape = {k: getattr(teacher, k) for k in sorted(shared - {"vocab_size"})}
    # Every field is written out, so the flavor named here contributes nothing: the paper's
    # defaults for the Lizard fields, the teacher's values for the rest.
    table["model"] = {"name": "lizard", "flavor": "tiny", **shape, **lizard_defaults}
    table["run"] = {**table["run"], "name": out_dir.name, "output_dir": str(out_dir.parent)}
    table["schedule"] = {**table["schedule"], "decay_from": ""}
    table["checkpoint"] = {**table["checkpoint"], "resume": True}
    cfg = build_dataclass(JobConfig, apply_overrides(table, overrides))
    cfg.validate()
    return cfg


def linearize(
    teacher_path: str | Path,
    out_dir: str | Path,
    cfg: LinearizeConfig,
    *,
    config_path: str | None = None,
    overrides: list[str] = (),
    log=print,
) -> dict:
    """Linearize the teacher into `out_dir` (a wren run); returns the record written to linearize.json."""
    from data import TokenLoader, TokenShard, eval_windows
    from trainer.distributed import DistEnv, world_size_from_env
    from trainer.train import Trainer, prepare_data_or_fail

    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(f"linearize: {err}") from None
    if world_size_from_env() > 1:
        raise UserError("linearize: runs in one process; start it without torchrun/srun")
    teacher_path, out_dir = Path(teacher_path), Path(out_dir)
    if (out_dir / "checkpoints" / "latest").exists():
        raise UserError(f"linearize: '{out_dir}' already holds a run with checkpoints; choose a new directory")
    teacher, recipe = load_teacher(teacher_path, cfg.teacher_step, config_path)
    job = student_job_config(recipe, teacher.config, out_dir, list(overrides))
    prepared = prepare_data_or_fail(job.data, log=log)
    if prepared.vocab_size != teacher.config.vocab_size:
        raise UserError(f"linearize: the tokenizer has {prepared.vocab_size} pieces, the teacher {teacher.config.vocab_size} embedding rows")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, job.training.dtype)
    autocast = nullcontext if dtype == torch.float32 else partial(torch.autocast, device.type, dtype=dtype)
    seq_len = cfg.seq_len or job.training.seq_len

    torch.manual_seed(job.run.seed)
    with torch.device(device):
        student = Lizard(job.model.build_model_config(prepared.vocab_size))
    teacher = teacher.to(device).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or not all(matches_any(k, LIZARD_PARAMS) for k in missing):
        raise UserError(f"linearize: teacher and Lizard weights do not line up: missing {missing[:4]}, unexpected {unexpected[:4]}")

    loader = TokenLoader(TokenShard(prepared.train_path), seq_len=seq_len, global_batch_size=cfg.batch_size, shuffle_seed=job.run.seed)
    next_batch = lambda: loader.next_batch().to(device)
    val_shard = TokenShard(prepared.val_path)

    def evaluate(model) -> float:
        batches = (b.to(device) for b in eval_windows(val_shard, seq_len=seq_len, batch_size=job.eval.batch_size, max_batches=job.eval.batches))
        return eval_loss(model, batches, autocast=autocast)

    tokens_per_step = cfg.batch_size * seq_len
    stage1 = StageConfig(steps=cfg.stage1_tokens // tokens_per_step, lr=cfg.stage1_lr)
    stage2 = StageConfig(steps=cfg.stage2_tokens // tokens_per_step, lr=cfg.stage2_lr)
    record = {"teacher_eval_loss": evaluate(teacher), "initial_eval_loss": evaluate(student)}
    log(f"wren: linearize: teacher eval loss {record['teacher_eval_loss']:.4f}; Lizard before training {record['initial_eval_loss']:.4f}")
    try:
        record["stage1_final_mse"] = attention_transfer(teacher, student, stage1, next_batch, autocast=autocast, log=log)
        record["stage1_eval_loss"] = evaluate(student)
        record["stage2_final_loss"] = finetune_lora(student, stage2, cfg.lora, next_batch, autocast=autocast, log=log)
    except FloatingPointError as err:
        raise UserError(f"linearize: {err}") from None
    record["eval_loss"] = evaluate(student)
    record.update(stage1_steps=stage1.steps, stage2_steps=stage2.steps, tokens_per_step=tokens_per_step)
    log(f"wren: linearize: after stage 1 eval loss {record['stage1_eval_loss']:.4f}; after stage 2 {record['eval_loss']:.4f}")

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, mesh=None)
    trainer = Trainer(job, env)  # writes config.toml and the tokenizer; builds the run's optimizer and loader
    trainer.model.load_state_dict(student.state_dict())
    record["checkpoint"] = str(trainer.save_checkpoint())
    (out_dir / RESULT_FILE).write_text(json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}, indent=2) + "\n")
    return record

