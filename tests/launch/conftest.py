"""Fixtures for launcher tests: one real corpus and data cache per session, real SLURM and Ray clusters."""

from pathlib import Path

import pytest

from tests.launch.ray_cluster import ray_cluster  # noqa: F401  (fixture: a local Ray head node)
from tests.launch.slurm_cluster import slurm  # noqa: F401  (fixture: a single-node SLURM cluster)
from tests.trainer.jobs import make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")
