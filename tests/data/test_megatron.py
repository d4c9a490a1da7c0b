"""Megatron-LM indexed datasets: a corpus written with megatron-core's builder trains with wren on
the same token stream as wren's own shards, and wren shards export to datasets megatron-core reads."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from data import DataConfig, TokenLoader, TokenShard, prepare_data
from data.megatron import export_shard
from data.prepare import split_documents
from tests.trainer.jobs import losses, make_corpus, tiny_overrides, train_job
from trainer.config import JobConfig
from trainer.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core is not installed")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """wren's own shards of a real text corpus, and its documents in source order."""
    root = tmp_path_factory.mktemp("megatron")
    cfg = DataConfig(source="text", paths=[str(make_corpus(root / "corpus"))], vocab_size=512, cache_dir=str(root / "cache"))
    prepared = prepare_data(cfg, log=lambda *_: None)
    train, val = TokenShard(prepared.train_path), TokenShard(prepared.val_path)
    train_order, val_order = split_documents(train.num_documents + val.num_documents, cfg.val_fraction, cfg.seed)
    documents: list[np.ndarray] = [np.empty(0)] * (train.num_documents + val.num_documents)
    for shard, order in ((train, train_order), (val, val_order)):
        for position, original in enumerate(order):
            documents[original] = np.array(shard.document(position))
    return root, cfg, prepared, documents


def write_with_megatron_builder(prefix: str, documents: list[np.ndarray], vocab_size: int) -> None:
    """What Megatron-LM's preprocess_data.py does: one document per source document; here odd
    documents are split into two sequences, as its sentence splitting would."""
    dtype = indexed_dataset.DType.optimal_dtype(vocab_size)
    builder = indexed_dataset.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for index, ids in enumerate(documents):
        pieces = np.array_split(ids, 2) if index % 2 else [ids]
        builder.add_document(np.concatenate(pieces).astype(np.int64), [len(p) for p in pieces])
    builder.finalize(prefix + ".idx")


def test_megatron_corpus_yields_the_same_shards_and_batches(text_data):
    root, text_cfg, prepared, documents = text_data
    prefix = str(root / "megatron" / "corpus_text_document")
    (root / "megatron").mkdir()
    write_with_megatron_builder(prefix, documents, prepared.vocab_size)

    cfg = dataclasses.replace(text_cfg, source="megatron", paths=[prefix], tokenizer_path=str(prepared.tokenizer_path))
    from_megatron = prepare_data(cfg, log=lambda *_: None)
    assert from_megatron.vocab_size == prepared.vocab_size
    for split in ("train_path", "val_path"):
        ours, theirs = TokenShard(getattr(prepared, split)), TokenShard(getattr(from_megatron, split))
        np.testing.assert_array_equal(np.asarray(theirs.tokens), np.asarray(ours.tokens))
        np.testing.assert_array_equal(theirs.doc_offsets, ours.doc_offsets)

    loaders = [
        TokenLoader(TokenShard(p.train_path), seq_len=32, global_batch_size=8, shuffle_seed=0) for p in (prepared, from_megatron)
    ]
    for _ in range(20):
        torch.testing.assert_close(loaders[1].next_batch(), loaders[0].next_batch(), rtol=0, atol=0)


def test_training_on_the_megatron_corpus_matches_training_on_text(text_data, tmp_path):
    root, text_cfg, prepared, documents = text_data
    prefix = str(tmp_path / "corpus_text_document")
    write_with_megatron_builder(prefix, documents, prepared.vocab_size)
    corpus = text_cfg.paths[0]
    common = dict(training__steps=6, data__cache_dir=str(tmp_path / "cache"))
    train_job(tiny_overrides(corpus, root / "cache", tmp_path, "text", **common))
    train_job(
        tiny_overrides(
            corpus, root / "cache", tmp_path, "megatron", data__source="megatron", data__paths=[prefix],
            data__tokenizer_path=str(prepared.tokenizer_path), **common,
        )
    )
    assert losses(tmp_path / "megatron") == losses(tmp_path / "text")


def test_wren_shard_exports_to_a_dataset_megatron_core_reads(text_data, tmp_path):
    _, _, prepared, _ = text_data
    shard = TokenShard(prepared.train_path)
    prefix = export_shard(shard, tmp_path / "exported")
    dataset = indexed_dataset.IndexedDataset(str(prefix), mmap=True)
    assert len(dataset.document_indices) - 1 == len(dataset) == shard.num_documents
    for i in range(shard.num_documents):
        np.testing.assert_array_equal(np.asarray(dataset[i], dtype=np.int64), np.asarray(shard.document(i), dtype=np.int64))


def test_megatron_source_errors_name_the_key(text_data, tmp_path):
    _, _, prepared, _ = text_data
    (tmp_path / "x.bin").touch()
    (tmp_path / "x.idx").touch()
    with pytest.raises(ConfigError, match=r"data\.tokenizer_path: source 'megatron' holds token ids"):
        JobConfig.load(None, ["--data.source=\"megatron\"", f"--data.paths=[\"{tmp_path}/x\"]"])
    with pytest.raises(ConfigError, match=r"data\.paths: '.*/missing\.bin' does not exist"):
        JobConfig.load(None, ["--data.source=\"megatron\"", f"--data.paths=[\"{tmp_path}/missing\"]", f"--data.tokenizer_path=\"{prepared.tokenizer_path}\""])
