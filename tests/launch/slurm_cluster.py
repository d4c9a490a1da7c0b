"""A real single-node SLURM cluster for the tests, started by launch/testing/slurm_local.sh."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

SLURM_LOCAL = Path(__file__).resolve().parents[2] / "launch" / "testing" / "slurm_local.sh"
UNAVAILABLE = 3  # slurm_local.sh's exit status when SLURM cannot run on this machine


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict[str, str]:
    """The environment (SLURM_CONF set) of a running cluster; skips where SLURM cannot run."""
    directory = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SLURM_LOCAL), "start", str(directory)], capture_output=True, text=True, timeout=600)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(proc.stderr.strip() or "SLURM cannot run here")
    assert proc.returncode == 0, f"slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(directory / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=60)
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", str(directory)], capture_output=True, timeout=120)


def submitted_job_id(sbatch_stdout: str) -> str:
    """The job id from sbatch's "Submitted batch job N"."""
    match = re.search(r"Submitted batch job (\d+)", sbatch_stdout)
    assert match, f"no job id in sbatch output: {sbatch_stdout!r}"
    return match.group(1)


def job_field(job_id: str, field: str, env: dict[str, str]) -> str:
    """One field (JobState, Restarts, ...) of `scontrol show job`."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env, timeout=60).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for_job_state(job_id: str, states: set[str], env: dict[str, str], timeout_s: float = 600) -> str:
    """Poll until the job reaches one of `states`; returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_field(job_id, "JobState", env)
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states} within {timeout_s:.0f} s (last: {state})")
