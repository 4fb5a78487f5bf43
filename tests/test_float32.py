"""float32 against float64 on the state-space solvers' hard problems: the accuracy targets, and a
ConditioningWarning wherever float32 cannot reach them.

Targets (float32 inputs, exactly representable, given to both precisions): gradient in ``x``
within 1e-3 in relative norm and 1e-2 of its largest entry in the worst one, value within 1e-4.
Problems: the 3-D curve seen along camera rays (curve kernel, rank-2 blocks ``(I − rrᵀ)/0.01``),
a helix seen by 36 cameras with 40 points over wide spans, and Matérn series sampled densely
(``λh`` down to 2e-3, where ``P∞ − A P∞ Aᵀ`` loses everything) with rank-deficient or isotropic
noise. These run in the float64 pass (the reference needs float64).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, testing

CURVE = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)


def camera_curve(n, span, sigma=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) + sigma * rng.normal(size=(n, 3))
    rays = rng.normal(size=(n, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    return CURVE, x, y, (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / sigma


def helix_cameras(span, n=40, sigma=0.01, seed=0):
    """Each point seen along the ray from one of 36 cameras on a circle around the helix."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    curve = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1)
    angles = np.linspace(0.0, 2.0 * np.pi, 36, endpoint=False)
    cameras = np.stack([5.0 * np.cos(angles), 5.0 * np.sin(angles), np.zeros(36)], axis=1)
    rays = curve - cameras[rng.integers(0, 36, n)]
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    y = curve + sigma * rng.normal(size=(n, 3))
    return CURVE, x, y, (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / sigma


def matern_series(order, n, span, isotropic, sigma=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * np.sin(0.5 * x)], axis=1) + sigma * rng.normal(size=(n, 3))
    kernel = (kernels.Matern32 if order == 3 else kernels.Matern52)(1.0, 1.0)
    if isotropic:
        blocks = np.broadcast_to(np.eye(3) / sigma, (n, 3, 3))
    else:
        rays = rng.normal(size=(n, 3))
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / sigma
    return kernel, x, y, blocks


def _as(dtype, kernel, x, y, blocks):
    cast = lambda a: jnp.asarray(np.asarray(a, np.float32), dtype)  # noqa: E731
    return jax.tree_util.tree_map(cast, kernel), cast(x), cast(y), noise.PerPoint(cast(blocks))


@functools.cache
def _value_and_grad(solver):
    return jax.jit(jax.value_and_grad(functools.partial(gg.precision_form_log_likelihood, solver=solver), argnums=1))


def float32_errors(problem, solver):
    """``(value, gradient norm, worst entry)`` relative errors of float32, and whether it warned."""
    fn = _value_and_grad(solver)
    testing.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v32, g32 = jax.block_until_ready(fn(*_as(jnp.float32, *problem)))
    v64, g64 = fn(*_as(jnp.float64, *problem))
    g32, g64 = np.asarray(g32, np.float64), np.asarray(g64)
    assert np.isfinite(v32) and np.all(np.isfinite(g32))
    warned = any(issubclass(w.category, gg.ConditioningWarning) for w in caught)
    return (
        abs(float(v32) - float(v64)) / abs(float(v64)),
        np.linalg.norm(g32 - g64) / np.linalg.norm(g64),
        np.max(np.abs(g32 - g64)) / np.max(np.abs(g64)),
        warned,
    )


def assert_meets_targets(problem, solver, may_warn=False):
    """Within the targets; and silent unless ``may_warn`` (the estimate errs on the safe side:
    over 230 problems it also fired for 26 whose gradient was right to 2.5e-5 … 7.4e-4)."""
    value, norm, worst, warned = float32_errors(problem, solver)
    report = f"value {value:.1e}, gradient {norm:.1e} (worst {worst:.1e}), warned={warned}"
    assert value <= 1e-4 and norm <= 1e-3 and worst <= 1e-2, report
    assert may_warn or not warned, report


