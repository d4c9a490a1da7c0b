"""Scaling-law fits recover known laws from noisy synthetic sweeps (exponents within 3 %)."""

import math

import numpy as np
import pytest

from optim.fits import bootstrap, fit_saturating_power_law, fit_step_law, optimum_in_log


def test_saturating_power_law_recovers_its_exponent_and_floor():
    rng = np.random.default_rng(0)
    E, A, alpha = 1.69, 406.4, 0.34  # Chinchilla-like (Hoffmann et al. 2022, Eq. 10, N-term)
    x = np.logspace(6, 10, 24)
    y = (E + A * x**-alpha) * np.exp(rng.normal(0, 0.003, x.size))
    fit = fit_saturating_power_law(x, y)
    assert fit.alpha == pytest.approx(alpha, rel=0.03)
    assert fit.E == pytest.approx(E, rel=0.03)
    ci = bootstrap(lambda i: {"alpha": fit_saturating_power_law(x[i], y[i]).alpha}, len(x), samples=200)
    low, high = ci["alpha"]
    assert low <= fit.alpha <= high and high - low < 0.1 * alpha  # a real, informative interval
    assert low * 0.97 < alpha < high * 1.03


def test_step_law_form_recovers_the_step_law_exponents():
    rng = np.random.default_rng(1)
    N = np.repeat([2e8, 4e8, 8e8, 1.6e9], 4)
    D = np.tile([4e9, 1e10, 3e10, 1e11], 4)
    eta = 1.79 * N**-0.713 * D**0.307 * np.exp(rng.normal(0, 0.02, N.size))  # Step Law, arXiv 2503.04715
    fit = fit_step_law(N, D, eta)
    assert fit.a == pytest.approx(-0.713, rel=0.03)
    assert fit.b == pytest.approx(0.307, rel=0.03)
    batch = 0.58 * D**0.571 * np.exp(rng.normal(0, 0.02, D.size))
    fit_b = fit_step_law(np.full_like(D, 1e9), D, batch)  # N constant: dropped from the fit
    assert fit_b.a is None and fit_b.b == pytest.approx(0.571, rel=0.03)
    ci = bootstrap(lambda i: {"a": fit_step_law(N[i], D[i], eta[i]).a}, len(N), samples=200)
    low, high = ci["a"]
    assert low <= fit.a <= high and high - low < 0.2
    assert low * 1.03 < -0.713 < high * 0.97


def test_optima_of_noisy_lr_sweeps_feed_a_law_that_recovers_its_exponent():
    # Loss is a parabola in log lr around eta_opt = 0.5 * N^-0.5 (+ noise); the grid brackets it.
    rng = np.random.default_rng(2)
    Ns, optima = [1e6, 4e6, 1.6e7, 6.4e7], []
    for N in Ns:
        eta_opt = 0.5 * N**-0.5
        lrs = eta_opt * 2.0 ** np.arange(-3, 4)
        loss = 3.0 + 0.1 * np.log(lrs / eta_opt) ** 2 + rng.normal(0, 1e-4, lrs.size)
        best = optimum_in_log(lrs, loss)
        assert not best.at_edge
        optima.append(best.x)
    fit = fit_step_law(Ns, [1e9] * len(Ns), optima)
    assert fit.a == pytest.approx(-0.5, rel=0.03) and fit.b is None


def test_optimum_at_the_edge_and_diverged_runs():
    best = optimum_in_log([1e-3, 3e-3, 1e-2], [2.0, 2.5, math.nan])
    assert best.at_edge and best.x == 1e-3
    with pytest.raises(ValueError, match="diverged"):
        optimum_in_log([1e-3, 1e-2], [math.nan, math.inf])
    with pytest.raises(ValueError, match="at least 3"):
        fit_saturating_power_law([1, 2], [3, 2])
