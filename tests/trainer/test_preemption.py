"""Preemption: a real SIGTERM / SIGUSR1 to a running `wren train` checkpoints, exits 0, and the rerun resumes exactly."""

import signal
import subprocess
import sys

import pytest

from tests.launch.waiting import last_logged_step, wait_until
from tests.trainer.jobs import losses, tiny_overrides, train_job


def _cli(overrides):
    return [sys.executable, "-m", "trainer.cli", "train", *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_cleanly_and_the_rerun_matches(corpus, data_cache, tmp_path, reference, capsys, signum):
    steps = reference.settings["training__steps"]
    # Checkpoints only at the end: the one the rerun resumes from is the signal's.
    stopped = tiny_overrides(corpus, data_cache, tmp_path, "stopped", checkpoint__every_steps=0, **reference.settings)
    run = tmp_path / "stopped"
    proc = subprocess.Popen(_cli(stopped), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: last_logged_step(run) >= 3, "step 3", alive=lambda: proc.poll() is None)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    stopped_at = last_logged_step(run)
    assert 3 <= stopped_at < steps, "the signal should stop the run before its end"
    name = signal.Signals(signum).name
    checkpoint = run / "checkpoints" / f"step_{stopped_at:08d}"
    assert f"stopped by {name} after step {stopped_at}" in out
    assert (checkpoint / ".metadata").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert "done." not in out, "a preempted run must not report itself finished"

    capsys.readouterr()
    train_job(stopped)  # the rerun, in this process: it needs no signal, so it skips a torch import
    assert f"resumed from {checkpoint} at step {stopped_at}" in capsys.readouterr().out
    got = losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == reference.losses, f"stopped at step {stopped_at}: resumed losses differ"
