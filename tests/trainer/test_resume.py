"""Resume: a real SIGKILL mid-run, and a change of world size between save and resume."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed import run_on_ranks
from tests.trainer.jobs import losses, tiny_overrides, train_job
from trainer.metrics import read_metrics


def _cli(overrides):
    return [sys.executable, "-m", "trainer.cli", "train", *overrides]


def test_sigkill_at_a_random_step_resumes_bit_identically(corpus, data_cache, tmp_path, reference, capsys):
    steps, every = reference.settings["training__steps"], 4
    killed = tiny_overrides(corpus, data_cache, tmp_path, "killed", checkpoint__every_steps=every, **reference.settings)
    kill_after = random.Random().randint(every + 1, steps - 3)
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        records = [r for r in read_metrics(tmp_path / "killed") if "train/loss" in r] if (tmp_path / "killed").exists() else []
        if records and records[-1]["step"] >= kill_after:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(tmp_path / "killed"))
    assert killed_at < steps

    capsys.readouterr()
    train_job(killed)  # the restart, in this process: it needs no signal, so it skips a torch import
    assert "resumed from" in capsys.readouterr().out

    got = losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == reference.losses, f"killed at step {killed_at}: resumed losses differ"


@pytest.mark.parametrize("first_world, second_world", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_continues_the_token_stream(corpus, data_cache, tmp_path, first_world, second_world):
    # A constant schedule makes 6 steps + 6 more the same computation as 12 uninterrupted steps.
    common = dict(schedule__name="constant", checkpoint__every_steps=3)

    def run(world, name, steps):
        overrides = tiny_overrides(corpus, data_cache, tmp_path, name, training__steps=steps, **common)
        return run_on_ranks(train_job, world, overrides)[0] if world > 1 else train_job(overrides)

    reference = run(first_world, "reference", 12)
    first = run(first_world, "resized", 6)
    second = run(second_world, "resized", 12)

    tokens_per_step = 8 * 32
    assert first["tokens_consumed"] == 6 * tokens_per_step
    assert second["tokens_consumed"] == reference["tokens_consumed"] == 12 * tokens_per_step
    records = [r for r in read_metrics(tmp_path / "resized") if "data/tokens_consumed" in r]
    assert [r["data/tokens_consumed"] for r in records] == [s * tokens_per_step for s in range(1, 13)]

    want, got = losses(tmp_path / "reference"), losses(tmp_path / "resized")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])
