"""wren data: corpus sources, sentencepiece tokenizer, packed token shards and the resumable loader.

`prepare_data(DataConfig(...))` builds (once, cached by fingerprint) a tokenizer and train/val
token shards; `TokenLoader(TokenShard(prepared.train_path), ...)` serves training batches and
`eval_windows(TokenShard(prepared.val_path), ...)` evaluation batches.

The names below are imported on first use (PEP 562), so that reading a config (`data.config`)
does not import torch: `wren hparams CONFIG` answers without it.
"""

import importlib

_EXPORTS = {
    "DataConfig": "data.config",
    "PreparedData": "data.prepare",
    "TokenLoader": "data.loader",
    "TokenShard": "data.shards",
    "Tokenizer": "data.tokenizer",
    "eval_windows": "data.loader",
    "prepare_data": "data.prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
