"""launch/train.sh: the command each launcher runs, arguments passed through untouched, bad options refused."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.jobs import losses, tiny_overrides

TRAIN_SH = Path(__file__).resolve().parents[2] / "launch" / "train.sh"
# Overrides a shell would act on if they were ever interpolated into shell code.
HOSTILE = ["--run.name=x$(touch pwned)`touch pwned2`;touch pwned3", "--data.text_field=a b\nc'\"$HOME"]


def dry_run(*args: str, env: dict | None = None, cwd: Path | None = None) -> list[str]:
    proc = subprocess.run(
        ["bash", str(TRAIN_SH), "--dry-run", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def env_without_slurm() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | {"PYTHON": sys.executable}


def test_each_launcher_runs_the_trainer_with_the_arguments_untouched(tmp_path):
    env = env_without_slurm()
    trainer = ["-m", "trainer.cli", "train", "my.toml", *HOSTILE]

    local = dry_run("my.toml", *HOSTILE, env=env, cwd=tmp_path)
    assert local == [sys.executable, *trainer]

    torchrun = dry_run("--nproc", "2", "--max-restarts=3", "my.toml", *HOSTILE, env=env)
    assert torchrun[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert torchrun[-len(trainer):] == trainer
    flags = torchrun[3 : -len(trainer)]
    assert {"--nproc-per-node": "2", "--nnodes": "1", "--max-restarts": "3"}.items() <= dict(zip(flags[::2], flags[1::2])).items()
    assert "--standalone" in flags

    multi = dry_run("--launcher", "torchrun", "--nodes", "2", "--nproc", "4", "--rdzv-endpoint", "node0:29400", "my.toml", env=env)
    assert "--standalone" not in multi and multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400"

    slurm = dry_run("--launcher", "slurm", "--nodes", "3", "--nproc", "4", "my.toml", *HOSTILE, env=env)
    assert slurm[0] == "env" and "WREN_NPROC_PER_NODE=4" in slurm and f"WREN_PYTHON={sys.executable}" in slurm
    at = slurm.index("sbatch")
    assert slurm[at + 1 : at + 3] == ["--nodes", "3"] and slurm[at + 3].endswith("launch/slurm.sbatch")
    assert slurm[at + 4 :] == ["my.toml", *HOSTILE]

    in_allocation = dry_run("--launcher", "slurm", "my.toml", env=env | {"SLURM_JOB_ID": "42"})
    assert "sbatch" not in in_allocation and in_allocation[-3] == "bash"
    assert in_allocation[-2].endswith("launch/slurm.sbatch") and in_allocation[-1] == "my.toml"

    ray_local = dry_run("--launcher", "ray", "--nproc", "2", "my.toml", *HOSTILE, env=env)
    assert ray_local[:3] == [sys.executable, "-m", "launch.ray_job"]
    assert ray_local[ray_local.index("--num-workers") + 1] == "2"
    assert ray_local[ray_local.index("--") + 1 :] == ["my.toml", *HOSTILE]

    ray_remote = dry_run("--launcher", "ray", "--address", "http://head:8265", "--nodes", "2", "--nproc", "2", "my.toml", *HOSTILE, env=env, cwd=tmp_path)
    assert ray_remote[:6] == [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address"]
    entry = ray_remote[ray_remote.index("--") + 1 :]
    assert entry[:3] == [sys.executable, "-m", "launch.ray_job"]
    assert entry[entry.index("--num-workers") + 1] == "4" and entry[entry.index("--chdir") + 1] == str(tmp_path)
    assert entry[entry.index("--") + 1 :] == ["my.toml", *HOSTILE]
    assert not list(tmp_path.glob("pwned*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "0"], "--nproc must be a positive integer"),
        (["--nodes", "two"], "--nodes must be a positive integer"),
        (["--launcher", "mpi"], "--launcher must be one of local, torchrun, slurm, ray"),
        (["--launcher", "local", "--nproc", "2"], "--launcher local runs one process"),
        (["--nodes", "2"], "needs --rdzv-endpoint"),
        (["--address", "http://x:8265"], "--address is for --launcher ray"),
        (["--nproc"], "--nproc needs a value"),
    ],
)
def test_bad_launcher_options_fail_with_one_line(args, message):
    proc = subprocess.run(["bash", str(TRAIN_SH), "--dry-run", "my.toml", *args], capture_output=True, text=True, env=env_without_slurm())
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("train.sh: ")
    assert message in proc.stderr


def test_local_launcher_trains_with_a_hostile_override_taken_literally(corpus, data_cache, tmp_path):
    # No spaces: the trainer's argparse reads an argument with a space as the config path.
    name = "x$(touch${IFS}pwned);`touch${IFS}pwned2`"
    overrides = tiny_overrides(corpus, data_cache, tmp_path, name, training__steps=2)
    proc = subprocess.run(["bash", str(TRAIN_SH), *overrides], capture_output=True, text=True, cwd=tmp_path, env=env_without_slurm(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path / name)) == [1, 2]
    assert not list(tmp_path.glob("pwned*"))
