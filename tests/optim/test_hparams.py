"""`wren hparams`: each law against its published formula, N counted like the model, the CLI.

Expected values are written out from the papers' formulas in the tests themselves (or copied from
the worked examples of the reference dossier), never computed by the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from models.llama import Llama, flavors
from optim.hparams import HparamsError, count_non_embedding, parse_count, round_batch
from optim.laws import LAWS, Scale, predict
from trainer.cli import main
from trainer.config import JobConfig


def law(name: str, **scale):
    return LAWS[name](Scale(**scale))


# --- Step Law (Li et al. 2025, arXiv 2503.04715) ---------------------------------------------------

# Worked examples (pretraining-algorithms.md section 6.2): N, D, seq_len, lr and B in tokens with the
# paper's printed constants, and lr with the official CLI's bootstrap-mean constants.
STEP_EXAMPLES = [
    (1e9, 1e11, 2048, 1.6325e-3, 1.1077e6, 1.6624e-3),
    (1e9, 1e11, 4096, 1.6325e-3, 1.1077e6, 1.6624e-3),
    (7e9, 1.4e12, 2048, 9.1656e-4, 4.9988e6, 9.3468e-4),
    (1.07e9, 1e11, 2048, 1.5556e-3, 1.1077e6, 1.5841e-3),
    (4.29e8, 4e10, 2048, 2.2529e-3, 6.5645e5, 2.2930e-3),
    (1e8, 2e9, 2048, 2.5367e-3, 1.1866e5, 2.5777e-3),
    (7e10, 1.4e12, 4096, 1.7748e-4, 4.9988e6, 1.8103e-4),
]


@pytest.mark.parametrize("n, d, seq, lr, batch, lr_official", STEP_EXAMPLES)
def test_step_law_worked_examples(n, d, seq, lr, batch, lr_official):
    p = law("step_law", n_params=n, tokens=d, seq_len=seq)
    assert p.lr == pytest.approx(lr, rel=1e-4)
    assert p.lr == pytest.approx(1.79 * n**-0.713 * d**0.307, rel=1e-12)
    assert p.batch_tokens == pytest.approx(batch, rel=1e-4)
    assert p.batch_tokens == pytest.approx(0.58 * d**0.571, rel=1e-12)
    assert p.batch_sequences == pytest.approx(0.58 * d**0.571 / seq, rel=1e-12)
    # The official CLI's unrounded bootstrap means give a ~1.8 % higher lr; wren pins the printed ones.
    official = math.exp(0.5863077907399267) * n**-0.7129222911869904 * d**0.30749095041206964
    assert official == pytest.approx(lr_official, rel=1e-4)
    assert p.lr / official == pytest.approx(1.0, abs=0.02)


def test_step_law_scaling_ratios_and_fit_box():
    base = law("step_law", n_params=5e8, tokens=2e10)
    more_data = law("step_law", n_params=5e8, tokens=8e10)
    assert more_data.lr / base.lr == pytest.approx(4**0.307)
    assert more_data.batch_tokens / base.batch_tokens == pytest.approx(4**0.571)
    assert not base.extrapolated and law("step_law", n_params=7e9, tokens=1e12).extrapolated


# --- DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954) -----------------------------------------------


@pytest.mark.parametrize("layers, d, ratio", [(8, 512, 0.43), (80, 8192, 0.92)])
def test_deepseek_flops_per_token_reproduces_table_3(layers, d, ratio):
    """6N1 / M of the paper's Table 3 at l_seq = 4096 pins M = 72 L d^2 + 12 L d l_seq (Eq. 2)."""
    from optim.laws import deepseek_flops_per_token

    m = deepseek_flops_per_token(Scale(n_params=12 * layers * d * d, tokens=1, seq_len=4096, n_layers=layers, dim=d))
    assert m == 72 * layers * d * d + 12 * layers * d * 4096
    assert 72 * layers * d * d / m == pytest.approx(ratio, abs=0.005)


def test_deepseek_against_eq_1():
    layers, d, seq, tokens = 24, 2048, 4096, 1e11
    p = law("deepseek", n_params=12 * layers * d * d, tokens=tokens, seq_len=seq, n_layers=layers, dim=d)
    c = (72 * layers * d**2 + 12 * layers * d * seq) * tokens
    assert p.lr == pytest.approx(0.3118 * c**-0.1250, rel=1e-12)
    assert p.batch_tokens == pytest.approx(0.2920 * c**0.3271, rel=1e-12)
    assert p.lr == pytest.approx(7.4256e-4, rel=1e-4) and p.batch_tokens == pytest.approx(2.1361e6, rel=1e-4)
    no_shape = law("deepseek", n_params=1e9, tokens=1e11)  # M = 6N: the attention term needs a shape
    assert no_shape.lr == pytest.approx(0.3118 * (6e9 * 1e11) ** -0.125) and "shape unknown" in no_shape.note


