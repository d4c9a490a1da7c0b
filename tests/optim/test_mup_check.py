"""`wren mup-check`: under muP the activation curves are flat in width, under the standard parametrisation not.

Flatness is measured on the numbers the command writes beside its PNG: the least-squares slope
of log mean|activation| against log width, for every block's attention, MLP and output.
"""

import json
import subprocess
import sys

from optim.mup_check import CoordCheck
from trainer.config_loader import override_args


def test_coord_check_is_flat_under_mup_and_grows_without(corpus, data_cache, tmp_path):
    overrides = override_args({
        "run.name": "cc", "run.output_dir": str(tmp_path), "data.source": "text", "data.paths": [str(corpus)],
        "data.vocab_size": 512, "data.cache_dir": str(data_cache), "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "training.seq_len": 32, "training.global_batch_size": 8, "mup.base_dim": 32,
    })
    out = tmp_path / "cc.png"
    cmd = [sys.executable, "-m", "trainer.cli", "mup-check", "--widths", "32,64,128", "--steps", "3", "--seeds", "2",
           "--lr", "3e-3", "--out", str(out), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check = CoordCheck(**json.loads(out.with_suffix(".json").read_text()))
    hidden = [m for m in check.l1["mup"] if m.startswith("layers.")]
    assert len(hidden) == 6  # 2 blocks x (attention, feed_forward, block output)
    for step in range(3):
        # Standard parametrisation: some hidden activations grow at least ~linearly with width ...
        assert max(check.slope("standard", m, step) for m in hidden) > 0.8, step
        # ... while under muP every one stays within width^0.2 (2 seeds of noise).
        assert check.max_hidden_slope("mup", step) < 0.2, (step, [check.slope("mup", m, step) for m in hidden])
    assert "(flat)" in result.stdout.splitlines()[-1] and "NOT flat" in result.stdout.splitlines()[-2]


def test_bad_widths_are_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "mup-check", "--widths", "64"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "--widths" in result.stderr and "Traceback" not in result.stderr
