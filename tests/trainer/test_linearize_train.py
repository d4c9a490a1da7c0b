"""Lizard as a `wren train` model: the recipe loads, training on 2 gloo ranks equals 1 rank, and a run
checkpointed on one world size resumes on the other with the same losses as an uninterrupted run."""

from __future__ import annotations

import models.lizard  # noqa: F401  (registers "lizard")
from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job
from trainer.config import JobConfig

LIZARD = {"model__name": "lizard", "model__window_size": 8, "model__feature_dim": 8, "model__chunk_size": 16, "model__n_meta_tokens": 2}


def test_recipe_builds_a_lizard():
    cfg = JobConfig.load("configs/lizard_tiny.toml")
    model_cfg = cfg.model.build_model_config(vocab_size=cfg.data.vocab_size)
    assert cfg.model.name == "lizard" and model_cfg.window_size < cfg.training.seq_len


def test_lizard_trains_checkpoints_and_resumes_across_world_sizes(corpus, data_cache, tmp_path):
    # The reference runs in this process; the resized run starts on 2 ranks (one spawn of ranks
    # instead of two) and resumes in this process.
    first_world, second_world = 2, 1
    # One intra-op thread per rank: two on this shared 2-core box made each step far slower.
    common = dict(schedule__name="constant", checkpoint__every_steps=3, parallel__num_threads=1, **LIZARD)

    def run(world, name, steps):
        overrides = tiny_overrides(corpus, data_cache, tmp_path, name, training__steps=steps, **common)
        return run_on_ranks(train_job, world, overrides)[0] if world > 1 else train_job(overrides)

    reference = run(second_world, "reference", 6)
    run(first_world, "resized", 3)
    resumed = run(second_world, "resized", 6)
    want, got = losses(tmp_path / "reference"), losses(tmp_path / "resized")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:  # steps 1-3 ran on the other world size, 4-6 after resuming
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])
    assert want[6] < want[1]
    assert abs(resumed["final_eval_loss"] - reference["final_eval_loss"]) <= 1e-5 * reference["final_eval_loss"]
