"""Scaling-law fits for sweeps: loss against compute with an irreducible term, optimal lr and batch in
the Step Law form, the optimum of a loss-vs-lr curve, and bootstrap confidence intervals.

* `fit_saturating_power_law`: L(x) = E + A * x^(-alpha) (Kaplan et al. 2020, arXiv 2001.08361,
  Eq. 1.x form with the irreducible loss E of Hoffmann et al. 2022, arXiv 2203.15556, Eq. 2).
  For a fixed E the model is linear in log space, so E is found by a bounded 1-D search on the
  squared error in loss space and (A, alpha) by least squares at each E.
* `fit_step_law`: y = c * N^a * D^b by least squares in log space, the form of the Step Law's
  eta_opt(N, D) = 1.79 N^-0.713 D^0.307 and B_opt = 0.58 D^0.571 (Li et al. 2025, arXiv
  2503.04715); a variable that takes one value only is dropped from the fit (exponent None).
* `optimum_in_log`: the minimiser of a loss-vs-lr (or batch) curve, from a parabola in log x
  through the best point and its neighbours (the Step Law paper's landscapes are convex in log lr).
* `bootstrap`: percentile intervals from refits on resampled points (Step Law: 1000 bootstrap fits).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class PowerLawFit:
    """L(x) = E + A * x^(-alpha) and its root-mean-square residual."""

    E: float
    A: float
    alpha: float
    rmse: float

    def __call__(self, x):
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


@dataclass
class StepLawFit:
    """y = c * N^a * D^b (a or b None when that variable did not vary), with the rms log residual."""

    c: float
    a: float | None
    b: float | None
    rmse_log: float

    def __call__(self, N, D):
        y = self.c * np.ones_like(np.asarray(N, dtype=float))
        if self.a is not None:
            y = y * np.asarray(N, dtype=float) ** self.a
        if self.b is not None:
            y = y * np.asarray(D, dtype=float) ** self.b
        return y


def _log_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (log A, alpha) of log y = log A - alpha log x."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return intercept, -slope


def fit_saturating_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit L = E + A x^-alpha (x > 0, at least 3 points), E in [0, min L)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"a saturating power law needs at least 3 positive points, got {len(x)}")

    def sse(E: float) -> tuple[float, float, float]:
        log_a, alpha = _log_linear(x, y - E)
        residual = y - (E + math.exp(log_a) * x**-alpha)
        return float(residual @ residual), math.exp(log_a), alpha

    high = float(y.min()) * (1 - 1e-9)
    grid = np.linspace(0.0, high, 201)
    best = int(np.argmin([sse(E)[0] for E in grid]))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden-section refinement around the best grid point
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if sse(a)[0] < sse(b)[0]:
            hi = b
        else:
            lo = a
    E = (lo + hi) / 2
    err, A, alpha = sse(E)
    return PowerLawFit(E=E, A=A, alpha=alpha, rmse=math.sqrt(err / len(x)))


def fit_step_law(N: Sequence[float], D: Sequence[float], y: Sequence[float]) -> StepLawFit:
    """Fit y = c N^a D^b in log space; N or D with a single value is left out (None)."""
    N, D, y = (np.asarray(v, dtype=float) for v in (N, D, y))
    columns, names = [np.ones_like(y)], []
    for name, values in (("a", N), ("b", D)):
        if len(np.unique(values)) > 1:
            columns.append(np.log(values))
            names.append(name)
    if len(y) < len(columns) + 1:
        raise ValueError(f"a Step-Law fit with {len(columns)} coefficients needs more than {len(columns)} points, got {len(y)}")
    X = np.stack(columns, axis=1)
    coef, *_ = np.linalg.lstsq(X, np.log(y), rcond=None)
    residual = np.log(y) - X @ coef
    exponents = dict(zip(names, coef[1:]))
    return StepLawFit(c=float(math.exp(coef[0])), a=_opt(exponents.get("a")), b=_opt(exponents.get("b")),
                      rmse_log=float(math.sqrt(residual @ residual / len(y))))


def _opt(value) -> float | None:
    return None if value is None else float(value)


@dataclass
class Optimum:
    """Where a curve is lowest: the interpolated x and loss, and whether it sits on the grid's edge."""

    x: float
    loss: float
    at_edge: bool


def optimum_in_log(xs: Sequence[float], losses: Sequence[float]) -> Optimum:
    """The minimiser of loss(x): a parabola in log x through the best point and its two neighbours.

    Non-finite losses (diverged runs) count as worse than any finite one. When the best point is
    the smallest or largest x, that point is returned with `at_edge` set.
    """
    order = np.argsort(xs)
    x = np.asarray(xs, dtype=float)[order]
    y = np.asarray(losses, dtype=float)[order]
    finite = np.isfinite(y)
    if not finite.any():
        raise ValueError("every run of this curve diverged (non-finite loss)")
    y = np.where(finite, y, np.inf)
    best = int(np.argmin(y))
    if best == 0 or best == len(x) - 1 or not np.isfinite(y[best - 1 : best + 2]).all():
        return Optimum(x=float(x[best]), loss=float(y[best]), at_edge=best in (0, len(x) - 1))
    u = np.log(x[best - 1 : best + 2])
    c2, c1, c0 = np.polyfit(u, y[best - 1 : best + 2], 2)
    if c2 <= 0:
        return Optimum(x=float(x[best]), loss=float(y[best]), at_edge=False)
    u_min = min(max(-c1 / (2 * c2), u[0]), u[2])
    return Optimum(x=float(math.exp(u_min)), loss=float(c0 + c1 * u_min + c2 * u_min**2), at_edge=False)


def bootstrap(
    fit: Callable[[np.ndarray], dict[str, float | None]], n_points: int, *, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each value `fit(indices)` returns, over resamples of the point indices.

    Resamples whose fit fails (too few distinct points) are skipped.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        indices = rng.integers(0, n_points, n_points)
        try:
            with warnings.catch_warnings():  # resamples repeat points; a degenerate refit is expected
                warnings.simplefilter("ignore", np.exceptions.RankWarning)
                values = fit(indices)
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                draws.setdefault(key, []).append(value)
    tail = (1 - level) / 2 * 100
    return {key: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for key, v in draws.items() if len(v) >= 10}
