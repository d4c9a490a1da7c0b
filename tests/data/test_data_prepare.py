"""prepare_data: the split, the tokenizer, caching by fingerprint, atomic publication, errors."""

import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed

import data.prepare
from data.config import DataConfig
from data.prepare import prepare_data
from data.shards import TokenShard
from data.tokenizer import Tokenizer
from tests.distributed import run_on_ranks

VOCAB_SIZE = 400


def config(tmp_path, **overrides) -> DataConfig:
    settings = {
        "source": "text",
        "paths": [str(tmp_path / "corpus")],
        "vocab_size": VOCAB_SIZE,
        "val_fraction": 0.1,
        "cache_dir": str(tmp_path / "cache"),
    }
    return DataConfig(**(settings | overrides))


def decoded_documents(prepared, shard_path) -> list[str]:
    """Each document of a shard decoded, after checking that it ends with EOS."""
    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    shard = TokenShard(shard_path)
    texts = []
    for i in range(shard.num_documents):
        document = shard.document(i)
        assert document[-1] == tokenizer.eos_id
        texts.append(tokenizer.decode(document[:-1]))
    return texts


def test_split_is_by_document_disjoint_and_complete(tmp_path, make_corpus):
    texts = make_corpus(tmp_path / "corpus", 30)
    prepared = prepare_data(config(tmp_path), log=lambda line: None)

    train = decoded_documents(prepared, prepared.train_path)
    val = decoded_documents(prepared, prepared.val_path)
    assert len(val) == 3  # round(0.1 * 30)
    assert sorted(train + val) == sorted(texts)  # whole documents, none split, none lost
    assert not set(train) & set(val)
    meta = json.loads((prepared.directory / "meta.json").read_text())
    val_files = [os.path.basename(doc_id) for doc_id in meta["val_document_ids"]]
    assert [(tmp_path / "corpus" / name).read_text() for name in val_files] == val
    train_tokens = TokenShard(prepared.train_path).num_tokens
    assert meta["train"] == {"num_documents": 27, "num_tokens": train_tokens}
    assert prepared.vocab_size == VOCAB_SIZE == TokenShard(prepared.train_path).vocab_size


def test_packing_order_is_a_seeded_shuffle(tmp_path, make_corpus):
    texts = make_corpus(tmp_path / "corpus", 30)

    def train_order(seed, cache):
        cfg = config(tmp_path, seed=seed, cache_dir=str(tmp_path / cache))
        prepared = prepare_data(cfg, log=lambda line: None)
        return decoded_documents(prepared, prepared.train_path)

    first = train_order(0, "a")
    assert train_order(0, "b") == first  # rebuilt from scratch: the same order
    assert train_order(1, "a") != first
    assert first != [text for text in texts if text in first]  # not the file order
    assert sorted(first) == sorted(text for text in texts if text in first)


def test_tokenizer_is_trained_on_train_documents_only(tmp_path):
    # Each document repeats its own CJK character; only train documents' characters may be pieces.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    marks = [chr(0x4E00 + i) for i in range(20)]
    for i, mark in enumerate(marks):
        (corpus / f"doc_{i:02d}.txt").write_text(f"def f{i}(x):\n    return x\n" + mark * 40 + "\n")
    prepared = prepare_data(config(tmp_path, val_fraction=0.2), log=lambda line: None)

    tokenizer = Tokenizer.load(prepared.tokenizer_path)
    val_text = "".join(decoded_documents(prepared, prepared.val_path))
    val_marks = [m for m in marks if m in val_text]
    assert len(val_marks) == 4
    for mark in marks:
        pieces = len(tokenizer.encode(mark))
        assert pieces == (3 if mark in val_marks else 1)  # 3 UTF-8 byte pieces when unseen


def test_second_call_uses_the_cache(tmp_path, make_corpus):
    make_corpus(tmp_path / "corpus", 30)
    first_log: list[str] = []
    first = prepare_data(config(tmp_path), log=first_log.append)
    meta_mtime = (first.directory / "meta.json").stat().st_mtime_ns

    second_log: list[str] = []
    start = time.perf_counter()
    second = prepare_data(config(tmp_path), log=second_log.append)
    assert time.perf_counter() - start < 1.0
    assert second == first
    assert second_log == [f"data: using cached data at {first.directory}"]
    assert (first.directory / "meta.json").stat().st_mtime_ns == meta_mtime
    assert not any("using cached" in line for line in first_log)
    assert any("encoded 30/30 documents" in line for line in first_log)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.directory.name]


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"val_fraction": 0.2}, {"vocab_size": 380}, {"text_field": "body"}]
)
def test_changed_settings_change_the_fingerprint(tmp_path, make_corpus, change):
    make_corpus(tmp_path / "corpus", 30)
    base = prepare_data(config(tmp_path), log=lambda line: None)
    changed = prepare_data(config(tmp_path, **change), log=lambda line: None)
    assert changed.directory != base.directory
    assert changed.directory.parent == base.directory.parent


