"""`wren sweep`: sweep files, run planning, SLURM array generation, and one small real sweep end to end."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch.sweep import (
    SweepError,
    finished,
    load_sweep,
    plan,
    run_name,
    write_slurm_array,
)

REPO = Path(__file__).resolve().parents[2]


def sweep_file(tmp_path: Path, corpus: Path, cache: Path, grid: str, launcher: str = "local", steps: int = 6) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent(f"""
        [sweep]
        name = "s"
        config = "{REPO / 'configs' / 'tiny.toml'}"
        output_dir = "{tmp_path / 'out'}"
        launcher = "{launcher}"

        [sweep.overrides]
        "data.source" = "text"
        "data.paths" = ["{corpus}"]
        "data.vocab_size" = 512
        "data.cache_dir" = "{cache}"
        "model.n_layers" = 1
        "model.n_heads" = 4
        "model.n_kv_heads" = 2
        "mup.base_dim" = 32
        "training.steps" = {steps}
        "training.seq_len" = 32
        "training.global_batch_size" = 8
        "schedule.warmup_steps" = 2
        "eval.every_steps" = 0
        "eval.batches" = 2
        "eval.batch_size" = 4
        "checkpoint.every_steps" = 0
        "metrics.tensorboard" = false
        "metrics.plot" = false
        "metrics.peak_flops_per_s" = 1e11
        "parallel.num_threads" = 1
    """) + textwrap.dedent(grid))
    return path


def test_grid_with_a_linked_axis_expands_to_named_runs(tmp_path):
    path = sweep_file(tmp_path, tmp_path, tmp_path, """
        [grid]
        "model.dim,model.ffn_hidden_dim" = [[32, 64], [64, 128]]
        "optimizer.lr" = [1e-3, 1e-2]
        "mup.enabled" = [false, true]
    """)
    cfg = load_sweep(path)
    assert len(cfg.runs) == 8
    assert {(r["model.dim"], r["model.ffn_hidden_dim"]) for r in cfg.runs} == {(32, 64), (64, 128)}
    names = [run_name(r, cfg.varied) for r in cfg.runs]
    assert len(set(names)) == 8 and "dim32_ffn-hidden-dim64_lr0.001_enabledF" in names
    jobs = plan(cfg)
    assert jobs[0].job.model.extra["dim"] == 32 and jobs[0].job.run.run_dir == tmp_path / "out" / "s" / "runs" / jobs[0].name


@pytest.mark.parametrize(
    "grid, message",
    [
        ("", "either a [grid] table or [[runs]]"),
        ('[grid]\n"optimizer.lr" = []\n', "grid.optimizer.lr"),
        ('[grid]\n"model.dim,model.ffn_hidden_dim" = [[32]]\n', "list of 2 values"),
        ('[grid]\n"optimizer.zzz" = [1, 2]\n', "optimizer.zzz"),
        ('[grid]\n"optimizer.lr" = [1e-3]\n[[runs]]\n"optimizer.lr" = 1e-2\n', "not both"),
    ],
)
def test_bad_sweep_files_name_the_problem(tmp_path, grid, message):
    path = sweep_file(tmp_path, tmp_path, tmp_path, grid)
    with pytest.raises(SweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan(load_sweep(path))


def test_slurm_launcher_writes_an_array_whose_tasks_get_each_runs_arguments(tmp_path):
    path = sweep_file(tmp_path, tmp_path, tmp_path, '[[runs]]\n"optimizer.lr" = 1e-3\n[[runs]]\n"optimizer.lr" = 1e-2\n',
                      launcher="slurm")
    cfg = load_sweep(path)
    runs = plan(cfg)
    script = write_slurm_array(cfg, runs)
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "--launcher slurm" in text and "$SLURM_ARRAY_TASK_ID" in text
    # What bash's `mapfile -d ''` would read for task 1: the trainer's argv for the second run, verbatim.
    args = (cfg.directory / "slurm" / "args" / "1.args").read_bytes().split(b"\0")[:-1]
    assert args[0].decode() == str(REPO / "configs" / "tiny.toml")
    assert "--optimizer.lr=0.01" in [a.decode() for a in args] and f'--run.name="{runs[1].name}"' in [a.decode() for a in args]
    # The Ray launcher goes through the same train.sh, one Ray job per run.
    cfg.launcher, cfg.nproc = "ray", 2
    from launch.sweep import launch_command, train_args

    command = launch_command(cfg, train_args(cfg, runs[0].run, runs[0].name))
    assert command[:7] == ["bash", str(REPO / "launch" / "train.sh"), "--launcher", "ray", "--nproc", "2", "--"]
    result = subprocess.run(["bash", "-c", f"mapfile -d '' args < {cfg.directory}/slurm/args/1.args; printf '%s\\n' \"${{args[@]}}\""],
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [a.decode() for a in args]


@pytest.mark.slow
def test_small_real_sweeps_end_to_end_local_and_torchrun(tmp_path, corpus, data_cache):
    path = sweep_file(tmp_path, corpus, data_cache, """
        [grid]
        "model.dim,model.ffn_hidden_dim" = [[32, 64], [64, 128]]
        "training.steps" = [4, 8]
        "optimizer.lr" = [3e-3, 3e-2]
    """)
    cmd = [sys.executable, "-m", "trainer.cli", "sweep", str(path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert first.returncode == 0, first.stdout + first.stderr
    directory = tmp_path / "out" / "s"
    rows = list(csv.DictReader(open(directory / "results.csv")))
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)
    for row in rows:  # every loss is the run's own final eval, read back from its metrics
        records = [json.loads(line) for line in open(directory / "runs" / row["run"] / "metrics.jsonl")]
        assert float(row["final_eval_loss"]) == [r["eval/loss"] for r in records if "eval/loss" in r][-1]
        assert int(row["D"]) == int(row["training.steps"]) * 8 * 32
    assert len({r["N"] for r in rows}) == 2 and len({r["D"] for r in rows}) == 2
    report = (directory / "report.md").read_text()
    assert "Optimal learning rate" in report and "Loss vs compute" in report and "Step-Law form" in report
    for plot in ("loss_vs_lr.png", "loss_vs_compute.png"):
        assert (directory / plot).read_bytes()[:4] == b"\x89PNG"
    # Rerunning trains nothing: every run is recognised as finished.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "[1/" not in again.stdout
    assert all(r["status"] == "done (skipped)" for r in csv.DictReader(open(directory / "results.csv")))
    assert all(finished(directory / "runs" / r["run"], int(r["training.steps"])) for r in rows)

    # The torchrun launcher: one two-rank run through launch/train.sh, collected the same way.
    torchrun_dir = tmp_path / "torchrun"
    torchrun_dir.mkdir()
    path = sweep_file(torchrun_dir, corpus, data_cache, '[[runs]]\n"optimizer.lr" = 1e-2\n', launcher="torchrun", steps=3)
    path.write_text(path.read_text().replace('launcher = "torchrun"', 'launcher = "torchrun"\nnproc = 2'))
    dry = subprocess.run([*cmd[:-1], str(path), "--dry-run"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert dry.returncode == 0 and "--launcher torchrun --nproc 2 --" in dry.stdout
    result = subprocess.run([*cmd[:-1], str(path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in next((torchrun_dir / "out" / "s" / "logs").glob("*.log")).read_text()
    (row,) = csv.DictReader(open(torchrun_dir / "out" / "s" / "results.csv"))
    assert row["status"] == "done" and float(row["final_eval_loss"]) > 0


def test_analysis_recovers_the_laws_behind_synthetic_results(tmp_path):
    import itertools
    import math

    from launch.sweep import SweepConfig, analyse, write_report

    def lr_opt(N, D):
        return 0.5 * N**-0.5 * (D / 1e6) ** 0.1

    def batch_opt(D):
        return 0.58 * D**0.571

    rows = []
    for N, D in itertools.product([1e5, 4e5, 1.6e6], [1e6, 4e6, 1.6e7]):
        for k, j in itertools.product(range(-3, 4), range(-2, 3)):
            lr, batch = lr_opt(N, D) * 2.0**k, batch_opt(D) * 2.0**j
            loss = 2 + 50 * (6 * N * D) ** -0.2 + 0.05 * math.log(lr / lr_opt(N, D)) ** 2 + 0.02 * math.log(batch / batch_opt(D)) ** 2
            rows.append({"run": f"{N}-{D}-{k}-{j}", "N": N, "D": D, "lr": lr, "batch_tokens": batch, "final_eval_loss": loss,
                         "status": "done", "optimizer.lr": lr})
    cfg = SweepConfig(path=tmp_path / "s.toml", name="s", config=tmp_path / "c.toml", output_dir=tmp_path,
                      runs=[{"optimizer.lr": r["lr"]} for r in rows], bootstrap_samples=50)
    (entry,) = analyse(cfg, rows).values()
    assert len(entry["optima"]) == 9 * 5 and not any(o["at_edge"] for o in entry["optima"])
    assert entry["lr_law"]["fit"].a == pytest.approx(-0.5, rel=0.03)
    assert entry["lr_law"]["fit"].b == pytest.approx(0.1, rel=0.03)
    assert entry["batch_law"]["fit"].b == pytest.approx(0.571, rel=0.03)
    assert entry["loss_law"]["fit"].alpha == pytest.approx(0.2, rel=0.03)
    cfg.runs = []
    assert "Step-Law form: lr_opt" in write_report(cfg, [{**r, "C": 0} for r in rows]).read_text()
