"""`wren sweep SWEEP.toml`: a grid or list of training runs, their results table, fits, plots and report.

A sweep file names a base recipe and the overrides that vary:

    [sweep]
    name = "width_lr"
    config = "../tiny.toml"          # relative to the sweep file
    output_dir = "runs/sweeps"       # the sweep writes <output_dir>/<name>/
    launcher = "local"               # local | torchrun | slurm | ray (launch/train.sh --launcher)
    nproc = 1                        # processes per run (torchrun, slurm, ray)
    overrides = { "training.steps" = 40 }   # applied to every run

    [grid]                           # every combination (or [[runs]] tables: one run each)
    "model.dim,model.ffn_hidden_dim" = [[64, 172], [128, 344]]   # a linked axis
    "optimizer.lr" = [1e-3, 3e-3, 1e-2]

Each run is `launch/train.sh --launcher L --nproc P -- CONFIG --run.output_dir=<sweep>/runs
--run.name=<run> OVERRIDES...`, one after another, with its output in `<sweep>/logs/<run>.log`.
A run whose metrics hold the final evaluation is finished and skipped; an unfinished one is
launched again and resumes from its own latest checkpoint. Under `slurm` the sweep writes a
SLURM array script (one array task per unfinished run) and submits it with sbatch; run the same
`wren sweep` again once the array is done to collect and fit. Then the sweep writes
`results.csv` / `results.jsonl`, fits (optim/fits.py) and `report.md` with PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from trainer.config_loader import toml_value
from trainer.errors import UserError

LAUNCHERS = ("local", "torchrun", "slurm", "ray")
REPO = Path(__file__).resolve().parent.parent
TRAIN_SH = REPO / "launch" / "train.sh"
SIZE_KEYS = re.compile(r"^model\.")  # overrides that change N (the model's shape)
LR_KEY, BATCH_KEY = "optimizer.lr", "training.global_batch_size"


class SweepError(UserError):
    """The sweep file or its runs are unusable."""


@dataclass(kw_only=True)
class SweepConfig:
    """A sweep file, resolved: the base recipe, the common overrides and the runs."""

    path: Path
    name: str
    config: Path
    output_dir: Path
    launcher: str = "local"
    nproc: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each run's varying overrides
    bootstrap_samples: int = 1000

    @property
    def directory(self) -> Path:
        return self.output_dir / self.name

    @property
    def varied(self) -> list[str]:
        """The override keys that take more than one value across the runs, in file order."""
        keys = list(dict.fromkeys(k for run in self.runs for k in run))
        return [k for k in keys if len({json.dumps(run.get(k)) for run in self.runs}) > 1]


def load_sweep(path: str | Path, launcher: str | None = None) -> SweepConfig:
    """Read and check a sweep file; `launcher` overrides its [sweep] launcher."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' does not exist")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"sweep file '{path}' is not valid TOML: {err}") from None
    unknown = set(table) - {"sweep", "grid", "runs", "fit"}
    if unknown:
        raise SweepError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (known: sweep, grid, runs, fit)")
    head = table.get("sweep", {})
    known = {"name", "config", "output_dir", "launcher", "nproc", "overrides"}
    if set(head) - known:
        raise SweepError(f"{path}: sweep.{sorted(set(head) - known)[0]}: unknown key (known: {', '.join(sorted(known))})")
    for key in ("name", "config"):
        if not isinstance(head.get(key), str) or not head[key]:
            raise SweepError(f"{path}: sweep.{key}: required (a string)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", head["name"]):
        raise SweepError(f"{path}: sweep.name: letters, digits, '_', '.' and '-' only, got {head['name']!r}")
    config = (path.parent / head["config"]).resolve()
    if not config.is_file():
        raise SweepError(f"{path}: sweep.config: '{config}' does not exist")
    cfg = SweepConfig(
        path=path,
        name=head["name"],
        config=config,
        output_dir=Path(head.get("output_dir", "runs/sweeps")),
        launcher=launcher or head.get("launcher", "local"),
        nproc=head.get("nproc", 1),
        overrides=dict(head.get("overrides", {})),
        runs=_expand(path, table),
        bootstrap_samples=table.get("fit", {}).get("bootstrap_samples", 1000),
    )
    if cfg.launcher not in LAUNCHERS:
        raise SweepError(f"{path}: sweep.launcher: must be one of {', '.join(LAUNCHERS)}, got {cfg.launcher!r}")
    if not isinstance(cfg.nproc, int) or cfg.nproc < 1:
        raise SweepError(f"{path}: sweep.nproc: must be a positive integer, got {cfg.nproc!r}")
    if cfg.launcher == "local" and cfg.nproc > 1:
        raise SweepError(f"{path}: sweep.nproc: the local launcher runs one process; use torchrun, slurm or ray")
    return cfg