def test_changed_input_file_changes_the_fingerprint(tmp_path, make_corpus):
    make_corpus(tmp_path / "corpus", 30)
    base = prepare_data(config(tmp_path), log=lambda line: None)
    with open(tmp_path / "corpus" / "module_000.py", "a") as handle:
        handle.write("# edited\n")
    assert prepare_data(config(tmp_path), log=lambda line: None).directory != base.directory


def test_existing_tokenizer_is_copied_and_used(tmp_path, make_corpus, small_tokenizer):
    make_corpus(tmp_path / "corpus", 10)
    prepared = prepare_data(
        config(tmp_path, tokenizer_path=str(small_tokenizer.path), vocab_size=8192),
        log=lambda line: None,
    )
    assert prepared.tokenizer_path.read_bytes() == small_tokenizer.path.read_bytes()
    assert prepared.vocab_size == small_tokenizer.vocab_size
    train = TokenShard(prepared.train_path)
    assert train.vocab_size == small_tokenizer.vocab_size
    assert int(train.tokens.max()) < small_tokenizer.vocab_size


def test_losing_a_race_uses_the_winners_directory(tmp_path, make_corpus, monkeypatch):
    # Another rank publishes the same entry while this one is building: this rename then fails.
    make_corpus(tmp_path / "corpus", 10)
    real_build = data.prepare._build
    published = []

    def build_while_another_rank_publishes(cfg, key, out, log):
        real_build(cfg, key, out, log)
        winner = out.parent / key[:16]
        real_build(cfg, key, winner, log)
        (winner / "winner").write_text("")
        published.append(winner)

    monkeypatch.setattr(data.prepare, "_build", build_while_another_rank_publishes)
    lines: list[str] = []
    prepared = prepare_data(config(tmp_path), log=lines.append)
    assert prepared.directory == published[0]
    assert (prepared.directory / "winner").exists()
    assert any("another process finished" in line for line in lines)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [published[0].name]


def _prepare_on_rank(settings: dict) -> tuple[str, list[str]]:
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # start building at the same moment on both ranks
    lines: list[str] = []
    prepared = prepare_data(DataConfig(**settings), log=lines.append)
    return str(prepared.directory), lines


def test_ranks_preparing_at_once_share_one_complete_entry(tmp_path, make_corpus):
    texts = make_corpus(tmp_path / "corpus", 30)
    settings = {
        "source": "text",
        "paths": [str(tmp_path / "corpus")],
        "vocab_size": VOCAB_SIZE,
        "cache_dir": str(tmp_path / "cache"),
    }
    results = run_on_ranks(_prepare_on_rank, 2, settings)
    directories = {directory for directory, _ in results}
    assert len(directories) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(directories.pop()).name]
    prepared = prepare_data(DataConfig(**settings), log=lambda line: None)
    train = decoded_documents(prepared, prepared.train_path)
    assert sorted(train + decoded_documents(prepared, prepared.val_path)) == sorted(texts)


def test_a_failed_build_leaves_no_cache_entry(tmp_path, make_corpus, monkeypatch):
    make_corpus(tmp_path / "corpus", 10)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while training the tokenizer")

    monkeypatch.setattr(data.prepare, "train_tokenizer", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_data(config(tmp_path), log=lambda line: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_too_few_documents(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "only.py").write_text("x = 1\n")
    (corpus / "empty.py").write_text("")
    with pytest.raises(ValueError, match="1 non-empty document"):
        prepare_data(config(tmp_path), log=lambda line: None)


def test_empty_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text("")
    with pytest.raises(ValueError, match="0 non-empty document"):
        prepare_data(config(tmp_path), log=lambda line: None)


def test_stdlib_default_prepares_round_trips_and_caches(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, log=lambda line: None)

    meta = json.loads((prepared.directory / "meta.json").read_text())
    train, val = TokenShard(prepared.train_path), TokenShard(prepared.val_path)
    assert prepared.vocab_size == cfg.vocab_size
    assert train.num_documents > 500 and train.num_tokens > 1_000_000
    assert val.num_documents == max(1, round(0.01 * (train.num_documents + val.num_documents)))
    stdlib_root = Path(sysconfig.get_paths()["stdlib"])
    originals = [(stdlib_root / name).read_bytes().decode() for name in meta["val_document_ids"]]
    assert decoded_documents(prepared, prepared.val_path) == originals  # real code round-trips

    lines: list[str] = []
    start = time.perf_counter()
    assert prepare_data(cfg, log=lines.append) == prepared
    assert time.perf_counter() - start < 1.0
    assert lines == [f"data: using cached data at {prepared.directory}"]
    np.testing.assert_array_equal(train.document(0), TokenShard(prepared.train_path).document(0))
