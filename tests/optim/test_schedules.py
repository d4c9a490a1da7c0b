"""Schedules against their closed forms."""

import math

import pytest

from optim.schedules import ScheduleConfig


def test_warmup_is_linear_to_peak():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [cfg.lr_multiplier(s, 100) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cfg.lr_multiplier(10, 100) == pytest.approx(1.0)


def test_cosine_follows_sgdr_half_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 111  # 100 decay intervals after warmup
    for step in (10, 35, 60, 85, 110):
        t = (step - 10) / 100
        expected = 0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2
        assert cfg.lr_multiplier(step, total) == pytest.approx(expected)
    assert cfg.lr_multiplier(110, total) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin.lr_multiplier(0, 11) == pytest.approx(1.0)
    assert lin.lr_multiplier(5, 11) == pytest.approx(0.5)
    assert lin.lr_multiplier(10, 11) == pytest.approx(0.0)
    const = ScheduleConfig(name="constant", warmup_steps=4)
    assert const.lr_multiplier(1, 50) == pytest.approx(0.5)
    assert const.lr_multiplier(40, 50) == 1.0