# --- Porian et al. 2024 (arXiv 2406.19146) ---------------------------------------------------------


@pytest.mark.parametrize("n, lr, batch", [(1e8, 4.8775e-3, 3.1881e5), (1e9, 2.1291e-3, 1.6089e6), (7e9, 1.0567e-3, 6.3188e6)])
def test_porian_against_published_fit(n, lr, batch):
    p = law("porian", n_params=n, tokens=20 * n)
    assert p.lr == pytest.approx(3.7 * n**-0.36, rel=1e-12) and p.lr == pytest.approx(lr, rel=1e-4)
    assert p.batch_tokens == pytest.approx(0.00037 * n**0.703 * 2048, rel=1e-12)
    assert p.batch_tokens == pytest.approx(batch, rel=1e-4)


def test_porian_counts_the_head_and_matches_the_authors_tuned_values():
    shaped = law("porian", n_params=1e8, tokens=2e9, vocab_size=32000, dim=1024)
    assert shaped.lr == pytest.approx(3.7 * (1e8 + 32000 * 1024) ** -0.36)
    # make_paper.ipynb (formll/resolving-scaling-law-discrepancies): N = 57,384,960 -> lr 5.9e-3, bs 104 seqs.
    p = law("porian", n_params=57_384_960, tokens=20 * 57_384_960, seq_len=2048)
    assert p.lr == pytest.approx(5.9e-3, rel=0.02) and p.batch_sequences == pytest.approx(104, rel=0.02)


# --- Kaplan et al. 2020 (arXiv 2001.08361) ---------------------------------------------------------


@pytest.mark.parametrize("n, lr", [(1e8, 6.6932e-4), (1e9, 3.4810e-4), (7e9, 7.6650e-5)])
def test_kaplan_lr_eq_d1(n, lr):
    p = law("kaplan", n_params=n, tokens=1e10)
    assert p.lr == pytest.approx(0.003239 - 0.0001395 * math.log(n), rel=1e-12)
    assert p.lr == pytest.approx(lr, rel=1e-4)
    assert p.batch_tokens is None and "--loss" in p.note


@pytest.mark.parametrize("loss, batch", [(3.0, 1.0691e6), (2.5, 2.5473e6), (2.0, 7.3715e6)])
def test_kaplan_critical_batch_eq_1_4(loss, batch):
    p = law("kaplan", n_params=1e9, tokens=1e10, loss=loss)
    assert p.batch_tokens == pytest.approx(2e8 * loss ** (-1 / 0.21), rel=1e-12)
    assert p.batch_tokens == pytest.approx(batch, rel=1e-4)


def test_kaplan_lr_is_not_applicable_past_its_zero():
    p = law("kaplan", n_params=2e10, tokens=1e12)
    assert p.lr is None and p.batch_tokens is None and not p.applicable


def test_predict_rejects_unknown_law():
    assert [p.law for p in predict(Scale(n_params=1e9, tokens=1e11))] == ["step_law", "deepseek", "porian", "kaplan"]
    with pytest.raises(KeyError, match="known: step_law"):
        predict(Scale(n_params=1e9, tokens=1e11), ["chinchilla"])


# --- N from a config -------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", list(flavors))
def test_count_matches_the_model_built_on_meta(flavor):
    cfg = dataclasses.replace(flavors[flavor], vocab_size=8192)
    with torch.device("meta"):
        model = Llama(cfg)
    blocks = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.") and p.ndim == 2)
    assert count_non_embedding(cfg) == blocks
    norms = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    assert model.num_params(exclude_embeddings=True) == blocks + norms + head


def test_count_is_the_step_law_form_for_full_attention():
    cfg = dataclasses.replace(flavors["125M"], vocab_size=8192)  # MHA: 4 h^2 + 3 h d_ff per layer
    assert count_non_embedding(cfg) == cfg.n_layers * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_hidden_dim)


# --- CLI -------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(["hparams", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_equals_the_library(capsys):
    code, out, _ = run_cli(capsys, "--params", "1B", "--tokens", "100B", "--seq-len", "4096", "--json")
    assert code == 0
    result = json.loads(out)
    expected = predict(Scale(n_params=1e9, tokens=1e11, seq_len=4096))
    assert [p["law"] for p in result["predictions"]] == [p.law for p in expected]
    for got, want in zip(result["predictions"], expected):
        assert got == want.to_dict()
    assert result["recommended"]["lr"] == 0.00163 and result["recommended"]["global_batch_size"] == 270


