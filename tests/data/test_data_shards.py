"""The token shard format: streaming writes, memory-mapped reads, and errors on corrupt shards."""

import json

import numpy as np
import pytest

from data.shards import TokenShard, write_shard


def random_documents(seed: int, vocab_size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=rng.integers(0, 50)) for _ in range(count)]


@pytest.mark.parametrize(("vocab_size", "dtype"), [(1000, "<u2"), (65536, "<u2"), (70_000, "<u4")])
def test_round_trip(tmp_path, vocab_size, dtype):
    documents = random_documents(0, vocab_size, 25)
    documents[3] = np.array([vocab_size - 1, 0], dtype=np.int64)  # the extreme ids survive
    shard = write_shard(tmp_path / "shard", iter(documents), vocab_size)

    reopened = TokenShard(tmp_path / "shard")
    assert reopened.num_documents == len(documents)
    assert reopened.num_tokens == sum(len(d) for d in documents)
    assert reopened.vocab_size == vocab_size
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(reopened.document(i), document)
    np.testing.assert_array_equal(shard.tokens, np.concatenate(documents))
    # The file is raw little-endian ids of the documented width, and the index says so.
    raw = np.fromfile(tmp_path / "shard" / "tokens.bin", dtype=dtype)
    np.testing.assert_array_equal(raw, np.concatenate(documents))
    index = json.loads((tmp_path / "shard" / "index.json").read_text())
    assert index == {
        "format": "wren-token-shard",
        "version": 1,
        "dtype": np.dtype(dtype).name,
        "num_tokens": reopened.num_tokens,
        "num_documents": len(documents),
        "vocab_size": vocab_size,
    }
    offsets = np.load(tmp_path / "shard" / "doc_offsets.npy", allow_pickle=False)
    np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(d) for d in documents[:-1]]))


def test_tokens_are_a_read_only_memory_map(tmp_path):
    shard = write_shard(tmp_path / "shard", random_documents(1, 500, 5), 500)
    assert isinstance(shard.tokens, np.memmap)
    with pytest.raises(ValueError):
        shard.tokens[0] = 1


def test_encoded_text_round_trips_through_a_shard(tmp_path, small_tokenizer):
    texts = ["def a():\n    return 1\n", "x\t=  'é'\n", "class B:\n    pass\n"]
    arrays = [np.array(small_tokenizer.encode(t) + [small_tokenizer.eos_id]) for t in texts]
    shard = write_shard(tmp_path / "shard", arrays, small_tokenizer.vocab_size)
    for i, text in enumerate(texts):
        document = shard.document(i)
        assert document[-1] == small_tokenizer.eos_id
        assert small_tokenizer.decode(document[:-1]) == text


def test_empty_shard(tmp_path):
    shard = write_shard(tmp_path / "shard", [], 100)
    assert (shard.num_tokens, shard.num_documents, shard.tokens.size) == (0, 0, 0)


def test_document_index_out_of_range(tmp_path):
    shard = write_shard(tmp_path / "shard", random_documents(2, 100, 3), 100)
    with pytest.raises(IndexError):
        shard.document(3)


def test_write_rejects_out_of_range_ids(tmp_path):
    with pytest.raises(ValueError, match=r"document 1: token ids must lie in \[0, 100\)"):
        write_shard(tmp_path / "shard", [np.array([1, 2]), np.array([5, 100])], 100)
    with pytest.raises(ValueError, match="document 0: expected a 1-D integer array"):
        write_shard(tmp_path / "shard2", [np.zeros((2, 2), dtype=np.int64)], 100)


def _corrupt_index(key, value):
    def corrupt(shard_dir):
        index = json.loads((shard_dir / "index.json").read_text())
        index[key] = value
        (shard_dir / "index.json").write_text(json.dumps(index))

    return corrupt


CORRUPTIONS = {
    "missing index": (lambda d: (d / "index.json").unlink(), "index.json: missing"),
    "index not json": (lambda d: (d / "index.json").write_text("{"), "index.json: unreadable"),
    "wrong format": (_corrupt_index("format", "other"), "index.json: format is not"),
    "wrong version": (_corrupt_index("version", 2), "index.json: version 2 is not supported"),
    "unknown dtype": (_corrupt_index("dtype", "int8"), "index.json: dtype 'int8'"),
    "bad count": (_corrupt_index("num_documents", -1), "index.json: num_documents must be"),
    "missing tokens": (lambda d: (d / "tokens.bin").unlink(), "tokens.bin: missing"),
    "truncated tokens": (
        lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-2]),
        "tokens.bin: .* bytes, expected",
    ),
    "missing offsets": (lambda d: (d / "doc_offsets.npy").unlink(), "doc_offsets.npy: missing"),
    "offsets of another shard": (
        lambda d: np.save(d / "doc_offsets.npy", np.array([0, 5], dtype=np.int64)),
        "doc_offsets.npy: expected 4 int64 offsets",
    ),
    "decreasing offsets": (
        lambda d: np.save(d / "doc_offsets.npy", np.array([0, 5, 3, 7], dtype=np.int64)),
        "doc_offsets.npy: offsets must start at 0, never decrease",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_shard_errors_name_the_file(tmp_path, corruption):
    damage, message = CORRUPTIONS[corruption]
    documents = [np.arange(4), np.arange(3), np.arange(5), np.arange(2)]
    write_shard(tmp_path / "shard", documents, 100)
    damage(tmp_path / "shard")
    with pytest.raises(ValueError, match=message):
        TokenShard(tmp_path / "shard")
