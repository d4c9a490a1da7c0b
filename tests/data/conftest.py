"""Fixtures for the data tests: small synthetic code corpora and a tokenizer trained on one."""

import random
from pathlib import Path

import pytest

from data.tokenizer import Tokenizer, train_tokenizer

SMALL_VOCAB_SIZE = 400


def synthetic_module(rng: random.Random, index: int) -> str:
    """A small Python-like module with indentation, tabs, digits and a per-document identifier."""
    words = ["value", "count", "items", "result", "name", "index", "total", "buffer", "state"]
    lines = [f'"""Module {index}: generated for the data tests."""', ""]
    for function in range(rng.randint(3, 6)):
        args = ", ".join(rng.sample(words, 2))
        lines.append(f"def doc{index}_func{function}({args}):")
        for _ in range(rng.randint(2, 5)):
            lhs, rhs = rng.sample(words, 2)
            lines.append(f"    {lhs} = {rhs} + {rng.randint(0, 999)}  # update {lhs}")
        lines.append("        if total:\n\t\treturn   result")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_corpus(directory: Path, num_documents: int, seed: int = 0) -> list[str]:
    """Write `num_documents` synthetic modules as files under `directory`; return their texts."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    texts = []
    for index in range(num_documents):
        text = synthetic_module(rng, index)
        (directory / f"module_{index:03d}.py").write_text(text)
        texts.append(text)
    return texts


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    """A SMALL_VOCAB_SIZE-piece tokenizer trained on 40 synthetic modules."""
    directory = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(1)
    texts = [synthetic_module(rng, index) for index in range(40)]
    return Tokenizer.load(train_tokenizer(texts, SMALL_VOCAB_SIZE, directory / "tok"))


@pytest.fixture
def make_corpus():
    """`write_corpus(directory, num_documents, seed=0) -> texts`, for tests that need files."""
    return write_corpus
