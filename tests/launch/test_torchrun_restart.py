"""torchrun --max-restarts: a rank killed with SIGKILL mid-run is restarted and the run resumes exactly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.launch.waiting import last_logged_step, wait_until
from tests.trainer.jobs import losses, tiny_overrides

TRAIN_SH = Path(__file__).resolve().parents[2] / "launch" / "train.sh"


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if "trainer.cli" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_killed_rank_is_restarted_and_the_run_matches_an_uninterrupted_one(corpus, data_cache, tmp_path, reference_2ranks):
    steps = reference_2ranks.settings["training__steps"]
    env = {**os.environ, "PYTHON": sys.executable}
    killed = tiny_overrides(corpus, data_cache, tmp_path, "killed", checkpoint__every_steps=4, **reference_2ranks.settings)
    run = tmp_path / "killed"
    launcher = subprocess.Popen(
        ["bash", str(TRAIN_SH), "--nproc", "2", "--max-restarts", "1", *killed],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        wait_until(lambda: last_logged_step(run) >= 6, "step 6", alive=lambda: launcher.poll() is None)
        first_ranks = _ranks(launcher)
        assert len(first_ranks) == 2
        first_ranks[1].send_signal(signal.SIGKILL)
        out, _ = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    assert "resumed from" in out, "the restarted ranks should resume from the last checkpoint"
    want, got = reference_2ranks.losses, losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, want[step], got[step])
