"""A non-finite loss or gradient skips that step's update, halts after a run of them, and is never saved."""

import math

import pytest
import torch

from tests.trainer.jobs import tiny_overrides
from trainer.config import JobConfig
from trainer.distributed import init_distributed
from trainer.errors import NonFiniteError
from trainer.train import Trainer


@pytest.fixture
def trainer(corpus, data_cache, tmp_path):
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "nan", training__max_consecutive_nonfinite=3)
    cfg = JobConfig.load(None, overrides)
    return Trainer(cfg, init_distributed(cfg.parallel))


def _snapshot(trainer):
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    return params, moments


def test_nonfinite_step_is_skipped_and_a_run_of_them_halts(trainer):
    assert not trainer.train_step(trainer.loader.next_batch()).skipped
    good = trainer.model.norm.weight.detach().clone()
    params, moments = _snapshot(trainer)

    with torch.no_grad():
        trainer.model.norm.weight.fill_(math.nan)
    result = trainer.train_step(trainer.loader.next_batch())
    assert result.skipped and math.isnan(result.loss)
    assert trainer.progress.skipped_steps == 1 and trainer.progress.step == 2
    after, after_moments = _snapshot(trainer)
    for name, value in params.items():
        if name != "norm.weight":
            assert torch.equal(after[name], value), f"{name} changed in a skipped step"
    assert after_moments.keys() == moments.keys()
    for key in moments:
        for k in moments[key]:
            assert torch.equal(after_moments[key][k], moments[key][k]), "optimizer state changed in a skipped step"

    with pytest.raises(NonFiniteError, match="weights are non-finite"):
        trainer.save_checkpoint()
    assert trainer.checkpointer.latest() is None

    with torch.no_grad():
        trainer.model.norm.weight.copy_(good)
    assert not trainer.train_step(trainer.loader.next_batch()).skipped
    assert trainer.consecutive_nonfinite == 0

    with torch.no_grad():
        trainer.model.norm.weight.fill_(math.inf)
    trainer.train_step(trainer.loader.next_batch())
    trainer.train_step(trainer.loader.next_batch())
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.train_step(trainer.loader.next_batch())
