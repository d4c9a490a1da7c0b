"""Shared pytest setup: skip `gpu` tests where no CUDA device is present; one real corpus and one
data cache per session for every test that trains, and one uninterrupted single-process reference
run and one two-rank torchrun reference run that the interrupt/resume and launcher tests compare
against, instead of each test training its own."""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.trainer.jobs import losses, make_corpus, tiny_overrides, train_job


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A few standard-library packages copied as a small real-text corpus."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Where prepared data (tokenizer and shards, keyed by fingerprint) is cached for the session."""
    return tmp_path_factory.mktemp("data_cache")


class Reference(NamedTuple):
    """An uninterrupted run: the `tiny_overrides` keywords it used and its step -> train loss."""

    settings: dict[str, object]
    losses: dict[int, float]


@pytest.fixture(scope="session")
def reference(corpus, data_cache, tmp_path_factory) -> Reference:
    """One uninterrupted single-process run, trained once per session in this process, that the
    interrupt/resume tests (preemption, SIGKILL resume, SLURM requeue) compare against. Interrupted
    runs use `settings` plus their own `checkpoint.every_steps`, which leaves the losses unchanged.
    24 steps: a signal sent after step 3 still lands well before the end."""
    settings: dict[str, object] = dict(training__steps=24, parallel__num_threads=1)
    root = tmp_path_factory.mktemp("reference")
    train_job(tiny_overrides(corpus, data_cache, root, "reference", **settings))
    return Reference(settings, losses(root / "reference"))


@pytest.fixture(scope="session")
def reference_2ranks(corpus, data_cache, tmp_path_factory) -> Reference:
    """One uninterrupted two-rank run under torchrun (launch/train.sh --nproc 2), trained once per
    session, that the launcher tests (torchrun restart, Ray, SLURM tasks) compare against. 12 steps:
    a rank killed after step 6 still dies mid-run."""
    settings: dict[str, object] = dict(training__steps=12, parallel__num_threads=1)
    root = tmp_path_factory.mktemp("reference_2ranks")
    overrides = tiny_overrides(corpus, data_cache, root, "reference", **settings)
    train_sh = Path(__file__).resolve().parents[1] / "launch" / "train.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(train_sh), "--nproc", "2", *overrides], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Reference(settings, losses(root / "reference"))
