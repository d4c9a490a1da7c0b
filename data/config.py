"""The `[data]` section of a wren config: where the corpus comes from and how it is tokenized."""

from dataclasses import dataclass, field
from pathlib import Path

from data.sources import SOURCES
from data.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE


@dataclass(kw_only=True)
class DataConfig:
    """Corpus, tokenizer and split settings; `prepare_data` turns them into cached token shards.

    Fields:
        source: corpus source registry name (see `data.sources.SOURCES`).
        paths: files or directories for the `text`, `jsonl` and `hf_dataset` sources; dataset
            prefixes (PREFIX for PREFIX.bin / PREFIX.idx) for `megatron`; empty for `stdlib`.
        text_field: JSONL key / Hugging Face dataset column holding the document text.
        vocab_size: number of pieces of the trained sentencepiece tokenizer.
        tokenizer_path: an existing sentencepiece `.model` to use instead of training one;
            required by pre-tokenized sources (`megatron`), whose ids it must have produced.
        val_fraction: fraction of documents held out for validation (whole documents, never a
            part of one); at least one document is always held out.
        cache_dir: directory holding prepared data, one subdirectory per input fingerprint.
        seed: seed of the document shuffle that decides the split and the packing order.
    """

    source: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    text_field: str = "text"
    vocab_size: int = 8192
    tokenizer_path: str = ""
    val_fraction: float = 0.01
    cache_dir: str = ".wren_cache/data"
    seed: int = 0

    def validate(self) -> None:
        """Check everything checkable without reading the corpus.

        Raises:
            ValueError: the message starts with the offending field's name.
        """
        if self.source not in SOURCES:
            known = ", ".join(sorted(SOURCES))
            raise ValueError(f"source: unknown source {self.source!r}; known: {known}")
        SOURCES[self.source].check_paths(self.paths)
        if not self.text_field:
            raise ValueError("text_field: must not be empty")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size: must be between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}, "
                f"got {self.vocab_size}"
            )
        if getattr(SOURCES[self.source], "tokenized", False) and not self.tokenizer_path:
            raise ValueError(
                f"tokenizer_path: source {self.source!r} holds token ids; name the tokenizer that produced them"
            )
        if self.tokenizer_path and not Path(self.tokenizer_path).is_file():
            raise ValueError(f"tokenizer_path: {self.tokenizer_path!r} is not a file")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"val_fraction: must be greater than 0 and less than 1, got {self.val_fraction}"
            )
        if not self.cache_dir:
            raise ValueError("cache_dir: must not be empty")
        if Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ValueError(f"cache_dir: {self.cache_dir!r} exists and is not a directory")
        if self.seed < 0:
            raise ValueError(f"seed: must be non-negative, got {self.seed}")
