"""Checkpoints with torch.distributed.checkpoint (DCP): complete before latest, resharded on load.

Layout under `<run_dir>/checkpoints/`:

    step_00000100/   a DCP checkpoint (one .distcp file per rank that held data, plus .metadata)
    latest           a text file naming the newest complete step directory

A save writes `step_N.tmp/`, waits for every rank, renames it to `step_N/`, and only then rewrites
`latest` (atomically, through a temporary file). A kill at any moment leaves the previous `latest`
valid. Every entry in the checkpoint is a tensor, so loading reads no pickled objects; DCP's own
`.metadata` index is a pickle, which `SafeFileSystemReader` reads with an allowlist of DCP's
metadata classes so that a tampered checkpoint cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from trainer.distributed import DistEnv
from trainer.errors import UserError

# Single-process saves and loads are intended; DCP warns about them on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"
STEP_PREFIX = "step_"

# DCP metadata classes and plain torch values a `.metadata` pickle may contain; nothing callable
# beyond these constructors is ever resolved while reading it.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which wren does not load")


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader, reading `.metadata` with an allowlist instead of plain pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint '{self.path}' has no .metadata file (incomplete?)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"checkpoint metadata '{path}' is unreadable: {err}") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint metadata '{path}' is not DCP metadata")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class Checkpointer:
    """Saves and restores a dict of Stateful parts under one directory, keeping the last K."""

    def __init__(self, directory: Path, *, keep_last: int, env: DistEnv):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.env = env

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        marker = self.directory / LATEST
        if not marker.is_file():
            return None
        path = self.directory / marker.read_text().strip()
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"'{marker}' names '{path}', which is not a complete checkpoint")
        return path

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` (Stateful parts or tensors) as step `step`, then mark it latest."""
        final = self.directory / f"{STEP_PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.env.barrier()
        dcp.save(state, storage_writer=FileSystemWriter(tmp, sync_files=True))
        self.env.barrier()
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            _atomic_write(self.directory / LATEST, final.name + "\n")
            self._prune(keep=final)
        self.env.barrier()
        return final

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Load checkpoint `path` into `state` in place (resharding to this world size)."""
        self.load_into(path, state)

    @staticmethod
    def load_into(path: Path, state: dict[str, Any]) -> None:
        """Load checkpoint `path` into `state` in place; `state` may hold a subset of its entries."""
        if not (Path(path) / ".metadata").is_file():
            raise CheckpointError(f"'{path}' is not a complete checkpoint (no .metadata)")
        reader = SafeFileSystemReader(path)
        reader.read_metadata()  # fails here, with a clear message, on unreadable or unsafe metadata
        try:
            dcp.load(state, storage_reader=reader)
        except CheckpointException as err:  # DCP wraps per-rank failures
            causes = "; ".join(_first_line(exc) for exc, _ in err.failures.values())
            raise CheckpointError(f"cannot load checkpoint '{path}': {causes}") from None
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot load checkpoint '{path}': {_first_line(err)}") from None

    def _prune(self, keep: Path) -> None:
        steps = sorted(p for p in self.directory.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
