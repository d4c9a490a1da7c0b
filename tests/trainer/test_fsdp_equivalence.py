"""FSDP2 on 2 gloo ranks trains exactly like one process with the same global batch."""

import pytest

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job


@pytest.mark.parametrize("extra", [{}, {"training__micro_batch_size": 2, "training__activation_checkpointing": True}])
def test_two_ranks_match_one_process(corpus, data_cache, tmp_path, extra):
    single = train_job(tiny_overrides(corpus, data_cache, tmp_path, "single", **extra))
    sharded = run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "sharded", **extra))

    one, two = losses(tmp_path / "single"), losses(tmp_path / "sharded")
    assert sorted(one) == list(range(1, 11)) and sorted(two) == sorted(one)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
    assert one[10] < one[1], "the loss should fall over 10 steps"
    assert sharded[0]["final_eval_loss"] == pytest.approx(single["final_eval_loss"], rel=1e-5)

    # Each rank holds about half of the parameters.
    total = single["total_params"]
    assert single["local_params"] == total
    for rank in sharded:
        assert rank["total_params"] == total
        assert abs(rank["local_params"] - total / 2) <= 0.02 * total, rank
    assert sum(r["local_params"] for r in sharded) == total
