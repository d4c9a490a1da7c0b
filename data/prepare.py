"""Turn a `DataConfig` into a tokenizer and train/validation token shards, cached by fingerprint.

The cache entry `<cache_dir>/<fingerprint[:16]>/` holds `tokenizer.model`, `train/` and `val/`
(token shards, see `data.shards`) and `meta.json`. It is built in a temporary sibling directory
and renamed into place as the last step, so an entry either exists complete or not at all, and
several processes (ranks) preparing the same data at once are safe: the first rename wins and the
others use its result.
"""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.fingerprint import FORMAT_VERSION, fingerprint
from data.shards import write_shard
from data.sources import SOURCES, Document
from data.tokenizer import Tokenizer, train_tokenizer

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
ENCODE_BATCH_CHARS = 4 << 20  # characters handed to sentencepiece per encode call
PROGRESS_INTERVAL_SECONDS = 5.0


@dataclass(frozen=True)
class PreparedData:
    """Where prepared data lives: the tokenizer, and the train and validation shard directories."""

    directory: Path
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    vocab_size: int


def prepare_data(cfg: DataConfig, log: Callable[[str], None] = print) -> PreparedData:
    """Validate `cfg`, then return its prepared data, building and caching it if needed.

    Documents are shuffled with `cfg.seed`; the first `max(1, round(val_fraction * n))` are the
    validation split, the rest train. The tokenizer is trained on the training documents only;
    a given `cfg.tokenizer_path` is used instead, and then its size is `vocab_size`. Empty
    documents are skipped.

    Raises:
        ValueError: bad settings, unreadable input, or fewer than 2 non-empty documents.
    """
    cfg.validate()
    key = fingerprint(cfg)
    cache_root = Path(cfg.cache_dir)
    final = cache_root / key[:16]
    if final.exists():
        log(f"data: using cached data at {final}")
        return _load_prepared(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{key[:16]}-", dir=cache_root))
    try:
        log(f"data: preparing source {cfg.source!r} into {final}")
        _build(cfg, key, staging, log)
        try:
            os.rename(staging, final)
        except OSError:
            if not final.exists():
                raise
            log(f"data: another process finished {final} first; using it")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _load_prepared(final)


def _load_prepared(directory: Path) -> PreparedData:
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path}: unreadable ({err}); delete {directory} to rebuild") from err
    return PreparedData(
        directory=directory,
        tokenizer_path=directory / TOKENIZER_FILE,
        train_path=directory / "train",
        val_path=directory / "val",
        vocab_size=meta["vocab_size"],
    )


def _nonempty_documents(cfg: DataConfig) -> Iterator[Document]:
    return ((doc_id, text) for doc_id, text in SOURCES[cfg.source].documents(cfg) if text)


