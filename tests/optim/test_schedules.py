"""Schedules against the papers' formulas and reference code, and WSD resume and branching runs.

Oracles: the closed forms written out here (SGDR cosine, MiniCPM's WSD, the Power scheduler),
the worked values of the dossier (references/pretraining-algorithms.md, sections 5.1 and 5.2),
transformers' `get_wsd_schedule` lambda, and dolomite-engine's PowerScheduler factor.
"""

import math

import pytest

from optim.schedules import ScheduleConfig, build_schedule


def lrs(cfg, *, peak=1.0, total=100, tokens_per_step=1, seq_len=1):
    """The lr of every step of a run (0-based steps, tokens before each step)."""
    schedule = build_schedule(cfg, peak_lr=peak, total_steps=total, tokens_per_step=tokens_per_step, seq_len=seq_len)
    return [schedule.lr(step, step * tokens_per_step) for step in range(total)]


def test_warmup_is_linear_to_peak():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    # s / W for the 1-based step s (MiniCPM Eq. 1): the first step trains at 1/W of the peak.
    assert [cfg.lr_multiplier(s - 1, 100) for s in range(1, 11)] == pytest.approx([s / 10 for s in range(1, 11)])


def test_cosine_follows_sgdr_half_cosine_from_warmup_to_the_last_step():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    for s in (10, 35, 60, 85, 110):
        t = (s - 10) / 100
        expected = 0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2
        assert cfg.lr_multiplier(s - 1, total) == pytest.approx(expected)
    assert cfg.lr_multiplier(total - 1, total) == pytest.approx(0.1)


def test_linear_and_constant():
    lin = ScheduleConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin.lr_multiplier(4, 10) == pytest.approx(0.5)
    assert lin.lr_multiplier(9, 10) == pytest.approx(0.0)
    const = ScheduleConfig(name="constant", warmup_steps=4)
    assert const.lr_multiplier(1, 50) == pytest.approx(0.5)
    assert const.lr_multiplier(40, 50) == 1.0


def test_wsd_matches_minicpm_worked_example_with_half_life_decay():
    # MiniCPM (arXiv 2404.06395, Sec. 4.1): W = 1000, T = 90000, S = 100000, eta = 0.01,
    # f(s - T) = 0.5^((s - T) / 5000); values from the dossier's section 5.1.
    cfg = ScheduleConfig(name="wsd", warmup_steps=1000, decay_fraction=0.1, decay_shape="half-life", decay_half_life_steps=5000)
    schedule = build_schedule(cfg, peak_lr=0.01, total_steps=100_000, tokens_per_step=1)
    at = {s: schedule.lr(s - 1, s - 1) for s in (500, 1000, 1001, 45_000, 90_000, 90_001, 95_000, 100_000)}
    assert at[500] == pytest.approx(5e-3)
    assert at[1000] == at[1001] == at[45_000] == at[90_000] == pytest.approx(1e-2)
    assert at[90_001] == pytest.approx(0.01 * 0.5 ** (1 / 5000))
    assert at[95_000] == pytest.approx(5e-3)
    assert at[100_000] == pytest.approx(2.5e-3)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_matches_transformers_get_wsd_schedule(shape, min_lr_ratio):
    from transformers.optimization import _get_wsd_scheduler_lambda

    warmup, total, decay = 5, 40, 10
    cfg = ScheduleConfig(name="wsd", warmup_steps=warmup, decay_fraction=decay / total, decay_shape=shape, min_lr_ratio=min_lr_ratio)
    ours = lrs(cfg, total=total)
    reference = [
        _get_wsd_scheduler_lambda(
            s,
            num_warmup_steps=warmup,
            num_stable_steps=total - warmup - decay,
            num_decay_steps=decay,
            warmup_type="linear",
            decay_type=shape,
            min_lr_ratio=min_lr_ratio,
            num_cycles=0.5,
        )
        for s in range(1, total + 1)
    ]
    # transformers warms up from min_lr_ratio instead of 0; the stable and decay phases coincide.
    first = 0 if min_lr_ratio == 0 else warmup
    assert ours[first:] == pytest.approx(reference[first:])
    assert ours[-1] == pytest.approx(min_lr_ratio)
    assert ours[total - decay - 1] == 1.0  # the last stable step T


def test_wsd_exponential_runs_from_one_to_min_lr_ratio_like_dolomite():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.5, decay_shape="exponential", min_lr_ratio=0.05)
    got = lrs(cfg, total=20)
    e, m = math.e, 0.05
    for s in range(11, 21):  # dolomite: a exp(-x / t) + b over the decay window of t = 10 steps
        x = s - 10
        assert got[s - 1] == pytest.approx((1 - m) * e / (e - 1) * math.exp(-x / 10) + (m * e - 1) / (e - 1))
    assert got[-1] == pytest.approx(0.05)


def power_formula(n, beta, a=4.0, b=-0.51, eta_max=0.02):
    return min(eta_max, beta * a * n**b)


