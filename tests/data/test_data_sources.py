"""Corpus sources: which documents each yields, in what order, and errors naming the bad input."""

import json
import sysconfig
from pathlib import Path

import pytest

from data.config import DataConfig
from data.sources import SOURCES, STDLIB_SKIPPED_DIRS


def documents(**config) -> list[tuple[str, str]]:
    return list(SOURCES[config["source"]].documents(DataConfig(**config)))


def test_text_source_reads_files_and_directories_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / ".git").mkdir()
    (corpus / "b.txt").write_bytes(b"second\r\nline with CRLF\r\n")
    (corpus / "sub" / "a.md").write_text("# nested\n")
    (corpus / "a.py").write_text("print('first')\n")
    (corpus / ".hidden.txt").write_text("skipped")
    (corpus / ".git" / "config").write_text("skipped")
    single = tmp_path / "single.txt"
    single.write_text("a file given directly")

    docs = documents(source="text", paths=[str(corpus), str(single)])

    assert [Path(doc_id).relative_to(tmp_path).as_posix() for doc_id, _ in docs] == [
        "corpus/a.py",
        "corpus/b.txt",
        "corpus/sub/a.md",
        "single.txt",
    ]
    assert [text for _, text in docs] == [
        "print('first')\n",
        "second\r\nline with CRLF\r\n",  # no newline translation
        "# nested\n",
        "a file given directly",
    ]


def test_text_source_names_an_undecodable_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match=r"binary\.bin: not UTF-8 text"):
        documents(source="text", paths=[str(tmp_path)])


def test_jsonl_source_yields_one_document_per_line(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "third"}) + "\n")
    lines = [{"content": "first\nline", "id": 1}, {"content": "second ✓"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    (tmp_path / "notes.txt").write_text("not jsonl, ignored inside a directory")

    docs = documents(source="jsonl", paths=[str(tmp_path)], text_field="content")

    assert [text for _, text in docs] == ["first\nline", "second ✓", "third"]
    names = [Path(doc_id).name for doc_id, _ in docs]
    assert names == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"text": "unterminated', "invalid JSON"),
        ('["a", "list"]', "expected a JSON object, got list"),
        ('{"other": "x"}', "no 'text' key"),
        ('{"text": 5}', "'text' is int, expected a string"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl, line 3: {message}"):
        documents(source="jsonl", paths=[str(path)])


def test_hf_dataset_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["first document", "second\n\tdocument", "third ✓"]
    datasets.Dataset.from_dict({"body": texts, "n": [1, 2, 3]}).save_to_disk(tmp_path / "plain")
    splits = {
        "train": datasets.Dataset.from_dict({"body": texts}),
        "test": datasets.Dataset.from_dict({"body": ["held", "out"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")

    plain = documents(source="hf_dataset", paths=[str(tmp_path / "plain")], text_field="body")
    as_dict = documents(source="hf_dataset", paths=[str(tmp_path / "dict")], text_field="body")

    assert [text for _, text in plain] == texts
    assert [text for _, text in as_dict] == texts  # the "train" split only
    assert plain[1][0].endswith("plain[1]")
    with pytest.raises(ValueError, match="no column 'text'"):
        documents(source="hf_dataset", paths=[str(tmp_path / "plain")])
    with pytest.raises(ValueError, match="not a dataset saved by save_to_disk"):
        documents(source="hf_dataset", paths=[str(tmp_path)])


def test_stdlib_source_is_library_code_in_a_fixed_order():
    source = SOURCES["stdlib"]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = source.files()
    assert files == sorted(files) == source.files()
    assert len(files) > 300
    assert root / "json" / "decoder.py" in files
    assert all(f.suffix == ".py" for f in files)
    assert not any(STDLIB_SKIPPED_DIRS & set(f.relative_to(root).parts) for f in files)
    doc_id, text = next(iter(source.documents(DataConfig())))
    assert text == (root / doc_id).read_text()


def test_describe_inputs_changes_when_a_file_changes(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    cfg = DataConfig(source="text", paths=[str(tmp_path)])
    before = SOURCES["text"].describe_inputs(cfg)
    (tmp_path / "a.txt").write_text("one more")
    assert SOURCES["text"].describe_inputs(cfg) != before
