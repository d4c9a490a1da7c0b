"""The packed token shard: a directory of documents' token ids, concatenated, memory-mapped to read.

Layout (documented for users in docs/data.md):

    tokens.bin       raw little-endian uint16 ids (uint32 when vocab_size > 65536), all documents
                     concatenated in order
    doc_offsets.npy  int64 start offset of each document in tokens.bin (`np.save` format)
    index.json       {"format": "wren-token-shard", "version": 1, "dtype": "uint16" | "uint32",
                      "num_tokens": int, "num_documents": int, "vocab_size": int}

`prepare_data` ends every document with the tokenizer's EOS id; the shard itself stores whatever
arrays it is given, one document each.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SHARD_FORMAT = "wren-token-shard"
SHARD_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "doc_offsets.npy"
INDEX_FILE = "index.json"

# Storage dtype by name; a shard uses the narrowest one that holds every id below vocab_size.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_name_for(vocab_size: int) -> str:
    """Name of the narrowest `DTYPES` entry holding ids `0 .. vocab_size - 1`."""
    for name, dtype in DTYPES.items():
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return name
    raise ValueError(f"vocab_size: {vocab_size} does not fit in uint32 token ids")


def write_shard(path: Path, token_arrays: Iterable[np.ndarray], vocab_size: int) -> "TokenShard":
    """Write one shard directory at `path`, one document per array, streaming to disk.

    Each array must be 1-D with integer ids in `[0, vocab_size)`; it is written as soon as it
    arrives, so only one document is held at a time. `index.json` is written last. Returns the
    shard opened for reading.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype_name = dtype_name_for(vocab_size)
    dtype = DTYPES[dtype_name]
    offsets: list[int] = []
    num_tokens = 0
    with open(path / TOKENS_FILE, "wb") as tokens_file:
        for document_index, array in enumerate(token_arrays):
            ids = np.asarray(array)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(
                    f"document {document_index}: expected a 1-D integer array, "
                    f"got shape {ids.shape} of {ids.dtype}"
                )
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(
                    f"document {document_index}: token ids must lie in [0, {vocab_size}), "
                    f"found {ids.min()}..{ids.max()}"
                )
            offsets.append(num_tokens)
            ids.astype(dtype, copy=False).tofile(tokens_file)
            num_tokens += ids.size
    np.save(path / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    index = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "dtype": dtype_name,
        "num_tokens": num_tokens,
        "num_documents": len(offsets),
        "vocab_size": vocab_size,
    }
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return TokenShard(path)


def _read_index(index_path: Path) -> dict:
    """Parse and check `index.json`; `ValueError` names the file and the problem."""
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{index_path}: missing; not a token shard") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{index_path}: unreadable shard index: {err}") from err
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise ValueError(f"{index_path}: format is not {SHARD_FORMAT!r}")
    if index.get("version") != SHARD_VERSION:
        raise ValueError(
            f"{index_path}: version {index.get('version')!r} is not supported "
            f"(this wren reads version {SHARD_VERSION})"
        )
    if index.get("dtype") not in DTYPES:
        raise ValueError(f"{index_path}: dtype {index.get('dtype')!r} is not one of {list(DTYPES)}")
    for key in ("num_tokens", "num_documents", "vocab_size"):
        value = index.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{index_path}: {key} must be a non-negative integer, got {value!r}")
    return index


def _read_offsets(offsets_path: Path, num_documents: int, num_tokens: int) -> np.ndarray:
    """Load and check `doc_offsets.npy` against the index; `ValueError` names the file."""
    try:
        offsets = np.load(offsets_path, allow_pickle=False)
    except FileNotFoundError as err:
        raise ValueError(f"{offsets_path}: missing") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"{offsets_path}: unreadable: {err}") from err
    if offsets.dtype != np.int64 or offsets.shape != (num_documents,):
        raise ValueError(
            f"{offsets_path}: expected {num_documents} int64 offsets, "
            f"got shape {offsets.shape} of {offsets.dtype}"
        )
    if num_documents and (
        offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] > num_tokens
    ):
        raise ValueError(
            f"{offsets_path}: offsets must start at 0, never decrease and stay within "
            f"{num_tokens} tokens"
        )
    return offsets


class TokenShard:
    """A shard directory opened read-only; `tokens` is a memory map, nothing is read eagerly.

    Raises `ValueError` naming the file when the shard is incomplete or inconsistent (missing
    file, wrong format or version, `tokens.bin` size not `num_tokens` x item size, bad offsets).
    Token ids are not scanned against `vocab_size`: that would read the whole shard.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = _read_index(self.path / INDEX_FILE)
        self.dtype = DTYPES[index["dtype"]]
        self.num_tokens: int = index["num_tokens"]
        self.num_documents: int = index["num_documents"]
        self.vocab_size: int = index["vocab_size"]
        tokens_path = self.path / TOKENS_FILE
        if not tokens_path.is_file():
            raise ValueError(f"{tokens_path}: missing")
        expected_bytes = self.num_tokens * self.dtype.itemsize
        actual_bytes = tokens_path.stat().st_size
        if actual_bytes != expected_bytes:
            raise ValueError(
                f"{tokens_path}: {actual_bytes} bytes, expected {expected_bytes} "
                f"({self.num_tokens} tokens x {self.dtype.itemsize} bytes); the shard is corrupt"
            )
        self.doc_offsets = _read_offsets(
            self.path / OFFSETS_FILE, self.num_documents, self.num_tokens
        )
        # np.memmap cannot map an empty file; an empty shard gets an empty array instead.
        self.tokens: np.ndarray = (
            np.memmap(tokens_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
            if self.num_tokens
            else np.empty(0, dtype=self.dtype)
        )

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i` (a read-only view into the memory map)."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range for {self.num_documents} documents")
        end = self.doc_offsets[i + 1] if i + 1 < self.num_documents else self.num_tokens
        return self.tokens[self.doc_offsets[i] : end]

    def __repr__(self) -> str:
        return (
            f"TokenShard({str(self.path)!r}, num_tokens={self.num_tokens}, "
            f"num_documents={self.num_documents}, vocab_size={self.vocab_size})"
        )
