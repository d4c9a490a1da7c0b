"""The `[finetune]` section: validation errors name the dotted key, `init_from` is classified, the
method registry honours its contract, and the pretraining default is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer.config import JobConfig
from trainer.errors import ConfigError
from trainer.finetune import FINETUNE_METHODS, resolve_init_from


@pytest.fixture
def hf_dir(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.fixture
def wren_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / ".metadata").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    (run / "config.toml").write_text("")
    return run


def _load(*overrides: str) -> JobConfig:
    return JobConfig.load(None, list(overrides))


def test_default_is_pretraining():
    cfg = _load()
    assert cfg.finetune.method == "none" and not cfg.finetune.enabled
    assert "[finetune]" in cfg.to_toml() and JobConfig.load(None).to_toml() == cfg.to_toml()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['--finetune.method="lora"'], "finetune.init_from: method 'lora' needs pretrained weights"),
        (['--finetune.method="adapters"'], "finetune.method: must be one of none, full, lora"),
        (['--finetune.init_from="x"'], 'finetune.init_from: set, but method is "none"'),
        (['--finetune.method="full"', '--finetune.init_from="/no/such/dir"'], "finetune.init_from: '/no/such/dir' is not a directory"),
        (["--finetune.lora.rank=0"], "finetune.lora.rank: must be a positive integer, got 0"),
        (["--finetune.spiel.density=2.0"], "finetune.spiel.density: must be in (0, 1]"),
        (['--finetune.chat.template="chatml"'], "finetune.chat.template: must be one of auto, wren"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    assert str(err.value).startswith(message), str(err.value)


def test_init_from_kinds(hf_dir, wren_run, tmp_path):
    assert resolve_init_from(str(hf_dir)).kind == "hf"
    run = resolve_init_from(str(wren_run))
    assert (run.kind, run.path, run.run_dir) == ("wren", wren_run / "checkpoints" / "step_00000004", wren_run)
    step = resolve_init_from(str(wren_run / "checkpoints" / "step_00000004"))
    assert step == run
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="'mistral' model"):
        resolve_init_from(str(hf_dir))
    with pytest.raises(ValueError, match="neither a Hugging Face Llama directory"):
        resolve_init_from(str(tmp_path))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--optimizer.name=\"lowrank\"", "--optimizer.lowrank.rank=4"], "cannot be combined with optimizer.lowrank"),
        (["--mup.enabled=true"], "cannot be combined with mup.enabled"),
        (['--parallel.engine="deepspeed"'], "fine-tuning runs on the fsdp2 engine"),
    ],
)
def test_refused_combinations(hf_dir, extra, message):
    with pytest.raises(ConfigError, match=message):
        _load('--finetune.method="lora"', f'--finetune.init_from="{hf_dir}"', *extra)


def test_registry_entries_name_importable_functions():
    for name, method in FINETUNE_METHODS.items():
        module, _, function = method.apply.partition(":")
        assert module and function, name
    assert FINETUNE_METHODS["lora"].load_apply().__name__ == "apply_lora_method"
    assert FINETUNE_METHODS["full"].needs_pretrained_weights is False
    assert FINETUNE_METHODS["loram"].needs_pretrained_weights is True


def test_cli_reports_a_config_error_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", "--finetune.method=\"lora\"", "--finetune.lora.alpha=0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["wren: error: finetune.lora.alpha: must be positive, got 0.0"]
