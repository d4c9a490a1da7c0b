"""The DeepSpeed ZeRO engine (stages 1-3, optimizer offload) on 2 gloo ranks trains like FSDP2, and
its by-name checkpoints resume exactly, at another world size, under another stage and under FSDP2.

Every training run of this module happens in three launches (one per world size and phase) shared
by the tests through a module fixture: starting processes and importing DeepSpeed dominates.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides

pytest.importorskip("deepspeed", reason="deepspeed is not installed")

STEPS = 10
RESUME_STEP = 6
# A constant lr makes the first 6 steps of a 10-step run the same computation as a 6-step run,
# so the step-6 checkpoint of a 10-step run is the checkpoint a 6-step run would leave.
COMMON = dict(schedule__name="constant", checkpoint__every_steps=3, checkpoint__keep_last=4)
ZERO_RUNS = {
    "zero1": dict(parallel__zero_stage=1),
    "zero2": dict(parallel__zero_stage=2, training__micro_batch_size=2, parallel__offload_optimizer=True),
    "zero3": dict(parallel__zero_stage=3),
    "zero3_offload": dict(
        parallel__zero_stage=3, training__micro_batch_size=2, parallel__offload_optimizer=True, parallel__offload_params=True
    ),
}


def engine_jobs(jobs: list[list[str]]) -> list[dict]:
    """Run several training jobs one after another on this rank, each under its configured engine."""
    import importlib

    from trainer.config import ENGINES, JobConfig
    from trainer.distributed import init_distributed, world_size_from_env

    results = []
    for overrides in jobs:
        cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
        module_name, class_name = ENGINES[cfg.parallel.engine].split(":")
        trainer = getattr(importlib.import_module(module_name), class_name)(cfg, init_distributed(cfg.parallel))
        trainer.fit()
        results.append({"engine": type(trainer).__name__, "tokens_consumed": trainer.loader.tokens_consumed})
    return results


def branch(source: Path, target: Path) -> None:
    """Start run `target` from `source`'s step-6 checkpoint, as if `target` had trained 6 steps and stopped."""
    name = f"step_{RESUME_STEP:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / "latest").write_text(name + "\n")


def assert_close_losses(want: dict[int, float], got: dict[int, float], steps: range, rel: float) -> None:
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, want[step], got[step])


@pytest.fixture(scope="module")
def runs(corpus, data_cache, tmp_path_factory) -> Path:
    """FSDP2 and every ZeRO variant for 10 steps, then resumes from their step-6 checkpoints."""
    root = tmp_path_factory.mktemp("deepspeed")

    def job(name: str, **extra: object) -> list[str]:
        return tiny_overrides(corpus, data_cache, root, name, **COMMON, **extra)

    deepspeed = dict(parallel__engine="deepspeed")
    first = [job("fsdp2")] + [job(name, **deepspeed, **extra) for name, extra in ZERO_RUNS.items()]
    engines = [r["engine"] for r in run_on_ranks(engine_jobs, 2, first)[0]]
    assert engines == ["Trainer"] + ["DeepSpeedTrainer"] * len(ZERO_RUNS)

    # 2 ranks: stage 3 from its own checkpoint, stage 3 from FSDP2's and FSDP2 from stage 3's.
    resumes = {"zero3_resumed": "zero3", "zero3_from_fsdp2": "fsdp2", "fsdp2_from_zero3": "zero3"}
    for target, source in resumes.items():
        branch(root / source, root / target)
    run_on_ranks(
        engine_jobs,
        2,
        [
            job("zero3_resumed", **deepspeed, parallel__zero_stage=3),
            job("zero3_from_fsdp2", **deepspeed, parallel__zero_stage=3),
            job("fsdp2_from_zero3"),
        ],
    )
    # 1 rank, stage 3, from the 2-rank stage-2 (offloaded, accumulating) checkpoint.
    branch(root / "zero2", root / "zero3_one_rank_from_zero2")
    (result,) = run_on_ranks(
        engine_jobs, 1, [job("zero3_one_rank_from_zero2", **deepspeed, parallel__zero_stage=3)]
    )
    assert result[0]["tokens_consumed"] == STEPS * 8 * 32
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZERO_RUNS))
def test_zero_matches_fsdp2_over_ten_steps(runs, name):
    fsdp2 = losses(runs / "fsdp2")
    assert_close_losses(fsdp2, losses(runs / name), range(1, STEPS + 1), rel=1e-5)
    assert fsdp2[STEPS] < fsdp2[1]


@pytest.mark.slow
def test_zero3_resume_is_exact(runs):
    resumed = runs / "zero3_resumed"
    assert losses(resumed) == {s: v for s, v in losses(runs / "zero3").items() if s > RESUME_STEP}
    assert (resumed / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "resumed, reference",
    [("zero3_one_rank_from_zero2", "zero2"), ("zero3_from_fsdp2", "fsdp2"), ("fsdp2_from_zero3", "zero3")],
)
def test_checkpoint_resumes_at_another_world_size_stage_or_engine(runs, resumed, reference):
    assert_close_losses(losses(runs / reference), losses(runs / resumed), range(RESUME_STEP + 1, STEPS + 1), rel=1e-5)


@pytest.mark.slow
def test_saved_weights_are_the_trained_fp32_weights(runs):
    import torch

    from trainer.export_hf import load_model_from_run

    zero3, _, _ = load_model_from_run(runs / "zero3")
    resumed, _, _ = load_model_from_run(runs / "zero3_resumed")
    fsdp2, _, _ = load_model_from_run(runs / "fsdp2")
    at_step3 = load_model_from_run(runs / "zero3", step=3)[0].state_dict()
    for name, weight in zero3.state_dict().items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, resumed.state_dict()[name]), name
        # Not bitwise: Adam amplifies the engines' different fp32 rounding (2.5e-6 measured here).
        torch.testing.assert_close(weight, fsdp2.state_dict()[name], rtol=0, atol=1e-4)
        assert not torch.equal(weight, at_step3[name]), f"{name} did not change between steps 3 and 10"


def test_optimizer_without_flat_state_is_refused_before_anything_is_built(tmp_path):
    import torch

    from trainer.config import JobConfig
    from trainer.deepspeed_engine import DeepSpeedTrainer
    from trainer.distributed import DistEnv
    from trainer.errors import ConfigError

    overrides = tiny_overrides(tmp_path, tmp_path, tmp_path, "sgd", parallel__engine="deepspeed", optimizer__name="sgd")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    with pytest.raises(ConfigError, match=r"^optimizer\.name: the deepspeed engine supports adamw, got 'sgd'$"):
        DeepSpeedTrainer(JobConfig.load(None, overrides), env)
    assert not (tmp_path / "sgd").exists()
