"""Ray: launch/ray_job.py under Ray Train's TorchTrainer, on real local clusters bound to 127.0.0.1.

Losses must equal the same run under torchrun (2 gloo ranks either way), submitted with
`ray job submit` to a running cluster or on a private local cluster; a Ray Train worker killed
with SIGKILL mid-run is restarted by FailureConfig(max_failures) and the run resumes from wren's
last checkpoint with the same losses.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.launch.ray_cluster import train_workers
from tests.launch.waiting import last_logged_step, wait_until
from tests.trainer.jobs import losses, tiny_overrides

TRAIN_SH = Path(__file__).resolve().parents[2] / "launch" / "train.sh"


def assert_same_losses(want: dict[int, float], got: dict[int, float], steps: int) -> None:
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, want[step], got[step])


@pytest.mark.slow
def test_submitted_job_survives_a_killed_worker_and_matches_torchrun(ray_cluster, reference_2ranks, corpus, data_cache, tmp_path):
    address, env, temp_dir = ray_cluster
    steps = reference_2ranks.settings["training__steps"]
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "ray", checkpoint__every_steps=4, **reference_2ranks.settings)
    run = tmp_path / "ray"
    job = subprocess.Popen(
        ["bash", str(TRAIN_SH), "--launcher", "ray", "--address", address, "--nproc", "2", "--max-restarts", "1", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHON": sys.executable},
    )
    try:
        wait_until(lambda: last_logged_step(run) >= 6, "step 6 under Ray", alive=lambda: job.poll() is None, timeout_s=400)
        workers = train_workers(temp_dir)
        assert len(workers) == 2, workers
        os.kill(workers[1].pid, signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, out[-5000:]
    assert "resumed from" in out and "succeeded" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert f"'step': {steps}" in out, "the final metrics should reach the driver"
    assert_same_losses(reference_2ranks.losses, losses(run), steps)


@pytest.mark.slow
def test_without_an_address_a_local_cluster_runs_the_job(reference_2ranks, corpus, data_cache, tmp_path):
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "ray_local", **reference_2ranks.settings)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHON": sys.executable}
    proc = subprocess.Popen(
        ["bash", str(TRAIN_SH), "--launcher", "ray", "--nproc", "2", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # the driver owns its private cluster: take the daemons down with it
            for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                child.kill()
    assert proc.returncode == 0, out[-5000:]
    assert "Ray Train with 2 worker(s)" in out
    assert_same_losses(reference_2ranks.losses, losses(tmp_path / "ray_local"), reference_2ranks.settings["training__steps"])
