"""The trainer's config tree: one typed section per component, read from TOML.

`JobConfig.load(path, overrides)` reads a recipe, applies `--section.key=value` overrides and
validates every section before any work starts; errors name the dotted key and exit with code 2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.config import DataConfig
from optim.config import OptimizerConfig
from optim.mup_config import MupConfig
from optim.schedules import ScheduleConfig
from trainer.config_loader import apply_overrides, build_dataclass, load_toml, to_toml
from trainer.errors import ConfigError
from trainer.finetune import FinetuneConfig

DTYPES = ("float32", "bfloat16")
# Training engines by name: the class (imported when a run starts) that trains a JobConfig.
ENGINES = {"fsdp2": "trainer.train:Trainer", "deepspeed": "trainer.deepspeed_engine:DeepSpeedTrainer"}


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "tiny"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty name without '/', got {self.name!r}")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to build: a registry name, a flavor (size) and per-field overrides."""

    name: str = "llama"
    flavor: str = "tiny"
    extra: dict[str, Any] = field(default_factory=dict)  # any field of the model's own config

    def build_model_config(self, vocab_size: int) -> Any:
        """The model's own config: the flavor, then overrides, then the tokenizer's vocab size."""
        from models import get_model_spec

        try:
            spec = get_model_spec(self.name)
        except ValueError as err:
            raise ValueError(f"name: {err}") from None
        if self.flavor not in spec.flavors:
            known = ", ".join(spec.flavors)
            raise ValueError(f"flavor: unknown flavor {self.flavor!r} of {self.name}; known: {known}")
        known_fields = {f.name for f in dataclasses.fields(spec.config_cls)}
        for key in self.extra:
            if key not in known_fields or key == "vocab_size":
                allowed = ", ".join(sorted(known_fields - {"vocab_size"}))
                raise ValueError(f"{key}: unknown key for model {self.name} (known keys: name, flavor, {allowed})")
        base = dataclasses.asdict(spec.flavors[self.flavor])
        table = {**base, **self.extra, "vocab_size": vocab_size}
        return build_dataclass(spec.config_cls, table, "model")

    def validate(self) -> None:
        self.build_model_config(vocab_size=256).validate()


@dataclass(kw_only=True)
class TrainingConfig:
    """The loop: how many steps, on what batches, in which precision."""

    steps: int = 120
    seq_len: int = 256
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 0  # sequences per forward pass on one rank; 0 = the whole local batch
    grad_clip_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 autocast
    activation_checkpointing: bool = False
    max_consecutive_nonfinite: int = 5  # halt after this many skipped steps in a row

    def validate(self) -> None:
        for key in ("steps", "seq_len", "global_batch_size", "max_consecutive_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size: must be 0 or positive, got {self.micro_batch_size}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm: must be 0 or positive, got {self.grad_clip_norm}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def local_batch_size(self, world_size: int) -> int:
        """Sequences per rank per step, checking that the global batch divides evenly."""
        if self.global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} is not divisible by the world size {world_size}"
            )
        local = self.global_batch_size // world_size
        if self.micro_batch_size and local % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size: {self.micro_batch_size} does not divide the per-rank batch {local} "
                f"(global_batch_size {self.global_batch_size} / world size {world_size})"
            )
        return local


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation on the held-out split."""

    every_steps: int = 40  # 0 = only at the end
    batches: int = 4
    batch_size: int = 16  # sequences per eval batch, over all ranks

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: must be 0 or positive, got {self.every_steps}")
        for key in ("batches", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to write checkpoints, how many to keep, and whether to resume."""

    every_steps: int = 60  # 0 = only at the end
    keep_last: int = 2
    resume: bool = True  # continue from <run_dir>/checkpoints/latest when it exists
    export_hf: bool = False  # also write Hugging Face safetensors at the end

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: must be 0 or positive, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be at least 1, got {self.keep_last}")