def _expand(path: Path, table: dict) -> list[dict[str, Any]]:
    """The runs: the [grid]'s cartesian product, or the [[runs]] list (not both)."""
    grid, listed = table.get("grid"), table.get("runs")
    if (grid is None) == (listed is None):
        raise SweepError(f"{path}: give either a [grid] table or [[runs]] tables, not {'both' if grid else 'neither'}")
    if listed is not None:
        if not listed or not all(isinstance(r, dict) and r for r in listed):
            raise SweepError(f"{path}: runs: each [[runs]] table needs at least one override")
        return [dict(r) for r in listed]
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key}: must be a non-empty list of values")
        fields = [k.strip() for k in key.split(",")]
        if len(fields) > 1:  # a linked axis: "a,b" = [[a1, b1], [a2, b2]] varies a and b together
            if not all(isinstance(v, list) and len(v) == len(fields) for v in values):
                raise SweepError(f"{path}: grid.{key}: each value must be a list of {len(fields)} values")
            axes.append([dict(zip(fields, v)) for v in values])
        else:
            axes.append([{key: v} for v in values])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def run_name(run: dict[str, Any], varied: list[str]) -> str:
    """A readable, unique directory name from the run's varying values (e.g. dim64_lr0.003_enabledT)."""
    parts = []
    for key in varied:
        value = run.get(key)
        text = {True: "T", False: "F"}.get(value, f"{value:g}" if isinstance(value, float) else str(value))
        parts.append(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{key.split('.')[-1]}{text}"))
    return "_".join(parts) or "run"


def train_args(cfg: SweepConfig, run: dict[str, Any], name: str) -> list[str]:
    """The trainer's arguments for one run: the base recipe, then the sweep's and the run's overrides."""
    values = {**cfg.overrides, **run, "run.output_dir": str(cfg.directory / "runs"), "run.name": name}
    return [str(cfg.config), *(f"--{key}={toml_value(value)}" for key, value in values.items())]


def launch_command(cfg: SweepConfig, args: list[str]) -> list[str]:
    """`launch/train.sh` for the sweep's launcher, the trainer's arguments after `--`."""
    return ["bash", str(TRAIN_SH), "--launcher", cfg.launcher, "--nproc", str(cfg.nproc), "--", *args]


def finished(run_dir: Path, steps: int) -> bool:
    """Whether a run logged its final evaluation (the trainer evaluates at the last step)."""
    return final_metrics(run_dir, steps).get("eval/loss") is not None


def final_metrics(run_dir: Path, steps: int) -> dict[str, float]:
    """The final eval loss and last train loss of a run from its metrics.jsonl ({} if absent)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step") == steps and "eval/loss" in record:
            out["eval/loss"] = record["eval/loss"]
        if "train/loss" in record:
            out["train/loss"] = record["train/loss"]
    return out


@dataclass
class Planned:
    """One run of the sweep: its name, overrides and resolved job config."""

    name: str
    run: dict[str, Any]
    job: Any  # trainer.config.JobConfig

    def run_dir(self, cfg: SweepConfig) -> Path:
        return cfg.directory / "runs" / self.name


def plan(cfg: SweepConfig) -> list[Planned]:
    """Resolve every run's config now, so that a bad override fails before anything trains."""
    from trainer.config import JobConfig

    names = [run_name(run, cfg.varied) for run in cfg.runs]
    if len(set(names)) != len(names):
        raise SweepError(f"{cfg.path}: two runs have the same overrides")
    planned = []
    for name, run in zip(names, cfg.runs):
        args = train_args(cfg, run, name)
        try:
            job = JobConfig.load(args[0], args[1:], world_size=1)
        except UserError as err:
            raise SweepError(f"{cfg.path}: run {name}: {err}") from None
        planned.append(Planned(name=name, run=run, job=job))
    return planned


def execute(cfg: SweepConfig, runs: list[Planned], log=print) -> dict[str, str]:
    """Launch every unfinished run in turn (or submit them as a SLURM array); name -> status."""
    status = {}
    pending = []
    for item in runs:
        if finished(item.run_dir(cfg), item.job.training.steps):
            status[item.name] = "done (skipped)"
        else:
            pending.append(item)
    if cfg.launcher == "slurm":
        if pending:
            script = write_slurm_array(cfg, pending)
            status.update(submit_slurm(script, pending, log))
        return status
    logs = cfg.directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(pending, 1):
        log(f"wren sweep: [{index}/{len(pending)}] {item.name}")
        with open(logs / f"{item.name}.log", "a") as out:
            code = subprocess.run(launch_command(cfg, train_args(cfg, item.run, item.name)), stdout=out,
                                  stderr=subprocess.STDOUT, cwd=Path.cwd()).returncode
        ok = finished(item.run_dir(cfg), item.job.training.steps)
        status[item.name] = "done" if ok else f"failed (exit {code}; see {logs / (item.name + '.log')})"
        if not ok:
            log(f"wren sweep: {item.name} failed (exit {code}); see {logs / (item.name + '.log')}")
    return status


def write_slurm_array(cfg: SweepConfig, runs: list[Planned]) -> Path:
    """A SLURM array script: task i reads run i's arguments (NUL-separated) and calls train.sh."""
    args_dir = cfg.directory / "slurm" / "args"
    shutil.rmtree(args_dir, ignore_errors=True)
    args_dir.mkdir(parents=True)
    for index, item in enumerate(runs):
        (args_dir / f"{index}.args").write_bytes(b"\0".join(a.encode() for a in train_args(cfg, item.run, item.name)) + b"\0")
    (cfg.directory / "slurm" / "runs.txt").write_text("".join(f"{i}\t{item.name}\n" for i, item in enumerate(runs)))
    script = cfg.directory / "slurm" / "array.sbatch"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"# wren sweep '{cfg.name}': one array task per unfinished run (see runs.txt); generated by `wren sweep`.\n"
        f"#SBATCH --job-name=wren-sweep-{cfg.name}\n"
        f"#SBATCH --array=0-{len(runs) - 1}\n"
        "#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=1\n#SBATCH --requeue\n#SBATCH --signal=B:USR1@120\n"
        f"#SBATCH --output={cfg.directory.resolve()}/logs/slurm-%A_%a.out\n"
        "set -euo pipefail\n"
        f"mapfile -d '' args < \"{args_dir.resolve()}/$SLURM_ARRAY_TASK_ID.args\"\n"
        f"cd \"{Path.cwd().resolve()}\"\n"
        f"exec bash \"{TRAIN_SH}\" --launcher slurm --nproc {cfg.nproc} -- \"${{args[@]}}\"\n"
    )
    (cfg.directory / "logs").mkdir(parents=True, exist_ok=True)
    return script


