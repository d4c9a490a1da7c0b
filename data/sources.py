"""Corpus sources: a registry of document readers, each yielding `(doc_id, text)` in a fixed order.

A source also describes its inputs cheaply (names, sizes, modification times) so that
`prepare_data` can fingerprint the corpus without reading it.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data.config import DataConfig

Document = tuple[str, str]

# The stdlib source leaves out the test suites (`test`, `tests`) and IDLE: they are two thirds of
# the bytes (about 21 of 34 MB on CPython 3.11), dominated by repetitive test code, and `test/`
# holds files that are deliberately not valid UTF-8. Without them the corpus is about 11 MB of
# library code, which keeps a cold `prepare_data` well under a minute on two cores.
STDLIB_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
HF_BATCH_ROWS = 1024  # rows read from a Hugging Face dataset per Arrow batch


class CorpusSource(ABC):
    """One way of reading a corpus; registered in `SOURCES` under its name."""

    @abstractmethod
    def check_paths(self, paths: list[str]) -> None:
        """Raise `ValueError("paths: ...")` unless `paths` suits this source (without reading)."""

    @abstractmethod
    def describe_inputs(self, cfg: DataConfig) -> list[list[str | int]]:
        """Cheap description of the inputs (names, sizes, mtimes) for the cache fingerprint."""

    @abstractmethod
    def documents(self, cfg: DataConfig) -> Iterator[Document]:
        """Yield `(doc_id, text)` pairs in a deterministic order."""


SOURCES: dict[str, CorpusSource] = {}


def register_source(name: str):
    """Class decorator adding an instance of the decorated `CorpusSource` to `SOURCES`."""

    def add(cls: type[CorpusSource]) -> type[CorpusSource]:
        SOURCES[name] = cls()
        return cls

    return add


def read_text_file(path: Path) -> str:
    """Read a file as UTF-8 exactly (no newline translation); `ValueError` names the file."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ValueError(f"{path}: cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from err


def _walk(directory: Path, skip_dir: Callable[[str], bool]) -> list[Path]:
    """Regular files under `directory`, sorted, not descending into directories `skip_dir` names."""
    found: list[Path] = []
    for parent, dir_names, file_names in os.walk(directory):
        dir_names[:] = [name for name in dir_names if not skip_dir(name)]
        found.extend(Path(parent, name) for name in file_names)
    return sorted(path for path in found if path.is_file())


def _visible_files(directory: Path) -> list[Path]:
    """Regular files under `directory`, recursively and sorted, skipping hidden files and dirs."""
    return [p for p in _walk(directory, _is_hidden) if not _is_hidden(p.name)]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _stat_lines(files: list[Path]) -> list[list[str | int]]:
    lines: list[list[str | int]] = []
    for path in files:
        stat = path.stat()
        lines.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return lines


def _check_existing(paths: list[str]) -> None:
    if not paths:
        raise ValueError("paths: must list at least one file or directory for this source")
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"paths: {path!r} does not exist")


class _FileSource(CorpusSource):
    """Shared by sources reading files: a directory stands for the matching files beneath it."""

    def matches(self, path: Path) -> bool:
        """Whether a file found inside a directory belongs to this source."""
        return True

    def files(self, cfg: DataConfig) -> list[Path]:
        """The input files, in the order their documents are yielded."""
        files: list[Path] = []
        for entry in map(Path, cfg.paths):
            if entry.is_dir():
                files.extend(p for p in _visible_files(entry) if self.matches(p))
            else:
                files.append(entry)
        return files

    def check_paths(self, paths: list[str]) -> None:
        _check_existing(paths)

    def describe_inputs(self, cfg: DataConfig) -> list[list[str | int]]:
        return _stat_lines(self.files(cfg))


