"""BASED trains through the real trainer from configs/based_tiny.toml: 2 gloo ranks equal one
process, and a checkpointed run resumed on another world size continues the same computation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses
from trainer.config_loader import override_args

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "based_tiny.toml"



def _overrides(corpus: Path, cache: Path, root: Path, name: str, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "run.name": name,
        "run.output_dir": str(root),
        "data.source": "text",
        "data.paths": [str(corpus)],
        "data.vocab_size": 512,
        "data.cache_dir": str(cache),
        "model.dim": 64,
        "model.n_heads": 4,
        "model.ffn_hidden_dim": 128,
        "model.feature_dim": 8,
        "model.window_tokens": 8,
        "model.chunk_size_tokens": 16,
        "training.seq_len": 32,
        "training.steps": 10,
        "schedule.name": "constant",
        "schedule.warmup_steps": 2,
        "eval.every_steps": 0,
        "eval.batches": 2,
        "eval.batch_size": 4,
        "checkpoint.every_steps": 0,
        "metrics.log_every_steps": 5,
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops_per_s": 1e11,
        "parallel.num_threads": 1,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return override_args(values)


def based_job(overrides: list[str]) -> dict:
    """One training run of the BASED recipe in this process (a rank, under the harness)."""
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, world_size_from_env
    from trainer.train import Trainer

    cfg = JobConfig.load(RECIPE, overrides, world_size=world_size_from_env())
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    result = trainer.fit()
    return {"final_eval_loss": result.final_eval_loss, "tokens_consumed": trainer.loader.tokens_consumed}


@pytest.mark.slow
def test_two_ranks_match_one_process_and_resume_across_world_sizes(corpus, data_cache, tmp_path):
    single = based_job(_overrides(corpus, data_cache, tmp_path, "single", training__steps=12))
    one = losses(tmp_path / "single")
    assert sorted(one) == list(range(1, 13)) and one[12] < one[1] - 0.5, one

    # 6 steps on 2 ranks with checkpoints, then resumed on 1 rank up to step 12.
    first = run_on_ranks(based_job, 2, _overrides(corpus, data_cache, tmp_path, "resumed", training__steps=6, checkpoint__every_steps=3))
    assert first[0]["tokens_consumed"] == 6 * 8 * 32
    assert (tmp_path / "resumed" / "checkpoints").is_dir()
    second = based_job(_overrides(corpus, data_cache, tmp_path, "resumed", training__steps=12, checkpoint__every_steps=3))
    assert second["tokens_consumed"] == single["tokens_consumed"] == 12 * 8 * 32

    got = losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 13))
    for step in one:  # steps 1-6 on 2 ranks, 7-12 on 1 rank after the resume
        assert abs(got[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], got[step])
    assert second["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_wren_train_runs_the_recipe_then_wren_generate_samples(corpus, data_cache, tmp_path):
    cli = [sys.executable, "-m", "trainer.cli"]
    train = subprocess.run(
        [*cli, "train", str(RECIPE), *_overrides(corpus, data_cache, tmp_path, "cli", training__steps=4)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert train.returncode == 0, train.stderr
    assert "model based/tiny" in train.stdout
    generate = subprocess.run(
        [*cli, "generate", str(tmp_path / "cli"), "--prompt", "def ", "--max-new-tokens", "8", "--seed", "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("def ")