def test_text_table_lists_each_law_with_formula_and_source(capsys):
    code, out, _ = run_cli(capsys, "--params", "1e9", "--tokens", "1e11", "--law", "step_law", "kaplan", "--loss", "2.5")
    assert code == 0
    assert "step_law  1.632e-03  1.108e+06" in out and "540.9" in out
    assert "arXiv 2503.04715" in out and "arXiv 2001.08361" in out and "deepseek" not in out
    assert "2.547e+06" in out  # Kaplan's critical batch at L = 2.5


def test_config_path_counts_n_and_reads_d(capsys):
    code, out, _ = run_cli(capsys, "configs/tiny.toml", "--training.steps=1000", "--training.global_batch_size=16", "--model.n_layers=6", "--json")
    assert code == 0
    inputs = json.loads(out)["inputs"]
    cfg = JobConfig.load("configs/tiny.toml", ["--training.steps=1000", "--training.global_batch_size=16", "--model.n_layers=6"])
    model_cfg = cfg.model.build_model_config(cfg.data.vocab_size)
    assert inputs["n_params"] == 6 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 688) == count_non_embedding(model_cfg)
    assert inputs["tokens"] == 1000 * 16 * 256 and inputs["seq_len"] == 256 and inputs["vocab_size"] == 8192


def test_apply_writes_a_loadable_config_that_keeps_d(capsys, tmp_path):
    out = tmp_path / "applied.toml"
    overrides = ["--training.steps=2000", "--training.global_batch_size=16", "--training.micro_batch_size=2"]
    code, text, _ = run_cli(capsys, "--apply", "configs/tiny.toml", "--out", str(out), "--world-size", "2", *overrides)
    assert code == 0 and f"wrote {out}" in text
    n, d = 2_899_968, 2000 * 16 * 256
    seqs = 0.58 * d**0.571 / 256
    new = JobConfig.load(out, world_size=2)
    assert new.optimizer.lr == float(f"{1.79 * n**-0.713 * d**0.307:.3g}")
    assert new.training.global_batch_size == 4 * round(seqs / 4) == round_batch(seqs, 4)  # world 2 x micro 2
    assert new.training.steps == round(d / (new.training.global_batch_size * 256))
    assert new.model == JobConfig.load("configs/tiny.toml").model  # nothing else changed
    code, _, err = run_cli(capsys, "--apply", "configs/tiny.toml", "--out", str(out))
    assert code == 2 and "exists; pass --force" in err


def test_apply_refuses_a_config_it_would_make_invalid(capsys, tmp_path):
    out = tmp_path / "bad.toml"
    overrides = ["--training.seq_len=8", "--training.global_batch_size=1", "--schedule.warmup_steps=100"]
    code, _, err = run_cli(capsys, "--apply", "configs/tiny.toml", "--out", str(out), "--training.steps=1000", *overrides)
    assert code == 2 and "schedule.warmup_steps" in err and not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--params", "0", "--tokens", "1e11"], "--params: N must be a positive"),
        (["--params=-5e8", "--tokens", "1e11"], "--params: N must be a positive"),
        (["--params", "2e13", "--tokens", "1e11"], "is absurd"),
        (["--params", "1e9", "--tokens", "0"], "--tokens: D must be a positive"),
        (["--params", "1e9", "--tokens", "5e15"], "is absurd"),
        (["--params", "1e9", "--tokens", "nan"], "--tokens: cannot read 'nan'"),
        (["--params", "12X", "--tokens", "1e11"], "cannot read '12X'"),
        (["--params", "1e9"], "give --params N and --tokens D"),
        (["--params", "1e9", "--tokens", "1e11", "--law", "chinchilla"], "known: step_law, deepseek, porian, kaplan"),
        (["--params", "1e9", "--tokens", "1e11", "--seq-len", "0"], "--seq-len"),
        (["--params", "1e9", "--tokens", "1e11", "--loss", "-1"], "--loss"),
        (["--params", "1e9", "--tokens", "1e11", "--training.steps=3"], "overrides need a CONFIG"),
        (["configs/tiny.toml", "--params", "1e9"], "do not go with a CONFIG"),
        (["--apply", "configs/tiny.toml"], "--apply needs --out"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("wren: error: ") and message in err


def test_sizes_read_with_suffixes():
    assert [parse_count(t, "--x") for t in ("1.2e9", "1.2B", "300M", "20T", "7k", "1_000")] == pytest.approx(
        [1.2e9, 1.2e9, 3e8, 2e13, 7e3, 1e3]
    )
    with pytest.raises(HparamsError):
        parse_count("1.2.3B", "--x")


def test_console_command_is_fast_path_and_fails_cleanly():
    """Without a config no torch is imported (that is what keeps it under a second); errors exit 2."""
    code = (
        "import sys; from trainer.cli import main; "
        "rc = main(['hparams', '--params', '1e9', '--tokens', '1e11']); "
        "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]"
    )
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    argv = [sys.executable, "-m", "trainer.cli", "hparams", "--params", "-1", "--tokens", "1e9"]
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