@register_source("stdlib")
class StdlibSource(CorpusSource):
    """The running Python's standard library `.py` files, one document per file."""

    def root(self) -> Path:
        """The standard library directory of the running interpreter."""
        return Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[Path]:
        """The `.py` files used, sorted, without the trees in `STDLIB_SKIPPED_DIRS`."""
        files = _walk(self.root(), STDLIB_SKIPPED_DIRS.__contains__)
        return [path for path in files if path.suffix == ".py"]

    def check_paths(self, paths: list[str]) -> None:
        if paths:
            raise ValueError(f"paths: must be empty for source 'stdlib', got {paths!r}")

    def describe_inputs(self, cfg: DataConfig) -> list[list[str | int]]:
        root = self.root()
        return [[sys.version]] + [
            [str(p.relative_to(root)), p.stat().st_size] for p in self.files()
        ]

    def documents(self, cfg: DataConfig) -> Iterator[Document]:
        root = self.root()
        for path in self.files():
            yield str(path.relative_to(root)), read_text_file(path)


@register_source("text")
class TextSource(_FileSource):
    """Plain UTF-8 files: each file is one document; directories contribute every visible file."""

    def documents(self, cfg: DataConfig) -> Iterator[Document]:
        for path in self.files(cfg):
            yield str(path), read_text_file(path)


@register_source("jsonl")
class JsonlSource(_FileSource):
    """JSON Lines files: one document per non-blank line, its text under `cfg.text_field`.

    Directories contribute their `*.jsonl` files.
    """

    def matches(self, path: Path) -> bool:
        return path.suffix == ".jsonl"

    def documents(self, cfg: DataConfig) -> Iterator[Document]:
        for path in self.files(cfg):
            yield from self._read(path, cfg.text_field)

    def _read(self, path: Path, text_field: str) -> Iterator[Document]:
        try:
            with path.open("rb") as lines:
                for line_number, line in enumerate(lines, start=1):
                    if line.strip():
                        text = _jsonl_text(line, text_field, path, line_number)
                        yield f"{path}:{line_number}", text
        except OSError as err:
            raise ValueError(f"{path}: cannot read: {err.strerror or err}") from err


def _jsonl_text(line: bytes, text_field: str, path: Path, line_number: int) -> str:
    where = f"{path}, line {line_number}"
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where}: no {text_field!r} key (text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: {text_field!r} is {type(text).__name__}, expected a string")
    return text


@register_source("hf_dataset")
class HfDatasetSource(CorpusSource):
    """Directories written by `datasets.Dataset.save_to_disk` (of a `DatasetDict`: its "train").

    One document per row, its text in the `cfg.text_field` column.
    """

    def check_paths(self, paths: list[str]) -> None:
        _check_existing(paths)
        for path in paths:
            if not Path(path).is_dir():
                raise ValueError(f"paths: {path!r} is not a directory saved by save_to_disk")

    def describe_inputs(self, cfg: DataConfig) -> list[list[str | int]]:
        return _stat_lines([f for path in cfg.paths for f in _visible_files(Path(path))])

    def documents(self, cfg: DataConfig) -> Iterator[Document]:
        for path in cfg.paths:
            dataset = _load_dataset(path, cfg.text_field)
            batches = dataset.iter(batch_size=HF_BATCH_ROWS)
            texts = (text for batch in batches for text in batch[cfg.text_field])
            for row, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}, row {row}: {cfg.text_field!r} is "
                        f"{type(text).__name__}, expected a string"
                    )
                yield f"{path}[{row}]", text


def _load_dataset(path: str, text_field: str):
    """Load a saved dataset (the "train" split of a DatasetDict) keeping only `text_field`."""
    import datasets  # imported here: it is slow to import and only this source needs it

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a dataset saved by save_to_disk: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path}: DatasetDict has no 'train' split (splits: {list(loaded)})")
        loaded = loaded["train"]
    if text_field not in loaded.column_names:
        raise ValueError(
            f"{path}: no column {text_field!r} (text_field); columns: {loaded.column_names}"
        )
    return loaded.select_columns([text_field])


# Registers the "megatron" source (pre-tokenized Megatron-LM indexed datasets); megatron-core
# itself is imported only when such a dataset is read.
import data.megatron  # noqa: E402,F401
