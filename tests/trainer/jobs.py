"""Small training jobs shared by the trainer tests: a real corpus, a tiny model, quick steps."""

from __future__ import annotations

from pathlib import Path

from data.samples import copy_stdlib_sample
from trainer.config_loader import override_args


def make_corpus(directory: Path) -> Path:
    """A handful of standard-library packages copied into `directory` as a text corpus."""
    return copy_stdlib_sample(directory)


def tiny_overrides(corpus: Path, cache: Path, run_root: Path, name: str, **extra: object) -> list[str]:
    """Overrides for a few-second job: a 2-layer Llama on 32-token windows of `corpus`."""
    values: dict[str, object] = {
        "run.name": name,
        "run.output_dir": str(run_root),
        "data.source": "text",
        "data.paths": [str(corpus)],
        "data.vocab_size": 512,
        "data.cache_dir": str(cache),
        "model.dim": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.ffn_hidden_dim": 128,
        "training.steps": 10,
        "training.seq_len": 32,
        "training.global_batch_size": 8,
        "schedule.warmup_steps": 2,
        "eval.every_steps": 0,
        "eval.batches": 2,
        "eval.batch_size": 4,
        "checkpoint.every_steps": 0,
        "metrics.log_every_steps": 5,
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops_per_s": 1e11,
        # One intra-op thread: at this size threads cost more than they give, and 1-rank and
        # 2-rank runs of a comparison then use the same thread count.
        "parallel.num_threads": 1,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return override_args(values)


def train_job(overrides: list[str]) -> dict:
    """Run one training job in this process (a rank, under the harness), under the configured
    `parallel.engine` as `wren train` picks it; report what it held."""
    import importlib

    from trainer.config import ENGINES, JobConfig
    from trainer.distributed import init_distributed, world_size_from_env

    cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
    env = init_distributed(cfg.parallel)
    module_name, class_name = ENGINES[cfg.parallel.engine].split(":")
    trainer = getattr(importlib.import_module(module_name), class_name)(cfg, env)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.model.parameters())
    result = trainer.fit()
    return {
        "local_params": local,
        "total_params": trainer.num_params,
        "final_eval_loss": result.final_eval_loss,
        "tokens_consumed": trainer.loader.tokens_consumed,
        "run_dir": str(result.run_dir),
    }


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> train loss from a run's metrics.jsonl."""
    from trainer.metrics import read_metrics

    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