@pytest.mark.parametrize(
    "solver, n, span",
    [
        ("markov", 2000, 20.0),
        pytest.param("markov", 20_000, 200.0, marks=pytest.mark.slow),
        # the associative scans at n = 2·10⁴ compiled for 210 s: the long series is the sequential one's
        pytest.param("markov-parallel", 2000, 20.0, marks=pytest.mark.slow),
    ],
)
def test_camera_ray_curve_meets_the_float32_targets(solver, n, span):
    """The issue's table: the covariance form gave 3.7e-3 and 1.9e-3 here (worst 2.5e-2, 5.4e-2)."""
    assert_meets_targets(camera_curve(n, span), solver)


@pytest.mark.parametrize(
    "span", [300.0, *(pytest.param(s, marks=pytest.mark.slow) for s in (3.0, 10.0, 30.0, 100.0))]
)
@pytest.mark.parametrize("solver", ["markov", pytest.param("markov-parallel", marks=pytest.mark.slow)])
def test_helix_seen_by_cameras_meets_the_float32_targets(solver, span):
    """40 points, gaps up to ~30 under the cubic spline: the covariance form flipped the sign of
    11–13 of the 40 gradient entries here at every span. Across gaps of 7.5 (span 300) the
    predicted spread of the curve reaches 5e4 noise standard deviations and the estimate fires,
    though the gradient is right to 7e-5."""
    assert_meets_targets(helix_cameras(span), solver, may_warn=span >= 100)


@pytest.mark.parametrize(
    "order, n, span, isotropic",
    [
        pytest.param(5, 2000, 2.0, False, marks=pytest.mark.slow),  # λh = 2e-3: the covariance form gave 1.6e-2
        pytest.param(3, 2000, 20.0, True, marks=pytest.mark.slow),
        pytest.param(3, 2000, 2.0, False, marks=pytest.mark.slow),
        pytest.param(5, 2000, 20.0, True, marks=pytest.mark.slow),
        pytest.param(5, 200, 200.0, False, marks=pytest.mark.slow),  # gaps of ~1 lengthscale
    ],
)
def test_dense_matern_series_meet_the_float32_targets(order, n, span, isotropic):
    assert_meets_targets(matern_series(order, n, span, isotropic), "markov")


def test_where_float32_cannot_reach_the_targets_it_warns():
    """Hard cases of the 230 measured: wide gaps with small noise, long spans; whatever the
    float32 error, it is either within the targets or warned of."""
    for problem in (
        camera_curve(40, 3000.0, sigma=0.003),
        camera_curve(40, 300.0, sigma=0.01),
        helix_cameras(300.0, n=20, sigma=0.001),
    ):
        value, norm, worst, warned = float32_errors(problem, "markov")
        assert warned or (value <= 1e-4 and norm <= 1e-3 and worst <= 1e-2), (value, norm, worst)


def test_data_spanning_more_than_float32_resolves_warn():
    """The curve on [0, 2000] reaches 600 with noise 0.01: 6e4 noise standard deviations, which
    float32 resolves to ~4e-3 — the gradient misses the 1e-3 target (1.5e-3 measured), and says so
    eagerly and under jit."""
    problem = camera_curve(20_000, 2000.0)
    assert float32_errors(problem, "markov")[3]  # under jit (the run-time check)
    testing.reset_warnings()
    with pytest.warns(
        gg.ConditioningWarning, match=r"float32 resolves this state-space problem to about .* pass a `mean`"
    ):
        gg.precision_form_log_likelihood(*_as(jnp.float32, *problem), solver="markov")


@pytest.mark.slow  # n = 20 000 in both precisions
def test_a_mean_close_to_the_data_removes_the_warning():
    """The remedy the warning names: residuals from a mean near the data (here the trend 0.3 x)
    are what the filter carries, and float32 resolves them."""
    kernel, x, y, blocks = camera_curve(20_000, 2000.0)
    mean = np.zeros_like(y)
    mean[:, 2] = 0.3 * x
    args = _as(jnp.float32, kernel, x, y, blocks)
    testing.reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.ConditioningWarning)
        grad = jax.grad(gg.precision_form_log_likelihood, argnums=1)(*args, jnp.asarray(mean, jnp.float32), solver="markov")
    reference = jax.grad(gg.precision_form_log_likelihood, argnums=1)(
        *_as(jnp.float64, kernel, x, y, blocks), jnp.asarray(np.asarray(mean, np.float32), jnp.float64)
    )
    assert np.linalg.norm(np.asarray(grad, np.float64) - reference) <= 1e-4 * np.linalg.norm(reference)
