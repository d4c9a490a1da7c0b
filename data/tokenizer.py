"""Sentencepiece BPE tokenizer: training on a corpus, and a small wrapper for encode/decode.

The trained model is set up so that source code round-trips exactly: no normalization
(`identity`), whitespace kept as is (no collapsing, no dummy prefix), runs of spaces may form one
piece (indentation), "\\n" is always its own piece, and byte fallback encodes any character the
vocabulary lacks as its UTF-8 bytes, so nothing becomes `<unk>`. One exception is inherent to
sentencepiece: the character U+2581 ("▁"), its internal whitespace marker, decodes as a space.
"""

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"  # a user-defined piece: always one token, never merged with its neighbours
# Byte fallback needs all 256 byte pieces, plus unk/bos/eos/pad and the newline piece.
MIN_VOCAB_SIZE = 256 + 5
MAX_VOCAB_SIZE = 1 << 20

# Training reads the corpus line by line (every line keeps its "\n"); a longer line is cut into
# chunks of at most MAX_LINE_CHARS characters, which are at most 4 bytes each in UTF-8.
MAX_LINE_CHARS = 4096
# sentencepiece samples (shuffled) at most this many lines to train on; the stdlib corpus has
# about 310k, and BPE training time grows with the number of lines.
MAX_TRAINING_LINES = 1_000_000

TRAINER_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "user_defined_symbols": [NEWLINE_PIECE],
    "character_coverage": 0.9999,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": PAD_ID,
    "max_sentence_length": 4 * MAX_LINE_CHARS,
    "input_sentence_size": MAX_TRAINING_LINES,
    "shuffle_input_sentence": True,
    "minloglevel": 2,
}

# sentencepiece reports a bad vocabulary size through RuntimeError; these fragments of its
# messages are translated into errors naming the config field.
_VOCAB_SIZE_ERRORS = ("Vocabulary size too high", "Vocabulary size is smaller than required")


def available_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Split documents into lines that keep their "\\n", long lines cut into chunks."""
    for text in texts:
        lines = text.split("\n")
        for index, line in enumerate(lines):
            if index < len(lines) - 1:
                line += "\n"
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_prefix: Path) -> Path:
    """Train a byte-fallback BPE sentencepiece model on `texts` (one string per document).

    Writes `<out_prefix>.model` (and the human-readable `<out_prefix>.vocab`) and returns the
    model's path. Raises `ValueError` when sentencepiece rejects the input, e.g. a `vocab_size`
    the corpus cannot fill.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            num_threads=available_cpus(),
            **TRAINER_OPTIONS,
        )
    except RuntimeError as err:
        message = str(err).strip()
        if any(fragment in message for fragment in _VOCAB_SIZE_ERRORS):
            raise ValueError(
                f"vocab_size: {vocab_size} does not fit this corpus: {message}"
            ) from err
        raise ValueError(f"tokenizer training failed: {message}") from err
    return Path(f"{out_prefix}.model")


class Tokenizer:
    """A loaded sentencepiece model. `encode` adds no BOS/EOS; callers add them where wanted."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self._processor = processor
        self._path = path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a sentencepiece `.model` file; `ValueError` names the file if it is unusable."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer model does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path}: not a sentencepiece model: {err}") from err
        return cls(processor, path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each of `texts`, encoded on all available cores."""
        return self._processor.encode(texts, num_threads=available_cpus())

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (accepts lists, numpy arrays and 1-D tensors)."""
        return self._processor.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Number of pieces; every id is below it."""
        return self._processor.vocab_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id."""
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, appended after every document in a shard."""
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id (-1 for a loaded model that defines none)."""
        return self._processor.pad_id()

    @property
    def path(self) -> Path:
        """The `.model` file this tokenizer was loaded from."""
        return self._path
