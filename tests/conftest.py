"""Shared pytest setup: skip `gpu` tests where no CUDA device is present; one real corpus and one
data cache per session for every test that trains."""

from pathlib import Path

import pytest
import torch

from tests.trainer.jobs import make_corpus


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
