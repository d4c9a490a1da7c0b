"""Preemption: a real SIGTERM / SIGUSR1 to a running `wren train` checkpoints, exits 0, and the rerun resumes exactly."""

import signal
import subprocess
import sys

import pytest

from tests.launch.waiting import last_logged_step, wait_until
from tests.trainer.jobs import losses, tiny_overrides


def _cli(overrides):
    return [sys.executable, "-m", "trainer.cli", "train", *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoints_exits_cleanly_and_the_rerun_matches(corpus, data_cache, tmp_path, signum):
    steps = 40
    common = dict(training__steps=steps, checkpoint__every_steps=25, schedule__name="cosine", parallel__num_threads=1)
    reference = tiny_overrides(corpus, data_cache, tmp_path, "reference", **common)
    subprocess.run(_cli(reference), check=True, capture_output=True, timeout=300)

    stopped = tiny_overrides(corpus, data_cache, tmp_path, "stopped", **common)
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

    rerun = subprocess.run(_cli(stopped), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {stopped_at}" in rerun.stdout
    want, got = losses(tmp_path / "reference"), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want, f"stopped at step {stopped_at}: resumed losses differ"
