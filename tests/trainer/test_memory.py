"""`wren memory`: the estimate against what real runs hold, term by term, and the CLI surface.

What is compared, per rank 0:
* weights and optimizer state: the bytes the trainer logs (`memory/param_bytes`,
  `memory/optimizer_state_bytes`: local shards of every parameter and optimizer-state tensor);
* gradients: the bytes of the local gradient shards after a real backward;
* activations: the bytes of the distinct storages autograd saves in a real forward + loss of one
  micro-batch, counted here by a hook on real tensors (the estimate traces fake ones).
Peak RSS is not compared: on CPU it includes the Python and torch libraries and the allocator's
caching, which no per-tensor account can predict to 10%.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_on_ranks
from tests.trainer.jobs import tiny_overrides, train_job
from trainer.config import JobConfig
from trainer.memory import estimate_memory
from trainer.metrics import read_metrics

CASES = {
    "adamw": {},
    "galore": dict(optimizer__name="galore", optimizer__galore__rank=8),
    "fira_lowrank": dict(optimizer__name="fira", optimizer__galore__rank=4, optimizer__lowrank__rank=8),
    "sltrain": dict(
        optimizer__name="lowrank",
        optimizer__lowrank__rank=8,
        optimizer__lowrank__sparse_density=0.05,
        optimizer__lowrank__refactor_every_steps=2,
        optimizer__reset_every_steps=2,
    ),
}


def overrides(corpus, cache, root, name, case):
    return tiny_overrides(corpus, cache, root, name, training__steps=5, parallel__num_threads=1, **CASES[case])


def logged_bytes(run_dir) -> dict:
    return next(r for r in read_metrics(run_dir) if "memory/param_bytes" in r)


def measure_grads_and_activations(args: list[str]) -> tuple[int, int]:
    """Build the run's Trainer; return (local gradient bytes, saved activation bytes) of one real step."""
    from trainer.distributed import init_distributed
    from trainer.train import Trainer

    cfg = JobConfig.load(None, args)
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    model, batch = trainer.model, trainer.loader.next_batch()
    params = {p.untyped_storage().data_ptr() for p in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    return grads, sum(saved.values())


def within(estimate: int, measured: int, tolerance: float = 0.10) -> bool:
    return abs(estimate - measured) <= tolerance * measured


@pytest.mark.slow
@pytest.mark.parametrize("case, world", [("adamw", 1), ("galore", 2), ("fira_lowrank", 1), ("sltrain", 2)])
def test_estimate_is_within_10_percent_of_a_short_run(corpus, data_cache, tmp_path, case, world):
    torch.set_num_threads(1)
    args = overrides(corpus, data_cache, tmp_path, case, case)
    estimate = estimate_memory(JobConfig.load(None, args, world_size=world), world)
    if world > 1:
        run_on_ranks(train_job, world, args)
    else:
        train_job(args)
    logged = logged_bytes(tmp_path / case)
    assert within(estimate.weights, logged["memory/param_bytes"]), (estimate.weights, logged)
    assert within(estimate.optimizer, logged["memory/optimizer_state_bytes"]), (estimate.optimizer, logged)

    if world == 1:
        grads, activations = measure_grads_and_activations(
            overrides(corpus, data_cache, tmp_path, case + "_probe", case)
        )
        assert within(estimate.grads, grads), (estimate.grads, grads)
        assert within(estimate.activations, activations), (estimate.activations, activations)
        measured_total = logged["memory/param_bytes"] + logged["memory/optimizer_state_bytes"] + grads + activations
        assert within(estimate.total, measured_total)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", "memory", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_prints_the_table_and_rejects_bad_input():
    done = _cli("configs/llama_small_galore.toml", "--world-size", "2")
    assert done.returncode == 0, done.stderr
    for row in ("weights", "gradients", "optimizer state", "activations", "total"):
        assert row in done.stdout
    bad = _cli("--world-size", "0")
    assert bad.returncode != 0 and "--world-size" in bad.stderr and "Traceback" not in bad.stderr
    bad = _cli("--optimizer.galore.rank=0", "--optimizer.name=galore")
    assert bad.returncode == 2 and "optimizer.galore.rank" in bad.stderr and "Traceback" not in bad.stderr