def test_power_lr_matches_the_worked_table():
    # Dossier 5.2 (a = 4, b = -0.51, eta_max = 0.02), beta in sequences, n in tokens.
    table = {256: {1e9: 0.02, 1e10: 8.134e-3, 1e11: 2.514e-3, 1e12: 7.768e-4, 1e13: 2.400e-4},
             1024: {1e10: 0.02, 1e11: 1.005e-2, 1e12: 3.107e-3, 1e13: 9.602e-4}}
    from optim.schedules import power_lr

    cfg = ScheduleConfig(name="power", power_a=4.0, power_b=-0.51)
    for beta, row in table.items():
        for n, want in row.items():
            assert power_lr(cfg, n, beta, 0.02) == pytest.approx(want, rel=1e-3)


def test_power_schedule_warmup_stable_decay_against_the_formula_and_dolomite():
    seq_len, beta, total, warmup = 1024, 64, 200, 10
    tps = seq_len * beta
    cfg = ScheduleConfig(name="power", warmup_steps=warmup, power_a=4.0, power_b=-0.51, decay_fraction=0.1,
                         decay_shape="linear", min_lr_ratio=0.0)
    got = lrs(cfg, peak=0.02, total=total, tokens_per_step=tps, seq_len=seq_len)
    n_warm = warmup * tps
    for s in range(1, warmup + 1):  # linear to the power-law value at the end of warmup
        assert got[s - 1] == pytest.approx(s * tps / n_warm * power_formula(n_warm, beta))
    # dolomite-engine PowerScheduler: lr0 * min(1, (a_d / lr0) (step * c)^b), a_d = a * beta, c = beta * seq_len.
    for s in (warmup, 50, 120, 180):
        assert got[s - 1] == pytest.approx(0.02 * min(1.0, (4.0 * beta / 0.02) * (s * tps) ** -0.51))
    start = 180 * tps  # the last 10 % of 200 steps' tokens decay linearly to 0
    for s in (181, 190, 200):
        assert got[s - 1] == pytest.approx(power_formula(start, beta) * (1 - (s * tps - start) / (20 * tps)))
    assert got[-1] == pytest.approx(0.0, abs=1e-12)


def test_power_lr_is_a_function_of_tokens_and_batch_size_not_of_steps():
    cfg = ScheduleConfig(name="power", warmup_steps=0, decay_fraction=0.01, power_a=4.0, power_b=-0.51)
    small = build_schedule(cfg, peak_lr=1.0, total_steps=10_000, tokens_per_step=8 * 64, seq_len=64)  # beta = 8
    large = build_schedule(cfg, peak_lr=1.0, total_steps=10_000, tokens_per_step=16 * 64, seq_len=64)  # beta = 16
    n = 2**20  # after the same number of tokens: half the steps at twice the batch ...
    lr_small = small.lr(n // (8 * 64) - 1, n - 8 * 64)
    lr_large = large.lr(n // (16 * 64) - 1, n - 16 * 64)
    assert lr_small == pytest.approx(power_formula(n, 8, eta_max=1.0))
    assert lr_large == pytest.approx(2 * lr_small)  # ... the lr is proportional to beta (Shen et al. 2024)


def test_power_without_the_sequence_length_is_refused():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="^schedule.name: power needs the sequence length"):
        build_schedule(ScheduleConfig(name="power"), peak_lr=1.0, total_steps=10, tokens_per_step=8)


@pytest.mark.parametrize("name", ["wsd", "power"])
def test_state_round_trip_mid_decay_gives_the_uninterrupted_lrs(name):
    cfg = ScheduleConfig(name=name, warmup_steps=3, decay_fraction=0.5, min_lr_ratio=0.0)
    kwargs = dict(peak_lr=0.02, total_steps=30, tokens_per_step=64, seq_len=8)
    reference = build_schedule(cfg, **kwargs)
    want = [reference.lr(step, step * 64) for step in range(30)]
    first = build_schedule(cfg, **kwargs)
    got = [first.lr(step, step * 64) for step in range(22)]  # stop in the decay phase
    state = first.state_dict()
    assert all(v.dtype.is_floating_point is False and v.ndim == 0 for v in state.values())
    resumed = build_schedule(cfg, **kwargs)
    resumed.load_state_dict(state)
    got += [resumed.lr(step, step * 64) for step in range(22, 30)]
    assert got == want


def test_branching_a_decay_starts_it_at_the_loaded_step():
    source = build_schedule(ScheduleConfig(name="wsd", warmup_steps=2), peak_lr=1.0, total_steps=1000, tokens_per_step=4)
    for step in range(40):
        source.lr(step, step * 4)
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, decay_shape="linear", min_lr_ratio=0.0)
    cfg.decay_from = "unused-by-the-schedule"  # only its presence matters here
    branch = build_schedule(cfg, peak_lr=1.0, total_steps=50, tokens_per_step=4)
    branch.load_state_dict(source.state_dict())
    assert [branch.lr(step, step * 4) for step in range(40, 50)] == pytest.approx([1 - s / 10 for s in range(1, 11)])
    # A decay-phase checkpoint of the source cannot be branched.
    late = build_schedule(ScheduleConfig(name="wsd", warmup_steps=2), peak_lr=1.0, total_steps=50, tokens_per_step=4)
    for step in range(48):
        late.lr(step, step * 4)
    again = build_schedule(cfg, peak_lr=1.0, total_steps=60, tokens_per_step=4)
    with pytest.raises(ValueError, match="already in its decay phase"):
        again.load_state_dict(late.state_dict())


