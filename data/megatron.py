"""Megatron-LM indexed datasets (`PREFIX.bin` + `PREFIX.idx`), read and written by megatron-core.

Reading: `data.source = "megatron"` with `data.paths = ["/data/corpus_text_document", ...]` (the
path prefixes Megatron's `preprocess_data.py` wrote, without `.bin`/`.idx`) trains on data
preprocessed for Megatron as it is. Each Megatron *document* becomes one wren document, token ids
unchanged (an end-of-document token is kept if the data has one, never added), then
`prepare_data` splits and packs them like any corpus. The ids only mean something with the
tokenizer that produced them, so `data.tokenizer_path` must name it (a sentencepiece model).

Writing: `write_indexed_dataset(prefix, documents)` writes wren documents (for example a
`TokenShard`'s, see `export_shard`) in Megatron's format for Megatron-LM to train on.

Both directions go through megatron-core's own `IndexedDataset` / `IndexedDatasetBuilder`, an
optional extra (`pip install "wren[megatron]"`), imported only when a Megatron dataset is used.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.shards import TokenShard
from data.sources import CorpusSource, _stat_lines, register_source

if TYPE_CHECKING:
    from data.config import DataConfig

BIN_SUFFIX, IDX_SUFFIX = ".bin", ".idx"


def _indexed_dataset_module():
    """megatron-core's indexed_dataset module, or a one-line error naming the extra."""
    try:
        with warnings.catch_warnings():  # megatron.core warns that Apex / Transformer Engine are absent
            warnings.simplefilter("ignore")
            from megatron.core.datasets import indexed_dataset
    except ImportError as err:
        raise ValueError(f"source: the megatron source needs megatron-core (pip install 'wren[megatron]'): {err}") from None
    return indexed_dataset


def open_indexed_dataset(prefix: str | Path):
    """megatron-core's `IndexedDataset` for `prefix` (memory-mapped); `ValueError` if it is unreadable."""
    module = _indexed_dataset_module()
    prefix = str(prefix)
    if not module.IndexedDataset.exists(prefix):
        raise ValueError(f"paths: {prefix!r} is not a Megatron indexed dataset (needs {prefix}.bin and {prefix}.idx)")
    try:
        return module.IndexedDataset(prefix, multimodal=False, mmap=True)
    except (AssertionError, ValueError, OSError) as err:
        raise ValueError(f"paths: cannot read Megatron dataset {prefix!r}: {err}") from None


def indexed_documents(prefix: str | Path) -> Iterator[np.ndarray]:
    """The documents of a Megatron dataset in order, each its sequences concatenated (int64 ids)."""
    dataset = open_indexed_dataset(prefix)
    bounds = dataset.document_indices
    for first, last in zip(bounds[:-1], bounds[1:]):
        parts = [np.asarray(dataset[int(i)], dtype=np.int64) for i in range(int(first), int(last))]
        yield np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def write_indexed_dataset(prefix: str | Path, documents: Iterable[np.ndarray], vocab_size: int) -> Path:
    """Write `documents` (1-D integer arrays) as `prefix.bin` / `prefix.idx`, one sequence each.

    The token dtype is the narrowest Megatron picks for `vocab_size` (`DType.optimal_dtype`).
    Returns the prefix.
    """
    import torch

    module = _indexed_dataset_module()
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = module.IndexedDatasetBuilder(str(prefix) + BIN_SUFFIX, dtype=module.DType.optimal_dtype(vocab_size))
    for index, document in enumerate(documents):
        ids = np.asarray(document)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"document {index}: expected a 1-D integer array, got shape {ids.shape} of {ids.dtype}")
        builder.add_item(torch.from_numpy(ids.astype(np.int64)))
        builder.end_document()
    builder.finalize(str(prefix) + IDX_SUFFIX)
    return prefix


def export_shard(shard: TokenShard, prefix: str | Path) -> Path:
    """Write a wren token shard as a Megatron indexed dataset, one Megatron document per wren document."""
    documents = (shard.document(i) for i in range(shard.num_documents))
    return write_indexed_dataset(prefix, documents, shard.vocab_size)


@register_source("megatron")
class MegatronSource(CorpusSource):
    """Pre-tokenized documents from Megatron indexed datasets (`paths` are their prefixes)."""

    tokenized = True  # `prepare_data` takes `token_documents` as they are, with the given tokenizer

    def check_paths(self, paths: list[str]) -> None:
        if not paths:
            raise ValueError("paths: the megatron source needs at least one dataset prefix (PREFIX for PREFIX.bin/.idx)")
        for prefix in paths:
            for suffix in (BIN_SUFFIX, IDX_SUFFIX):
                if not Path(prefix + suffix).is_file():
                    raise ValueError(f"paths: {prefix + suffix!r} does not exist (give the prefix, without .bin/.idx)")

    def describe_inputs(self, cfg: DataConfig) -> list[list[str | int]]:
        return _stat_lines([Path(prefix + suffix) for prefix in cfg.paths for suffix in (BIN_SUFFIX, IDX_SUFFIX)])

    def documents(self, cfg: DataConfig) -> Iterator[tuple[str, str]]:
        raise ValueError("source: the megatron source holds token ids, not text; it cannot train a tokenizer")

    def token_documents(self, cfg: DataConfig) -> Iterator[tuple[str, np.ndarray]]:
        """`(doc_id, ids)` for every non-empty document, datasets in `paths` order."""
        for prefix in cfg.paths:
            for index, ids in enumerate(indexed_documents(prefix)):
                if ids.size:
                    yield f"{prefix}#{index}", ids
