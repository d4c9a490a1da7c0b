"""The cache key of prepared data: a sha256 over everything that decides its contents."""

import hashlib
import json
from pathlib import Path

from data.config import DataConfig
from data.sources import SOURCES

# Bump when the prepared output changes for the same inputs (tokenizer options, shard layout,
# split rule), so that old caches are not reused.
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    """Hex sha256 of a (small) file's contents."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint_inputs(cfg: DataConfig) -> dict:
    """The JSON-able description that is hashed: settings, plus the source's cheap file listing
    (names with sizes and mtimes; for `stdlib` the Python version and names with sizes)."""
    tokenizer_path = Path(cfg.tokenizer_path)
    tokenizer = (
        {"path": str(tokenizer_path.resolve()), "sha256": file_sha256(tokenizer_path)}
        if cfg.tokenizer_path
        else None
    )
    return {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "text_field": cfg.text_field,
        "inputs": SOURCES[cfg.source].describe_inputs(cfg),
        "vocab_size": cfg.vocab_size,
        "tokenizer": tokenizer,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


def fingerprint(cfg: DataConfig) -> str:
    """Hex sha256 of `fingerprint_inputs(cfg)`; equal fingerprints mean identical prepared data."""
    encoded = json.dumps(fingerprint_inputs(cfg), sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()