@pytest.mark.parametrize(
    "fields, key",
    [
        (dict(name="wsd", decay_fraction=0.0), "decay_fraction"),
        (dict(name="wsd", decay_shape="zigzag"), "decay_shape"),
        (dict(name="wsd", decay_shape="half-life"), "decay_half_life_steps"),
        (dict(name="power", power_b=0.5), "power_b"),
        (dict(name="cosine", decay_from="/nonexistent"), "decay_from"),
        (dict(name="wsd", decay_from="/nonexistent"), "decay_from"),
    ],
)
def test_bad_config_names_the_field(fields, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        ScheduleConfig(**fields).validate()


# --- real runs: resume mid-decay and a branched decay ------------------------------------------


def _records(run_dir):
    from trainer.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def test_wsd_run_resumed_mid_decay_equals_the_uninterrupted_run(corpus, data_cache, tmp_path):
    from tests.trainer.jobs import tiny_overrides, train_job
    from trainer.checkpoint import LATEST

    common = dict(training__steps=12, schedule__name="wsd", schedule__decay_fraction=0.5, checkpoint__every_steps=3,
                  checkpoint__keep_last=4, parallel__num_threads=1)
    resumed = tiny_overrides(corpus, data_cache, tmp_path, "resumed", **common)
    train_job(resumed)
    want = _records(tmp_path / "resumed")  # the uninterrupted run, read before the resumed tail rewrites it
    checkpoints = tmp_path / "resumed" / "checkpoints"
    (checkpoints / LATEST).write_text("step_00000009")  # decay runs over steps 7..12: resume at 9
    import shutil

    shutil.rmtree(checkpoints / "step_00000012")
    train_job(resumed)
    got = _records(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 13))
    assert [got[s]["train/lr"] for s in got] == [want[s]["train/lr"] for s in want]
    assert want[12]["train/lr"] < want[9]["train/lr"] < want[6]["train/lr"]  # 9 really is mid-decay
    assert [got[s]["train/loss"] for s in got] == [want[s]["train/loss"] for s in want]


def test_decay_from_branches_a_decay_from_a_stable_checkpoint(corpus, data_cache, tmp_path):
    from tests.trainer.jobs import tiny_overrides, train_job

    peak = 3e-3
    common = dict(schedule__name="wsd", schedule__decay_shape="linear", schedule__min_lr_ratio=0.0,
                  optimizer__lr=peak, parallel__num_threads=1)
    train_job(tiny_overrides(corpus, data_cache, tmp_path, "main", training__steps=16, schedule__decay_fraction=0.25,
                             checkpoint__every_steps=4, checkpoint__keep_last=4, **common))
    stable = tmp_path / "main" / "checkpoints" / "step_00000008"
    train_job(tiny_overrides(corpus, data_cache, tmp_path, "branch", training__steps=12, schedule__decay_from=str(stable), **common))
    main, branch = _records(tmp_path / "main"), _records(tmp_path / "branch")
    assert sorted(branch) == [9, 10, 11, 12]  # continues the main run's step counter
    # The branch decays linearly from the peak over steps 9..12 (T = 8, S = 12) ...
    assert [branch[s]["train/lr"] for s in branch] == pytest.approx([peak * (1 - (s - 8) / 4) for s in range(9, 13)])
    assert main[9]["train/lr"] == main[12]["train/lr"] == pytest.approx(peak)  # ... while the main run is stable
    # ... from the main run's weights and data position: step 9's loss (before its update) is the same.
    assert branch[9]["train/loss"] == main[9]["train/loss"]
    assert branch[9]["data/tokens_consumed"] == main[9]["data/tokens_consumed"]


def test_decay_from_a_decay_phase_checkpoint_is_a_clear_error(corpus, data_cache, tmp_path):
    import subprocess
    import sys

    from tests.trainer.jobs import tiny_overrides, train_job

    common = dict(schedule__name="wsd", parallel__num_threads=1)
    train_job(tiny_overrides(corpus, data_cache, tmp_path, "main", training__steps=8, schedule__decay_fraction=0.5, **common))
    late = tmp_path / "main" / "checkpoints" / "step_00000008"
    branch = tiny_overrides(corpus, data_cache, tmp_path, "branch", training__steps=12, schedule__decay_from=str(late), **common)
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "train", *branch], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "already in its decay phase" in result.stderr and "Traceback" not in result.stderr
