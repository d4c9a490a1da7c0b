"""The DeepSpeed ZeRO engine on 2 gloo ranks trains like FSDP2 and resumes exactly."""

import pytest

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job

pytest.importorskip("deepspeed", reason="deepspeed is not installed")


def assert_close_losses(want: dict[int, float], got: dict[int, float], steps: int) -> None:
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra",
    [(1, {}), (2, {"training__micro_batch_size": 2}), (2, {"parallel__offload_optimizer": True})],
)
def test_zero_matches_fsdp2_over_ten_steps(corpus, data_cache, tmp_path, stage, extra):
    run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "fsdp2", **extra))
    zero = dict(parallel__engine="deepspeed", parallel__zero_stage=stage, **extra)
    run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "deepspeed", **zero))
    fsdp2, deepspeed = losses(tmp_path / "fsdp2"), losses(tmp_path / "deepspeed")
    assert_close_losses(fsdp2, deepspeed, 10)
    assert fsdp2[10] < fsdp2[1]


@pytest.mark.slow
def test_zero_resume_continues_exactly(corpus, data_cache, tmp_path, capfd):
    # A constant schedule makes 6 steps, then 4 more after a resume, the same computation as 10 steps.
    common = dict(parallel__engine="deepspeed", parallel__zero_stage=2, schedule__name="constant", checkpoint__every_steps=3)
    run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "reference", training__steps=10, **common))
    run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "resumed", training__steps=6, **common))
    capfd.readouterr()
    resumed = run_on_ranks(train_job, 2, tiny_overrides(corpus, data_cache, tmp_path, "resumed", training__steps=10, **common))
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / 'step_00000006'} at step 6" in capfd.readouterr().out
    assert resumed[0]["tokens_consumed"] == 10 * 8 * 32
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert losses(tmp_path / "resumed") == losses(tmp_path / "reference")
