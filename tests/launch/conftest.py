"""Fixtures for launcher tests: real SLURM and Ray clusters (the corpus comes from tests/conftest.py)."""

from tests.launch.ray_cluster import ray_cluster  # noqa: F401  (fixture: a local Ray head node)
from tests.launch.slurm_cluster import slurm  # noqa: F401  (fixture: a single-node SLURM cluster)