def split_documents(
    num_documents: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle document indices with `seed`; return `(train_order, val_order)`.

    The first `max(1, round(val_fraction * num_documents))` shuffled indices are validation.
    """
    order = np.random.default_rng(seed).permutation(num_documents)
    num_val = max(1, round(val_fraction * num_documents))
    if num_val >= num_documents:
        raise ValueError(
            f"val_fraction: {val_fraction} of {num_documents} documents leaves none for training"
        )
    return order[num_val:], order[:num_val]


def _build(cfg: DataConfig, key: str, out: Path, log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    source = SOURCES[cfg.source]
    tokenized = getattr(source, "tokenized", False)  # documents arrive as token ids (megatron)
    documents = source.token_documents(cfg) if tokenized else _nonempty_documents(cfg)
    num_documents = sum(1 for _ in documents)
    if num_documents < 2:
        raise ValueError(
            f"source {cfg.source!r} (paths {cfg.paths}) has {num_documents} non-empty "
            "document(s); need at least 2, one of them held out for validation"
        )
    train_order, val_order = split_documents(num_documents, cfg.val_fraction, cfg.seed)
    is_train = np.zeros(num_documents, dtype=bool)
    is_train[train_order] = True
    log(f"data: {num_documents} documents: {len(train_order)} train, {len(val_order)} validation")

    tokenizer = _make_tokenizer(cfg, out / TOKENIZER_FILE, is_train, log)

    val_ids: dict[int, str] = {}
    if tokenized:
        encoded = _as_given(source.token_documents(cfg), num_documents, ~is_train, val_ids)
    else:
        encoded = _encode(_nonempty_documents(cfg), tokenizer, num_documents, ~is_train, val_ids, log)
    everything = write_shard(out / "all", encoded, tokenizer.vocab_size)
    train = write_shard(out / "train", map(everything.document, train_order), tokenizer.vocab_size)
    val = write_shard(out / "val", map(everything.document, val_order), tokenizer.vocab_size)
    del everything
    shutil.rmtree(out / "all")

    seconds = time.perf_counter() - start
    meta = {
        "fingerprint": key,
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "paths": cfg.paths,
        "text_field": cfg.text_field,
        "tokenizer_path": cfg.tokenizer_path,
        "vocab_size": tokenizer.vocab_size,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "train": {"num_documents": train.num_documents, "num_tokens": train.num_tokens},
        "val": {"num_documents": val.num_documents, "num_tokens": val.num_tokens},
        "val_document_ids": [val_ids[i] for i in val_order.tolist()],
        "build_seconds": round(seconds, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log(
        f"data: {train.num_tokens:,} train tokens, {val.num_tokens:,} validation tokens, "
        f"built in {seconds:.1f} s"
    )


def _make_tokenizer(
    cfg: DataConfig, tokenizer_file: Path, is_train: np.ndarray, log: Callable[[str], None]
) -> Tokenizer:
    """Copy `cfg.tokenizer_path` to `tokenizer_file`, or train one there on the train documents."""
    if cfg.tokenizer_path:
        shutil.copyfile(cfg.tokenizer_path, tokenizer_file)
    else:
        start = time.perf_counter()
        texts = (text for i, (_, text) in enumerate(_nonempty_documents(cfg)) if is_train[i])
        train_tokenizer(texts, cfg.vocab_size, tokenizer_file.with_suffix(""))
        seconds = time.perf_counter() - start
        log(f"data: trained a {cfg.vocab_size}-piece BPE tokenizer (train split), {seconds:.1f} s")
    tokenizer = Tokenizer.load(tokenizer_file)
    if tokenizer.eos_id < 0:
        raise ValueError(f"tokenizer_path: {cfg.tokenizer_path} has no EOS piece to end documents")
    if cfg.tokenizer_path:
        log(
            f"data: using tokenizer {cfg.tokenizer_path} with {tokenizer.vocab_size} pieces "
            "(the vocab_size setting does not apply)"
        )
    return tokenizer


def _as_given(
    documents: Iterator[tuple[str, np.ndarray]], num_documents: int, is_val: np.ndarray, val_ids: dict[int, str]
) -> Iterator[np.ndarray]:
    """Yield pre-tokenized documents unchanged, recording the ids of validation documents."""
    done = 0
    for index, (doc_id, ids) in enumerate(documents):
        if index >= num_documents:
            raise ValueError("the corpus changed while it was being prepared; run again")
        if is_val[index]:
            val_ids[index] = doc_id
        done += 1
        yield ids
    if done != num_documents:
        raise ValueError("the corpus changed while it was being prepared; run again")


def _batched(documents: Iterator[Document], max_chars: int) -> Iterator[list[Document]]:
    """Group documents into lists of about `max_chars` characters (at least one document)."""
    batch: list[Document] = []
    chars = 0
    for document in documents:
        batch.append(document)
        chars += len(document[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(
    documents: Iterator[Document],
    tokenizer: Tokenizer,
    num_documents: int,
    is_val: np.ndarray,
    val_ids: dict[int, str],
    log: Callable[[str], None],
) -> Iterator[np.ndarray]:
    """Yield each document's ids followed by EOS, encoding batches of about ENCODE_BATCH_CHARS.

    Records the ids of validation documents in `val_ids` and logs progress.
    """
    start = last_log = time.perf_counter()
    done = num_tokens = 0
    for batch in _batched(documents, ENCODE_BATCH_CHARS):
        if done + len(batch) > num_documents:
            raise ValueError("the corpus changed while it was being prepared; run again")
        for index, (doc_id, _) in enumerate(batch, start=done):
            if is_val[index]:
                val_ids[index] = doc_id
        for ids in tokenizer.encode_batch([text for _, text in batch]):
            array = np.empty(len(ids) + 1, dtype=np.int64)
            array[:-1] = ids
            array[-1] = tokenizer.eos_id
            num_tokens += array.size
            yield array
        done += len(batch)
        now = time.perf_counter()
        if now - last_log >= PROGRESS_INTERVAL_SECONDS or done == num_documents:
            last_log = now
            log(
                f"data: encoded {done}/{num_documents} documents, {num_tokens:,} tokens, "
                f"{now - start:.1f} s"
            )
    if done != num_documents:
        raise ValueError("the corpus changed while it was being prepared; run again")
