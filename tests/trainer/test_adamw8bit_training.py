"""`optimizer.name = "adamw8bit"` in real training jobs: it tracks AdamW, holds about a quarter of
AdamW's state bytes, and `wren memory` predicts those bytes."""

from __future__ import annotations

from tests.trainer.jobs import losses, tiny_overrides, train_job
from trainer.config import JobConfig
from trainer.memory import estimate_memory
from trainer.metrics import read_metrics


def _state_bytes(run_dir) -> int:
    return [r["memory/optimizer_state_bytes"] for r in read_metrics(run_dir) if "memory/optimizer_state_bytes" in r][-1]


def test_adamw8bit_trains_like_adamw_with_a_quarter_of_the_state(corpus, data_cache, tmp_path):
    # dim 128 so that every block matrix has at least 4096 elements and gets 8-bit moments.
    shape = dict(model__dim=128, model__ffn_hidden_dim=256, training__steps=12)
    exact = tiny_overrides(corpus, data_cache, tmp_path, "adamw", **shape)
    quantized = tiny_overrides(corpus, data_cache, tmp_path, "adamw8bit", optimizer__name="adamw8bit", **shape)
    train_job(exact)
    train_job(quantized)
    want, got = losses(tmp_path / "adamw"), losses(tmp_path / "adamw8bit")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    for step in want:
        assert abs(got[step] - want[step]) <= 0.02 * want[step], (step, want[step], got[step])
    assert got[12] < got[1] - 0.5, "8-bit training must still learn"

    state_8bit, state_fp32 = _state_bytes(tmp_path / "adamw8bit"), _state_bytes(tmp_path / "adamw")
    assert state_8bit < 0.35 * state_fp32  # codes take 2 bytes per element against 8 (+ fp32 scales, small tensors)
    assert estimate_memory(JobConfig.load(None, quantized), world_size=1).optimizer == state_8bit
