"""Shared pieces of the fine-tuning end-to-end tests: one pretrained base run per session, a job that
reports what trained, several jobs in one launch of ranks, and a run branched from another run's
checkpoint (a resume test then trains the second half once instead of training the first half again)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tests.trainer.jobs import losses, tiny_overrides, train_job

# (corpus, data cache) -> the base run trained from them; fixtures of several test files share it.
_BASE_RUNS: dict[tuple[str, str], Path] = {}


def pretrained_base(corpus: Path, data_cache: Path, tmp_path_factory) -> Path:
    """A 4-step pretraining run, the checkpoint every fine-tuning test starts from, trained once per
    session (and per corpus and cache) however many test files ask for it."""
    key = (str(corpus), str(data_cache))
    if key not in _BASE_RUNS:
        root = tmp_path_factory.mktemp("base")
        train_job(tiny_overrides(corpus, data_cache, root, "base", training__steps=4))
        _BASE_RUNS[key] = root / "base"
    return _BASE_RUNS[key]


def finetune_job(overrides: list[str], merged: bool = False) -> dict:
    """Train in this process (a rank under the harness); report what trained, the optimizer state,
    the frozen weights (whole tensors) and, if `merged` and the model is unsharded, each PEFT
    module's weight merged by its `unload_peft()`."""
    from trainer.config import JobConfig
    from trainer.distributed import init_distributed, world_size_from_env
    from trainer.train import Trainer

    torch.set_num_threads(1)
    cfg = JobConfig.load(None, overrides, world_size=world_size_from_env())
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    trainer.fit()
    params = dict(trainer.model.named_parameters())

    def full(p):
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy()

    state = trainer.optimizer.state
    report = {
        "with_state": sorted(name for name, p in params.items() if p in state),
        "state_numel": {n: int(state[p]["exp_avg"].numel()) for n, p in params.items() if p in state},
        "trainable": {n: p.numel() for n, p in params.items() if p.requires_grad},
        "frozen": {n: full(p) for n, p in params.items() if not p.requires_grad},
        "merged": {},
    }
    if merged and not any(hasattr(p, "full_tensor") for p in params.values()):
        for name, module in trainer.model.named_modules():
            if hasattr(module, "unload_peft"):
                key = name.replace("_checkpoint_wrapped_module.", "") + ".weight"
                report["merged"][key] = module.unload_peft().weight.detach().numpy()
    return report


def finetune_jobs(jobs: list[list[str]], merged: bool = False) -> list[dict]:
    """`finetune_job` for each override list in turn, in this process: several 2-rank runs in one
    launch of the ranks."""
    return [finetune_job(overrides, merged) for overrides in jobs]


def branch(source: Path, target: Path, step: int) -> None:
    """Start run `target` from run `source`'s step-`step` checkpoint, as if `target` had trained
    `step` steps of the same job and stopped there."""
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / "latest").write_text(name + "\n")


def losses_after(run_dir: Path, step: int) -> dict[int, float]:
    """Step -> train loss of run `run_dir` for the steps after `step`."""
    return {s: loss for s, loss in losses(run_dir).items() if s > step}
