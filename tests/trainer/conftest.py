"""Fixtures for trainer tests: one real corpus and one data cache per session."""

from pathlib import Path

import pytest

from tests.trainer.jobs import make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")
