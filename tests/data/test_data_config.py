"""DataConfig.validate: every bad setting is reported before any work, naming its field."""

import pytest

from data.config import DataConfig


def test_defaults_are_valid():
    DataConfig().validate()


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        DataConfig("stdlib")  # type: ignore[misc]


def test_valid_file_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    DataConfig(source="jsonl", paths=[str(tmp_path / "a.jsonl")]).validate()
    DataConfig(source="text", paths=[str(tmp_path)]).validate()
    DataConfig(source="hf_dataset", paths=[str(tmp_path)]).validate()


# "{tmp}" in a setting stands for the test's tmp_path, which holds a regular file "a_file.txt".
BAD_SETTINGS = [
    ({"source": "xml"}, "source: unknown source 'xml'; known: hf_dataset, jsonl, megatron, stdlib, text"),
    ({"source": "text", "paths": ["nope.txt"]}, "paths: 'nope.txt' does not exist"),
    ({"source": "jsonl"}, "paths: must list at least one"),
    ({"paths": ["{tmp}/a_file.txt"]}, "paths: must be empty for source 'stdlib'"),
    ({"source": "hf_dataset", "paths": ["{tmp}/a_file.txt"]}, "paths: .* is not a directory"),
    ({"text_field": ""}, "text_field: must not be empty"),
    ({"vocab_size": 7}, "vocab_size: must be between 261 and 1048576, got 7"),
    ({"vocab_size": 1 << 21}, "vocab_size: must be between"),
    ({"tokenizer_path": "{tmp}/none.model"}, "tokenizer_path: .* is not a file"),
    ({"val_fraction": 0.0}, "val_fraction: must be greater than 0 and less than 1, got 0.0"),
    ({"val_fraction": 1.0}, "val_fraction: must be greater than 0"),
    ({"cache_dir": ""}, "cache_dir: must not be empty"),
    ({"cache_dir": "{tmp}/a_file.txt"}, "cache_dir: .* exists and is not a directory"),
    ({"seed": -1}, "seed: must be non-negative, got -1"),
]


def _fill(value, tmp_path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp_path))
    if isinstance(value, list):
        return [_fill(item, tmp_path) for item in value]
    return value


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_bad_settings_name_their_field(tmp_path, settings, message):
    (tmp_path / "a_file.txt").write_text("x")
    cfg = DataConfig(**{key: _fill(value, tmp_path) for key, value in settings.items()})
    with pytest.raises(ValueError, match=f"^{message}"):
        cfg.validate()
