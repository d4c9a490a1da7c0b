"""SLURM: launch/slurm.sbatch on a real single-node cluster (slurmctld + slurmd + munge).

Both layouts run 2 ranks: torchrun inside one srun task per node, and one srun task per rank
(rank from SLURM_PROCID). The torchrun job is preempted the way SLURM does it before a time limit
(SIGUSR1 to the batch shell): it must checkpoint, requeue itself and finish after the restart
with the losses of a single-process run; the one-task-per-rank job has the losses of the same
run under torchrun.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import job_field, submitted_job_id, wait_for_job_state
from tests.launch.waiting import last_logged_step, wait_until
from tests.trainer.jobs import losses, tiny_overrides

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def assert_same_losses(want: dict[int, float], got: dict[int, float], steps: int) -> None:
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, want[step], got[step])


def job_output(directory: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in directory.glob(f"wren-*-{job_id}.out"))


@pytest.mark.slow
def test_torchrun_job_is_preempted_requeued_and_matches_one_process(slurm, corpus, data_cache, tmp_path, reference):
    steps = reference.settings["training__steps"]
    # Checkpoints only at the end: the one the restart resumes from is the preemption's.
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "slurm", checkpoint__every_steps=0, **reference.settings)
    env = {**slurm, "PYTHON": sys.executable}
    submit = subprocess.run(
        ["bash", str(LAUNCH / "train.sh"), "--launcher", "slurm", "--nproc", "2", *overrides],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    job = submitted_job_id(submit.stdout)
    run = tmp_path / "slurm"

    wait_until(lambda: last_logged_step(run) >= 3, "step 3 of the SLURM job", alive=lambda: job_field(job, "JobState", slurm) not in ENDED)
    # What --signal=B:USR1@120 does before the time limit: SIGUSR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm, timeout=60)
    requeued = lambda: job_field(job, "Restarts", slurm) == "1" and job_field(job, "JobState", slurm) == "PENDING"  # noqa: E731
    wait_until(requeued, "the job to requeue itself", timeout_s=300)
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 3 <= stopped_at < steps
    # A requeued job waits about two minutes before it is eligible again; start it sooner, but not in
    # the second of the requeue: slurmd compares credentials with the revocation time to the second,
    # and kills a restart whose new credential is that old ("Job credential revoked").
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=True, env=slurm, timeout=60)
    state = wait_for_job_state(job, ENDED, slurm)

    out = job_output(tmp_path, job)
    assert state == "COMPLETED", out[-4000:]
    assert f"stopped by SIGTERM after step {stopped_at}" in out
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    assert (run / "checkpoints" / f"step_{steps:08d}" / ".metadata").is_file()
    assert_same_losses(reference.losses, losses(run), steps)


@pytest.mark.slow
def test_one_task_per_rank_reads_its_rank_from_slurm(slurm, corpus, data_cache, tmp_path, reference_2ranks):
    steps = reference_2ranks.settings["training__steps"]
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "tasks", **reference_2ranks.settings)
    env = {**slurm, "WREN_PYTHON": sys.executable}
    submit = subprocess.run(
        ["sbatch", "--ntasks-per-node=2", str(LAUNCH / "slurm.sbatch"), *overrides],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    job = submitted_job_id(submit.stdout)
    state = wait_for_job_state(job, ENDED, slurm)
    out = job_output(tmp_path, job)
    assert state == "COMPLETED", out[-4000:]
    assert "2 task(s)" in out and "torch.distributed.run" not in out
    assert "FSDP2 fully_shard over 2 ranks" in out
    assert (tmp_path / "tasks" / "checkpoints" / f"step_{steps:08d}" / ".metadata").is_file()
    assert_same_losses(reference_2ranks.losses, losses(tmp_path / "tasks"), steps)