@dataclass(kw_only=True)
class MetricsConfig:
    """Where metrics go and how MFU is computed."""

    log_every_steps: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    plot: bool = True  # write <run_dir>/loss.png at the end
    peak_flops_per_s: float = 0.0  # per rank; 0 = measure once per machine and cache

    def validate(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps: must be at least 1, got {self.log_every_steps}")
        if self.peak_flops_per_s < 0:
            raise ValueError(f"peak_flops_per_s: must be 0 or positive, got {self.peak_flops_per_s}")


@dataclass(kw_only=True)
class ParallelConfig:
    """How processes talk: the collective backend; FSDP2 shards over all ranks."""

    engine: str = "fsdp2"  # fsdp2 | deepspeed (ZeRO)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3 (engine = "deepspeed")
    offload_optimizer: bool = False  # DeepSpeed: keep optimizer states in CPU memory
    offload_params: bool = False  # DeepSpeed ZeRO-3: keep the parameter partitions in CPU memory
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    num_threads: int = 0  # intra-op CPU threads per rank; 0 = cores / local ranks

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine: must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage: must be 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and (self.engine != "deepspeed" or self.zero_stage != 3):
            raise ValueError(
                f'offload_params: needs engine = "deepspeed" and zero_stage = 3, '
                f"got engine {self.engine!r}, zero_stage {self.zero_stage}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend: must be auto, gloo or nccl, got {self.backend!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads: must be 0 or positive, got {self.num_threads}")


@dataclass(kw_only=True)
class JobConfig:
    """Everything one training run needs; each section builds its own component."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = (), world_size: int = 1) -> "JobConfig":
        """Read a recipe (or the defaults when `path` is None), apply overrides and validate."""
        table = load_toml(path) if path is not None else {}
        cfg = build_dataclass(cls, apply_overrides(table, list(overrides)))
        cfg.validate(world_size)
        return cfg

    def validate(self, world_size: int = 1) -> None:
        """Check every section, then the cross-section constraints, naming the dotted key."""
        for section in dataclasses.fields(self):
            part = getattr(self, section.name)
            _checked(section.name, part.validate)
        _checked("training", lambda: self.training.local_batch_size(world_size))
        if self.eval.batch_size % world_size:
            raise ConfigError(f"eval.batch_size: {self.eval.batch_size} is not divisible by the world size {world_size}")
        model_cfg = _checked("model", lambda: self.model.build_model_config(self.data.vocab_size))
        if self.finetune.enabled:  # the architecture comes from finetune.init_from; the trainer checks seq_len
            _checked("finetune", self._check_finetune)
        elif self.checkpoint.export_hf:
            _checked("checkpoint", lambda: self._check_exportable(model_cfg))
        if not self.finetune.enabled and self.training.seq_len > model_cfg.max_seq_len:
            raise ConfigError(
                f"training.seq_len: {self.training.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}"
            )
        if self.schedule.warmup_steps > self.training.steps:
            raise ConfigError(
                f"schedule.warmup_steps: {self.schedule.warmup_steps} exceeds training.steps {self.training.steps}"
            )

    def _check_finetune(self) -> None:
        """Fine-tuning starts from a pretrained Llama and trains it with FSDP2, without pretraining transforms."""
        method = self.finetune.method
        if self.model.name != "llama":
            raise ValueError(f"method: fine-tuning loads Llama weights; model.name must be \"llama\", got {self.model.name!r}")
        if self.optimizer.lowrank.rank:
            raise ValueError(f"method: {method!r} cannot be combined with optimizer.lowrank (it refactorises the pretrained weights)")
        if self.mup.enabled:
            raise ValueError(f"method: {method!r} cannot be combined with mup.enabled (pretrained weights have no muP multipliers)")
        if self.parallel.engine != "fsdp2":
            raise ValueError(f"method: fine-tuning runs on the fsdp2 engine, got parallel.engine = {self.parallel.engine!r}")
        if self.schedule.decay_from:
            raise ValueError("method: schedule.decay_from branches a pretraining run; a fine-tuning run starts from init_from")

    def _check_exportable(self, model_cfg: Any) -> None:
        """`checkpoint.export_hf` needs a Hugging Face equivalent of the model as configured."""
        from models import get_model_spec

        adapter = get_model_spec(self.model.name).hf_adapter
        if adapter is None:
            raise ValueError(f"export_hf: model {self.model.name!r} has no Hugging Face equivalent")
        if self.mup.enabled:
            raise ValueError("export_hf: muP's multipliers have no Hugging Face Llama equivalent (mup.enabled = true)")
        try:
            adapter.to_hf_config(model_cfg)
        except ValueError as err:
            raise ValueError(f"export_hf: not exportable: model.{err}") from None

    def to_toml(self) -> str:
        """The resolved config as TOML (loadable again with `JobConfig.load`)."""
        return to_toml(self)


def _checked(section: str, check):
    """Run a section's check, re-raising its `ValueError` as a `ConfigError` with the section prefix."""
    try:
        return check()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{section}.{err}") from None
