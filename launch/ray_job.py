"""Run wren under Ray Train: one `TorchTrainer` worker per rank, wren's own checkpoints and resume.

    python -m launch.ray_job [--num-workers N] [--max-failures F] [--address ADDR] -- CONFIG [--section.key=value ...]

(`launch/train.sh --launcher ray` builds this command, and submits it with `ray job submit` when
given `--address`.) Every worker runs the trainer on the process group Ray Train set up. Ray's
experiment directory is the wren run directory, so the checkpoints wren writes there are the ones
Ray registers (reported without a copy, `CheckpointUploadMode.NO_UPLOAD`), and when a worker dies,
Ray restarts the worker group (`FailureConfig(max_failures)`) and the trainer resumes from the
run's latest checkpoint exactly as a rerun on the command line would. Metrics (train loss, lr, grad
norm, tokens) are reported to Ray every `metrics.log_every_steps` steps and with each checkpoint. Relative paths in the config resolve against
the submitting directory (`--chdir`), which all nodes must see (a shared filesystem), as they must
see the run directory.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from trainer.errors import UserError

# What goes to Ray from each step's result (`trainer.train.StepResult` field -> metric name).
REPORTED_FIELDS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split `argv` at `--`: launcher options before it, the config and overrides after it."""
    if "--" in argv:
        at = argv.index("--")
        own, trainer_args = argv[:at], argv[at + 1 :]
    else:
        own, trainer_args = argv, []
    parser = argparse.ArgumentParser(prog="python -m launch.ray_job", description=__doc__.splitlines()[0])
    parser.add_argument("--num-workers", type=int, default=1, help="training processes (ranks)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker")
    parser.add_argument(
        "--use-gpu", choices=("auto", "yes", "no"), default="auto", help="one GPU per worker (auto: when the cluster has GPUs)"
    )
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts after a failure")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    parser.add_argument("--chdir", default=None, help="directory that relative config paths resolve against")
    args = parser.parse_args(own)
    if args.num_workers < 1:
        parser.error(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.max_failures < 0:
        parser.error(f"--max-failures must be 0 or positive, got {args.max_failures}")
    if args.cpus_per_worker <= 0:
        parser.error(f"--cpus-per-worker must be positive, got {args.cpus_per_worker}")
    if not trainer_args:
        parser.error("give the config and overrides after `--`")
    return args, trainer_args


def _engine_class(engine: str) -> type:
    from trainer.config import ENGINES

    module_name, class_name = ENGINES[engine].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def reporting_trainer(base: type) -> type:
    """`base` (a wren trainer class) that also reports each step's metrics and each checkpoint to Ray."""

    class RayReportingTrainer(base):
        def train_step(self, batch):
            result = super().train_step(batch)
            self._ray_metrics = {
                "step": self.progress.step,
                "data/tokens_consumed": self.loader.tokens_consumed,
                **{name: getattr(result, field) for field, name in REPORTED_FIELDS.items()},
            }
            step = self.progress.step
            if step % self.cfg.metrics.log_every_steps == 0 or step == self.cfg.training.steps:
                _report(self._ray_metrics, None)  # a barrier over workers: as often as the console line
            return result

        def save_checkpoint(self):
            path = super().save_checkpoint()
            _report(getattr(self, "_ray_metrics", {"step": self.progress.step}), path if self.env.is_main else None)
            return path

    RayReportingTrainer.__name__ = RayReportingTrainer.__qualname__ = f"RayReporting{base.__name__}"
    return RayReportingTrainer


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    """`ray.train.report` on every rank (it is a barrier); rank 0 names the wren checkpoint in place."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = Checkpoint.from_directory(str(Path(checkpoint_dir).resolve())) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The body of each Ray Train worker: load the config, join Ray's process group, train."""
    import ray.train

    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, shutdown_distributed

    os.chdir(loop_config["cwd"])
    world_size = ray.train.get_context().get_world_size()
    cfg = JobConfig.load(loop_config["config"], loop_config["overrides"], world_size=world_size)
    env = init_distributed(cfg.parallel)  # Ray Train has initialised the process group: joined as is
    try:
        reporting_trainer(_engine_class(cfg.parallel.engine))(cfg, env).fit()
    finally:
        shutdown_distributed()


def _split_config(trainer_args: list[str]) -> tuple[str | None, list[str]]:
    """The config path (first argument unless it is an override) and the overrides."""
    if trainer_args and not trainer_args[0].startswith("--"):
        return trainer_args[0], trainer_args[1:]
    return None, trainer_args


def run(argv: list[str]) -> int:
    """Validate the config here, then train it on a Ray cluster; returns the exit code."""
    args, trainer_args = parse_args(argv)
    if args.chdir:
        os.chdir(args.chdir)
    config_path, overrides = _split_config(trainer_args)
    from trainer.config import JobConfig

    cfg = JobConfig.load(config_path, overrides, world_size=args.num_workers)  # user errors surface here, once
    run_dir = cfg.run.run_dir.resolve()

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # a private single-machine cluster for this run, on the loopback interface
        cpus = max(os.cpu_count() or 1, int(args.num_workers * args.cpus_per_worker + 0.999))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    use_gpu = args.use_gpu == "yes" or (args.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    print(f"wren: Ray Train with {args.num_workers} worker(s) ({resources}), max_failures {args.max_failures}, run {run_dir}", flush=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cwd": os.getcwd(), "config": config_path, "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint else "none"
    print(f"wren: Ray Train finished; last checkpoint {checkpoint}; metrics {result.metrics}", flush=True)
    return 0


def main() -> int:
    """Entry point: one-line errors for user mistakes, Ray's own report for training failures."""
    try:
        return run(sys.argv[1:])
    except UserError as err:
        print(f"wren: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
