"""wren data: corpus sources, sentencepiece tokenizer, packed token shards and the resumable loader.

`prepare_data(DataConfig(...))` builds (once, cached by fingerprint) a tokenizer and train/val
token shards; `TokenLoader(TokenShard(prepared.train_path), ...)` serves training batches and
`eval_windows(TokenShard(prepared.val_path), ...)` evaluation batches.
"""

from data.config import DataConfig
from data.loader import TokenLoader, eval_windows
from data.prepare import PreparedData, prepare_data
from data.shards import TokenShard
from data.tokenizer import Tokenizer

__all__ = [
    "DataConfig",
    "PreparedData",
    "TokenLoader",
    "TokenShard",
    "Tokenizer",
    "eval_windows",
    "prepare_data",
]
