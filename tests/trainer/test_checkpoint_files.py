"""Checkpoint files: complete before latest, pruning, and no code run while reading metadata."""

import pickle

import pytest
import torch

from trainer.checkpoint import Checkpointer, CheckpointError
from trainer.distributed import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)


def _state(value: float) -> dict:
    return {"w": torch.full((3, 2), value), "step": torch.tensor(int(value))}


def test_save_marks_latest_and_keeps_last_k(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2, env=ENV)
    assert ckpt.latest() is None
    for step in (1, 2, 3):
        ckpt.save(step, _state(step))
    assert ckpt.latest().name == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    loaded = _state(0)
    ckpt.load(ckpt.latest(), loaded)
    assert torch.equal(loaded["w"], torch.full((3, 2), 3.0))
    assert int(loaded["step"]) == 3


def test_interrupted_save_leaves_previous_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3, env=ENV)
    ckpt.save(1, _state(1))
    # A save killed midway leaves only a .tmp directory behind; latest still names step 1.
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest().name == "step_00000001"
    ckpt.save(2, _state(2))
    assert ckpt.latest().name == "step_00000002"
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_latest_pointing_at_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_00000005").mkdir(parents=True)
    (tmp_path / "latest").write_text("step_00000005\n")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Checkpointer(tmp_path, keep_last=1, env=ENV).latest()


class _Exploit:
    def __reduce__(self):
        return (print, ("owned",))


def test_metadata_that_would_run_code_is_refused(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path, keep_last=1, env=ENV)
    path = ckpt.save(1, _state(1))
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="builtins.print"):
        ckpt.load(path, _state(0))
    assert "owned" not in capsys.readouterr().out


def test_truncated_metadata_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1, env=ENV)
    path = ckpt.save(1, _state(1))
    data = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load(path, _state(0))
