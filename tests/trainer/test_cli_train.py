"""The `wren train` command end to end: progress, outputs on disk, and launch/train.sh with torchrun."""

import json
import subprocess
import sys

import pytest

from tests.trainer.jobs import tiny_overrides


def test_train_writes_checkpoint_metrics_tensorboard_and_plot(corpus, data_cache, tmp_path):
    overrides = tiny_overrides(
        corpus, data_cache, tmp_path, "cli", metrics__tensorboard=True, metrics__plot=True, eval__every_steps=5, checkpoint__every_steps=5
    )
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "cli"
    out = proc.stdout
    assert "step 10/10" in out and "tok/s" in out and "MFU" in out
    assert f"checkpoint: {run / 'checkpoints' / 'step_00000010'}" in out
    assert "final train loss" in out and f"loss curve: {run / 'loss.png'}" in out
    assert (run / "config.toml").is_file() and (run / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/peak_memory_gib"} <= set().union(*records)
    assert sum("eval/loss" in r for r in records) == 2  # at step 5 and at the end
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert {"memory/param_bytes", "memory/optimizer_state_bytes"} <= set().union(*records)

    # Running the finished run again trains nothing, logs nothing and reports the recorded losses.
    again = subprocess.run([sys.executable, "-m", "trainer.cli", "train", *overrides], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "run already complete at step 10" in again.stdout and "step 1/10" not in again.stdout
    final_train = [r["train/loss"] for r in records if "train/loss" in r][-1]
    final_eval = [r["eval/loss"] for r in records if "eval/loss" in r][-1]
    assert f"final train loss {final_train:.4f}, eval loss {final_eval:.4f}" in again.stdout
    assert (run / "metrics.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]


@pytest.mark.slow
def test_train_sh_runs_two_ranks_under_torchrun(corpus, data_cache, tmp_path):
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "torchrun", training__steps=4)
    proc = subprocess.run(["bash", "launch/train.sh", "--nproc", "2", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2 fully_shard over 2 ranks" in proc.stdout
    assert (tmp_path / "torchrun" / "checkpoints" / "step_00000004").is_dir()


def test_unusable_corpus_is_one_line_error(tmp_path, data_cache):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "only.txt").write_text("one short document\n")
    overrides = tiny_overrides(corpus, data_cache, tmp_path, "bad")
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "train", *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("wren: error: data: "), proc.stderr
    assert "Traceback" not in proc.stderr
