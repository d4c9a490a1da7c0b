"""A real local Ray cluster for the tests: `ray start --head` on 127.0.0.1 with 2 CPUs, in its own temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import psutil
import pytest

from tests.distributed import free_port

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """The daemons of the cluster living in `temp_dir` (their command lines name it) and their children."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(proc.info["cmdline"] or []):
            found[proc.pid] = proc
            for child in proc.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


def stop_cluster(temp_dir: str) -> None:
    """Terminate, then kill, only this cluster's processes (`ray stop` would stop every cluster here)."""
    procs = cluster_processes(temp_dir)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ray_cluster():
    """(dashboard address, environment for the Ray CLI, temp dir) of a fresh 2-CPU head node."""
    temp_dir = tempfile.mkdtemp(prefix="wren-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # Ray 2.60 enables token auth when a token exists (~/.ray/auth_token); its CLI needs the mode said.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    start = [
        *RAY, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(start, capture_output=True, text=True, env=env, timeout=180)
        assert proc.returncode == 0, f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        yield f"http://127.0.0.1:{dashboard}", env, temp_dir
    finally:
        stop_cluster(temp_dir)


def train_workers(temp_dir: str) -> list[psutil.Process]:
    """The live Ray Train worker processes of the cluster in `temp_dir`."""
    return [p for p in cluster_processes(temp_dir) if "RayTrainWorker" in " ".join(_cmdline(p))]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []

