"""The sentencepiece tokenizer: exact round trips on code, byte fallback, special ids, errors."""

import random

import pytest

from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

CODE_SAMPLES = [
    "def f(x):\n\tif x  >  1:\n        return x\n",
    "   leading spaces and trailing spaces   \n\n\n",
    "mixed\t \ttabs\t\tand  spaces\r\nwindows line end\r\n",
    "no trailing newline",
    "unicode: héllo wörld — ünïcode ✓\n",
    "x = 12345678901234567890\n",
    "\n\n  \n\t\n",
]


@pytest.mark.parametrize("text", CODE_SAMPLES)
def test_round_trips_code_exactly(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert UNK_ID not in ids


def test_byte_fallback_covers_characters_never_seen_in_training(small_tokenizer):
    unseen = "你好 🙂 Ω ∑ \x00 \x7f"
    ids = small_tokenizer.encode(unseen)
    assert UNK_ID not in ids
    assert small_tokenizer.decode(ids) == unseen
    # An unseen 4-byte character is spelled as its 4 UTF-8 byte pieces.
    assert len(small_tokenizer.encode("🙂")) == 4


def test_random_unicode_round_trips(small_tokenizer):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(1, 0x3000) if not 0xD800 <= c < 0xE000 and c != 0x2581]
    for _ in range(20):
        text = "".join(rng.choice(alphabet) for _ in range(200))
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_newline_is_always_its_own_token(small_tokenizer):
    newline_ids = small_tokenizer.encode("\n")
    assert len(newline_ids) == 1
    assert small_tokenizer.encode("\n\n\n") == newline_ids * 3
    assert small_tokenizer.encode("x = 1\ny = 2").count(newline_ids[0]) == 1


def test_indentation_is_compressed(small_tokenizer):
    # The training corpus indents with 4 and 8 spaces; whitespace-only pieces cover those runs.
    assert len(small_tokenizer.encode(" " * 8)) < 4


def test_special_ids_and_vocab(small_tokenizer):
    assert small_tokenizer.vocab_size == 400  # the size the session fixture asked for
    assert (small_tokenizer.bos_id, small_tokenizer.eos_id, small_tokenizer.pad_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    assert len({UNK_ID, BOS_ID, EOS_ID, PAD_ID}) == 4
    ids = small_tokenizer.encode("".join(CODE_SAMPLES))
    assert max(ids) < small_tokenizer.vocab_size
    assert not {BOS_ID, EOS_ID, PAD_ID} & set(ids)


def test_load_round_trip_and_path(small_tokenizer):
    reloaded = Tokenizer.load(small_tokenizer.path)
    assert reloaded.path == small_tokenizer.path
    assert reloaded.encode(CODE_SAMPLES[0]) == small_tokenizer.encode(CODE_SAMPLES[0])


def test_vocab_size_too_large_for_corpus_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^vocab_size: 5000 does not fit"):
        train_tokenizer(["def f():\n    return 1\n"] * 10, 5000, tmp_path / "tok")


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="corrupt.model: not a sentencepiece model"):
        Tokenizer.load(corrupt)