def submit_slurm(script: Path, runs: list[Planned], log) -> dict[str, str]:
    """Submit the array with sbatch when it is available; otherwise say how to."""
    if shutil.which("sbatch") is None:
        log(f"wren sweep: sbatch not found; submit the array yourself: sbatch {script}")
        return {item.name: "not submitted (no sbatch)" for item in runs}
    result = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SweepError(f"sbatch {script} failed: {result.stderr.strip()}")
    log(f"wren sweep: {result.stdout.strip()}; run `wren sweep` again when the array is done to collect the results")
    return {item.name: "submitted" for item in runs}


def collect(cfg: SweepConfig, runs: list[Planned], status: dict[str, str]) -> list[dict[str, Any]]:
    """One row per run: its varying values, N, D, lr, batch and final losses; written as CSV and JSONL."""
    from optim.hparams import count_non_embedding

    rows = []
    for item in runs:
        job = item.job
        metrics = final_metrics(item.run_dir(cfg), job.training.steps)
        tokens = job.training.steps * job.training.global_batch_size * job.training.seq_len
        params = count_non_embedding(job.model.build_model_config(job.data.vocab_size))
        rows.append({
            "run": item.name,
            **{key: item.run.get(key) for key in cfg.varied},
            "N": params,
            "D": tokens,
            "C": 6 * params * tokens,
            "lr": job.optimizer.lr,
            "batch_sequences": job.training.global_batch_size,
            "batch_tokens": job.training.global_batch_size * job.training.seq_len,
            "final_eval_loss": metrics.get("eval/loss", math.nan),
            "final_train_loss": metrics.get("train/loss", math.nan),
            "status": status.get(item.name, "done" if "eval/loss" in metrics else "not finished"),
        })
    cfg.directory.mkdir(parents=True, exist_ok=True)
    with open(cfg.directory / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (cfg.directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep TOML file ([sweep] + [grid] or [[runs]])")
    p.add_argument("--launcher", choices=LAUNCHERS, default=None, help="override the sweep file's launcher")
    p.add_argument("--dry-run", action="store_true", help="print each run's launch command and exit")
    p.add_argument("--collect-only", action="store_true", help="launch nothing; collect, fit and report what has finished")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Plan, launch (skipping finished runs), collect, fit and report."""
    if extra:
        raise SweepError(f"sweep: unexpected arguments {' '.join(extra)}")
    cfg = load_sweep(args.sweep, args.launcher)
    runs = plan(cfg)
    print(f"wren sweep: {cfg.name}: {len(runs)} runs over {', '.join(cfg.varied) or 'nothing'}; launcher {cfg.launcher}")
    if args.dry_run:
        for item in runs:
            print(" ".join(launch_command(cfg, train_args(cfg, item.run, item.name))))
        return 0
    status = {} if args.collect_only else execute(cfg, runs)
    rows = collect(cfg, runs, status)
    report = write_report(cfg, rows)
    done = sum(math.isfinite(r["final_eval_loss"]) for r in rows)
    print(f"wren sweep: {done}/{len(rows)} runs finished; results {cfg.directory / 'results.csv'}; report {report}")
    failed = [r["run"] for r in rows if r["status"].startswith("failed")]
    return 1 if failed else 0



# --- analysis: optimal lr per group, Step-Law and loss-vs-compute fits, plots, report -----------


def _series_key(cfg: SweepConfig, row: dict[str, Any]) -> str:
    """The row's values of the varied keys that are not size, lr, batch or steps (e.g. mup.enabled)."""
    keys = [k for k in cfg.varied if not SIZE_KEYS.match(k) and k not in (LR_KEY, BATCH_KEY, "training.steps")]
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all runs"


def analyse(cfg: SweepConfig, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per series: the optimal lr of every (N, D, batch) group and the fits that the data allow."""
    from optim.fits import (
        optimum_in_log,
    )

    done = [r for r in rows if math.isfinite(r["final_eval_loss"])]
    result: dict[str, dict[str, Any]] = {}
    for series in dict.fromkeys(_series_key(cfg, r) for r in rows):
        members = [r for r in done if _series_key(cfg, r) == series]
        groups: dict[tuple, list] = {}
        for r in members:
            groups.setdefault((r["N"], r["D"], r["batch_tokens"]), []).append(r)
        optima = []
        for (N, D, batch), group in sorted(groups.items()):
            if len({r["lr"] for r in group}) < 2:
                continue
            best = optimum_in_log([r["lr"] for r in group], [r["final_eval_loss"] for r in group])
            optima.append({"N": N, "D": D, "batch_tokens": batch, "lr_opt": best.x, "loss": best.loss, "at_edge": best.at_edge,
                           "curve": sorted((r["lr"], r["final_eval_loss"]) for r in group)})
        entry: dict[str, Any] = {"optima": optima}
        if len({o["N"] for o in optima}) >= 2:
            lrs = [o["lr_opt"] for o in optima]
            entry["lr_spread_log2"] = math.log2(max(lrs) / min(lrs))
        if len(optima) >= 3 and len({(o["N"], o["D"]) for o in optima}) >= 3:
            entry["lr_law"] = _step_law_with_ci(optima, "lr_opt", cfg.bootstrap_samples)
        batch_optima = _batch_optima(members)
        if batch_optima:
            entry["batch_optima"] = batch_optima
        if len({(o["N"], o["D"]) for o in batch_optima}) >= 3:
            entry["batch_law"] = _step_law_with_ci(batch_optima, "batch_opt", cfg.bootstrap_samples)
        frontier: dict[tuple, float] = {}
        for r in members:
            key = (r["N"], r["D"])
            frontier[key] = min(frontier.get(key, math.inf), r["final_eval_loss"])
        if len(frontier) >= 4:  # three parameters: at least one degree of freedom left
            C = np.array([6 * n * d for n, d in frontier], dtype=float)
            L = np.array(list(frontier.values()))
            try:
                entry["loss_law"] = _loss_law_with_ci(C, L, cfg.bootstrap_samples)
            except ValueError:
                pass
        result[series] = entry
    return result


def _step_law_with_ci(optima: list[dict[str, Any]], key: str, samples: int) -> dict[str, Any]:
    """`key` = c N^a D^b over the optima, with bootstrap intervals of a and b."""
    from optim.fits import bootstrap, fit_step_law

    N, D, y = (np.array([o[k] for o in optima], dtype=float) for k in ("N", "D", key))

    def refit(i: np.ndarray) -> dict[str, float | None]:
        fit = fit_step_law(N[i], D[i], y[i])
        return {"a": fit.a, "b": fit.b}

    return {"fit": fit_step_law(N, D, y), "ci": bootstrap(refit, len(y), samples=samples)}


def _loss_law_with_ci(C: np.ndarray, L: np.ndarray, samples: int) -> dict[str, Any]:
    """L = E + A C^-alpha over the frontier points, with a bootstrap interval of alpha."""
    from optim.fits import bootstrap, fit_saturating_power_law

    def refit(i: np.ndarray) -> dict[str, float]:
        return {"alpha": fit_saturating_power_law(C[i], L[i]).alpha}

    return {"fit": fit_saturating_power_law(C, L), "ci": bootstrap(refit, len(L), samples=samples),
            "points": list(zip(C.tolist(), L.tolist(), strict=True))}


def _batch_optima(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (N, D) with several batch sizes: the optimal batch (tokens) over each batch's best lr."""
    from optim.fits import optimum_in_log

    by_size: dict[tuple, dict[int, float]] = {}
    for r in members:
        best = by_size.setdefault((r["N"], r["D"]), {})
        best[r["batch_tokens"]] = min(best.get(r["batch_tokens"], math.inf), r["final_eval_loss"])
    optima = []
    for (N, D), curve in sorted(by_size.items()):
        if len(curve) >= 2:
            best = optimum_in_log(list(curve), list(curve.values()))
            optima.append({"N": N, "D": D, "batch_opt": best.x, "loss": best.loss, "at_edge": best.at_edge})
    return optima


def _plots(cfg: SweepConfig, analysis: dict[str, dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for stale in ("loss_vs_lr.png", "loss_vs_compute.png"):
        (cfg.directory / stale).unlink(missing_ok=True)
    series = [s for s in analysis if analysis[s]["optima"]]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 3.6), dpi=110, squeeze=False, sharey=True)
        for ax, name in zip(axes[0], series):
            for o in analysis[name]["optima"]:
                xs, ys = zip(*o["curve"])
                line, = ax.plot(xs, ys, marker="o", markersize=3, label=f"N={o['N']:.3g}, D={o['D']:.3g}")
                ax.axvline(o["lr_opt"], color=line.get_color(), linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("peak lr")
            ax.set_title(name, fontsize=9)
            ax.grid(alpha=0.3)
            if len(analysis[name]["optima"]) <= 12:
                ax.legend(fontsize=6)
        axes[0][0].set_ylabel("final eval loss")
        fig.tight_layout()
        out.append(cfg.directory / "loss_vs_lr.png")
        fig.savefig(out[-1])
        plt.close(fig)
    laws = [s for s in analysis if "loss_law" in analysis[s]]
    if laws:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
        for name in laws:
            law = analysis[name]["loss_law"]
            C, L = zip(*sorted(law["points"]))
            dots, = ax.plot(C, L, "o", label=name)
            grid = np.logspace(math.log10(min(C)), math.log10(max(C)), 50)
            fit = law["fit"]
            ax.plot(grid, fit(grid), color=dots.get_color(), label=f"E + A C^-{fit.alpha:.3f}, E={fit.E:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("compute C = 6 N D (FLOPs)")
        ax.set_ylabel("best final eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(cfg.directory / "loss_vs_compute.png")
        fig.savefig(out[-1])
        plt.close(fig)
    return out


def _fmt_ci(ci: dict, key: str) -> str:
    return f" [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else ""


def write_report(cfg: SweepConfig, rows: list[dict[str, Any]]) -> Path:
    """Analyse the results and write `report.md` (tables, fits with 95 % bootstrap CIs, plots)."""
    analysis = analyse(cfg, rows)
    cfg.directory.mkdir(parents=True, exist_ok=True)
    plots = _plots(cfg, analysis)
    lines = [f"# Sweep `{cfg.name}`", "", f"Base recipe `{cfg.config}`, {len(rows)} runs, launcher `{cfg.launcher}`; "
             f"common overrides: {json.dumps(cfg.overrides)}.", "", "## Runs", ""]
    keys = cfg.varied
    lines += ["| run | " + " | ".join(keys) + " | N (non-emb.) | D tokens | final eval loss | status |",
              "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        values = " | ".join(str(r[k]) for k in keys)
        lines.append(f"| {r['run']} | {values} | {r['N']:,} | {r['D']:,} | {r['final_eval_loss']:.4f} | {r['status']} |")
    lines += ["", "## Optimal learning rate", "",
              "Per (N, D, batch): the minimiser of a parabola in log lr through the best run and its neighbours "
              "(`edge`: the best run is at the end of the lr grid, so the optimum may lie outside it).", ""]
    for name, entry in analysis.items():
        lines += [f"### {name}", "", "| N | D | batch tokens | lr_opt | loss at lr_opt | |", "|---|---|---|---|---|---|"]
        for o in entry["optima"]:
            lines.append(f"| {o['N']:,} | {o['D']:,} | {o['batch_tokens']} | {o['lr_opt']:.3g} | {o['loss']:.4f} | "
                         f"{'edge' if o['at_edge'] else ''} |")
        if "lr_spread_log2" in entry:
            lines += ["", f"Spread of lr_opt across model sizes: {entry['lr_spread_log2']:.2f} octaves "
                          f"(x{2 ** entry['lr_spread_log2']:.2f}); 0 = the optimal lr transfers exactly."]
        if "lr_law" in entry:
            fit, ci = entry["lr_law"]["fit"], entry["lr_law"]["ci"]
            a = "" if fit.a is None else f" N^{fit.a:.3f}{_fmt_ci(ci, 'a')}"
            b = "" if fit.b is None else f" D^{fit.b:.3f}{_fmt_ci(ci, 'b')}"
            lines += ["", f"Step-Law form: lr_opt = {fit.c:.4g}{a}{b} (rms log residual {fit.rmse_log:.3f}; "
                          f"95 % bootstrap CIs in brackets)."]
        for o in entry.get("batch_optima", []):
            lines.append(f"- optimal batch at N = {o['N']:,}, D = {o['D']:,}: {o['batch_opt']:.4g} tokens"
                         f"{' (edge)' if o['at_edge'] else ''}")
        if "batch_law" in entry:
            fit, ci = entry["batch_law"]["fit"], entry["batch_law"]["ci"]
            a = "" if fit.a is None else f" N^{fit.a:.3f}{_fmt_ci(ci, 'a')}"
            b = "" if fit.b is None else f" D^{fit.b:.3f}{_fmt_ci(ci, 'b')}"
            lines += ["", f"Step-Law form: B_opt = {fit.c:.4g}{a}{b} tokens (rms log residual {fit.rmse_log:.3f})."]
        if "loss_law" in entry:
            fit, ci = entry["loss_law"]["fit"], entry["loss_law"]["ci"]
            lines += ["", f"Loss vs compute: L = {fit.E:.3f} + {fit.A:.4g} C^-{fit.alpha:.3f}{_fmt_ci(ci, 'alpha')} "
                          f"(rmse {fit.rmse:.4f})."]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = cfg.directory / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
