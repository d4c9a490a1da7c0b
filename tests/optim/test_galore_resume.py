"""GaLore / Fira / low-rank state in real checkpoints: exact resume, and resume on another world size."""

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job

METHODS = {
    # GaLore projection (refresh every 3 steps) with Fira's residual on a factorised model with
    # momentum reset and refactorization every 5 steps: the checkpoint at step 6 holds projectors
    # and moments mid-period, a Fira limiter state after a reset, and refactorized factors.
    "fira_lowrank": dict(
        optimizer__name="fira",
        optimizer__galore__rank=4,
        optimizer__galore__update_proj_gap_steps=3,
        optimizer__reset_every_steps=5,
        optimizer__reset_warmup_steps=2,
        optimizer__lowrank__rank=8,
        optimizer__lowrank__refactor_every_steps=5,
    ),
}



def run(corpus, cache, root, name, world, steps, method):
    common = dict(schedule__name="constant", checkpoint__every_steps=3, parallel__num_threads=1, **METHODS[method])
    overrides = tiny_overrides(corpus, cache, root, name, training__steps=steps, **common)
    return run_on_ranks(train_job, world, overrides)[0] if world > 1 else train_job(overrides)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_exact_and_survives_two_ranks_to_one(corpus, data_cache, tmp_path, method):
    torch.set_num_threads(1)
    run(corpus, data_cache, tmp_path, "single", 1, 12, method)
    run(corpus, data_cache, tmp_path, "single_resumed", 1, 6, method)
    run(corpus, data_cache, tmp_path, "single_resumed", 1, 12, method)
    want, got = losses(tmp_path / "single"), losses(tmp_path / "single_resumed")
    assert sorted(got) == list(range(1, 13))
    assert got == want  # same world size: bit for bit

    run(corpus, data_cache, tmp_path, "sharded", 2, 12, method)
    run(corpus, data_cache, tmp_path, "resized", 2, 6, method)
    run(corpus, data_cache, tmp_path, "resized", 1, 12, method)
    want, got = losses(tmp_path / "sharded"), losses(tmp_path / "resized")
    assert sorted(got) == list(range(1, 13))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])
