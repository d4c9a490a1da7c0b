"""Config loading: types, unknown keys, impossible values and overrides, in-process and via the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import JobConfig
from trainer.config_loader import parse_override
from trainer.errors import ConfigError


def test_defaults_equal_the_tiny_recipe():
    assert JobConfig.load("configs/tiny.toml") == JobConfig.load(None)


def test_overrides_reach_their_fields():
    cfg = JobConfig.load(None, ["--training.steps=70", "--optimizer.lr=1e-4", "--data.vocab_size=4096", "--model.dim=128"])
    assert cfg.training.steps == 70
    assert cfg.optimizer.lr == 1e-4
    assert cfg.data.vocab_size == 4096
    assert cfg.model.build_model_config(vocab_size=300).dim == 128


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = JobConfig.load(None, ["--model.n_layers=3", "--training.dtype=bfloat16", "--run.name=x"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert JobConfig.load(path) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("--training.stepz=3", "training.stepz"),
        ("--training.steps=three", "training.steps"),
        ("--training.steps=2.5", "training.steps"),
        ("--training.dtype=float16", "training.dtype"),
        ("--model.n_heads=3", "model.n_heads"),
        ("--model.n_kv_heads=3", "model.n_kv_heads"),
        ("--model.flavor=huge", "model.flavor"),
        ("--model.name=gpt9", "model.name"),
        ("--model.colour=1", "model.colour"),
        ("--optimizer.lr=-1", "optimizer.lr"),
        ("--optimizer.name=adafactorx", "optimizer.name"),
        ("--schedule.name=zigzag", "schedule.name"),
        ("--training.global_batch_size=0", "training.global_batch_size"),
        ("--training.micro_batch_size=5", "training.micro_batch_size"),
        ("--training.seq_len=100000", "training.seq_len"),
        ("--data.source=text", "data.paths"),
        ("--data.paths=['/no/such/file.txt']", "data.paths"),
        ("--data.vocab_size=10", "data.vocab_size"),
        ("--checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("--metrics.jsonl=1", "metrics.jsonl"),
        ("--nosection.key=1", "nosection"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, [override])
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--checkpoint.export_hf=true", "--model.name=based"],
        ["--checkpoint.export_hf=true", "--mup.enabled=true", "--mup.base_dim=64"],
        ["--checkpoint.export_hf=true", "--model.attention=\"hyper\""],
    ],
    ids=["no-hf-architecture", "mup", "hyper-attention"],
)
def test_export_hf_is_refused_up_front_for_models_hugging_face_cannot_hold(overrides):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, overrides)
    assert str(err.value).startswith("checkpoint.export_hf"), str(err.value)
    JobConfig.load(None, overrides[1:])  # the same model without the export is fine


def test_batch_must_divide_by_world_size():
    with pytest.raises(ConfigError, match=r"^training.global_batch_size: 8 is not divisible by the world size 3"):
        JobConfig.load(None, [], world_size=3)


def test_override_syntax():
    assert parse_override("--a.b=3") == (["a", "b"], 3)
    assert parse_override("--a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override("--a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError):
        parse_override("--a.b")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["configs/tiny.toml", "--model.n_heads=5"], "model.n_heads"),
        (["configs/tiny.toml", "--training.global_batch_size=lots"], "training.global_batch_size"),
        (["no/such/config.toml"], "config file 'no/such/config.toml' does not exist"),
        (["--training.steps=two hundred"], "training.steps"),  # a value with a space is still an override
    ],
)
def test_cli_rejects_bad_config_with_one_line_and_exit_2(argv, key, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "train", *argv, f"--run.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"wren: error: {key}")
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir()), "no work may start before the config is valid"


def test_reading_a_recipe_imports_no_torch():
    """`JobConfig.load` (every section, overrides, validation) stays torch-free, so `wren hparams CONFIG` is quick."""
    probe = (
        "import sys\n"
        "from trainer.config import JobConfig\n"
        "cfg = JobConfig.load('configs/tiny.toml', ['--optimizer.name=galore', '--schedule.name=wsd'])\n"
        "cfg.model.build_model_config(cfg.data.vocab_size)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=Path(__file__).resolve().parents[2])
