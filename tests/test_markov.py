"""The state-space solvers against the dense solver, finite differences and the kernels themselves."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    STATE_SPACE_KERNELS,
    assert_trees_close,
    data_dims,
    jaxpr_shapes,
    make_markov_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, state_space

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean
MARKOV_SOLVERS = ("markov", "markov-parallel")


def _value_and_grads(solver, *args, of=gg.log_marginal_likelihood):
    fn = functools.partial(of, solver=solver)
    return jax.value_and_grad(fn, argnums=ALL_ARGS)(*args)


def test_the_form_follows_the_dtype():
    """Square roots below float64 (measured: the covariance form is faster on CPUs and exact in
    float64; in float32 it loses the gradient — tests/test_float32.py)."""
    solver = gg.solvers.Markov()
    assert solver.scheme(jnp.float32).square_root and not solver.scheme(jnp.float64).square_root
    assert gg.solvers.Markov(form="covariance").scheme(jnp.float32).square_root is False


def _process_noise_reference(component, h):
    """``Q(h) = ∫₀ʰ e^{Fτ} L q Lᵀ e^{Fᵀτ} dτ`` by quadrature in float64 (SciPy), entry by entry to
    full relative accuracy — independent of the library's series."""
    from scipy.integrate import quad
    from scipy.linalg import expm

    if hasattr(component, "cubic"):  # the curve block
        c = float(component.cubic)
        return c * np.array([[h**3 / 3, h**2 / 2], [h**2 / 2, h]])
    size, lam = component.size, np.sqrt(component.order) / float(component.lengthscale)
    drift = np.diag(np.ones(size - 1), 1)
    drift[-1] = [-math.comb(size, j) * lam ** (size - j) for j in range(size)]
    spectral = {3: 4 * lam**3, 5: 16 / 3 * lam**5}[component.order] * float(component.variance)
    column = lambda t: expm(drift * t)[:, -1]  # noqa: E731

    def entry(a, b):
        with warnings.catch_warnings():  # quad may doubt it reached 2e-14; it is checked at 1e-13
            warnings.simplefilter("ignore")
            return quad(lambda t: column(t)[a] * column(t)[b], 0.0, h, epsabs=0.0, epsrel=2e-14, limit=200)[0]

    return spectral * np.array([[entry(a, b) for b in range(size)] for a in range(size)])


@pytest.mark.float32
@pytest.mark.parametrize(
    "component",
    [
        pytest.param(
            state_space.of(kernels.CubicSpline(1.3) + kernels.Linear(0.4) + kernels.Constant(0.7))[0],
            marks=pytest.mark.slow,
        ),
        pytest.param(state_space.of(kernels.Matern32(2.0, 0.7))[0], marks=pytest.mark.slow),
        state_space.of(kernels.Matern52(0.5, 1.3))[0],  # the hardest: first entry O((λh)⁵)
    ],
    ids=["polynomial", "matern32", "matern52"],
)
def test_process_noise_factors_are_accurate_in_every_entry(component, x64):
    """``L Lᵀ = Q(h)`` to a few units of rounding in every entry, scaled by ``√(Q_aa Q_bb)`` —
    for Matérn blocks down to ``λh = 1e-5``, where ``P∞ − A P∞ Aᵀ`` (the covariance form's
    ``Q``) has no correct digit left in float32 (5/2: first entry ``O((λh)⁵)``)."""
    dtype = jnp.zeros(()).dtype
    component = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype), component)
    steps = np.array([1e-5, 3e-3, 0.1, 0.5, 1.1, 2.0, 9.0])
    factors = np.asarray(component.process_noise_factor(jnp.asarray(steps, dtype)), np.float64)
    tol = 1e-13 if x64 else 1e-5  # float32: ~80 units of rounding, at λh just above the series' range
    for h, factor in zip(np.asarray(jnp.asarray(steps, dtype), np.float64), factors):
        reference = _process_noise_reference(component, h)
        scale = np.sqrt(np.outer(np.diag(reference), np.diag(reference)))
        np.testing.assert_array_less(np.abs(factor @ factor.T - reference) / scale, tol, err_msg=f"h = {h}")
    zero = np.asarray(component.process_noise_factor(jnp.zeros(1, dtype)))
    assert np.all(zero == 0.0), "a tie has no process noise"
    first = np.asarray(component.initial_factor(jnp.asarray([0.3], dtype)), np.float64)[0]
    np.testing.assert_allclose(
        first @ first.T,
        np.asarray(component.initial(jnp.asarray(0.3, dtype)), np.float64),
        rtol=10 * tol,
        atol=10 * tol,
    )


def _central_difference(f, x, eps=1e-6):
    flat = np.asarray(x, np.float64).ravel()
    grad = np.empty_like(flat)
    for i in range(flat.size):
        step = np.zeros_like(flat)
        step[i] = eps
        grad[i] = (f((flat + step).reshape(np.shape(x))) - f((flat - step).reshape(np.shape(x)))) / (2 * eps)
    return grad.reshape(np.shape(x))


# Module level: one compilation per structure, not one per hypothesis example.
_MARKOV_VALUE = jax.jit(functools.partial(gg.precision_form_log_likelihood, solver="markov"))
_MARKOV_GRAD = jax.jit(jax.grad(functools.partial(gg.precision_form_log_likelihood, solver="markov"), argnums=(0, 1)))


@pytest.mark.parametrize("kernel_name", ["curve", "scaled_sum"])
@settings(max_examples=min(3, settings.default.max_examples))
@given(seed=seeds, dim=data_dims)
def test_markov_gradients_match_finite_differences(kernel_name, seed, dim, x64):
    """Independent of autodiff and of the dense solver: central differences of the filter's value."""
    if not x64:
        pytest.skip("finite differences need float64")
    kernel, x, y, nz, mean = make_markov_problem(kernel_name, "per_point_rank_deficient", seed, dim, n=5).args()
    value, grad = _MARKOV_VALUE, _MARKOV_GRAD
    kernel_grad, x_grad = grad(kernel, x, y, nz, mean)
    numeric = _central_difference(lambda x_: float(value(kernel, x_, y, nz, mean)), x)
    np.testing.assert_allclose(x_grad, numeric, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(numeric).max()))
    leaves, treedef = jax.tree_util.tree_flatten(kernel)
    for i, leaf_grad in enumerate(jax.tree_util.tree_leaves(kernel_grad)):

        def at(v, i=i):
            moved = list(leaves)
            moved[i] = jnp.asarray(v)
            return float(value(jax.tree_util.tree_unflatten(treedef, moved), x, y, nz, mean))

        np.testing.assert_allclose(leaf_grad, _central_difference(at, np.asarray(leaves[i])), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel_name", sorted(STATE_SPACE_KERNELS))
def test_state_space_forms_reproduce_the_kernels(kernel_name, x64):
    """``Cov(s(a), s(b)) = P(a) A(b − a)ᵀ``: its (f, f) entry is ``k(a, b)``; for blocks with a slope
    entry, its (f', f) entry is ``∂k(a, b)/∂a`` — the SDE matrices against the kernels' own closed
    forms, every state-space kernel."""
    kernel = STATE_SPACE_KERNELS[kernel_name](np.random.default_rng(3))
    a, b = jnp.asarray(0.4), jnp.asarray(1.3)
    value = slope = 0.0
    with_slopes = True
    for block in state_space.of(kernel):
        cov = block.initial(a) @ block.transition(jnp.atleast_1d(b - a))[0].T
        value = value + cov[0, 0]
        if block.slope_entry is None:
            with_slopes = False
        else:
            slope = slope + cov[block.slope_entry, 0]
    tol = 1e-12 if x64 else 1e-5
    np.testing.assert_allclose(value, kernel.evaluate(a, b), rtol=tol, atol=tol)
    if with_slopes:
        np.testing.assert_allclose(slope, kernel.grad_first(a, b), rtol=tol, atol=tol)


# The parallel scans take 5 s to compile on CPU: in the fast profile's float32 pass only "markov".
@pytest.mark.parametrize("solver", [pytest.param("markov", marks=pytest.mark.float32), "markov-parallel"])
def test_all_equal_indices_are_exact_not_nan(solver, rtol):
    kernel, x, y, nz, mean = make_markov_problem("scaled_sum", "per_point_rank_deficient", 5, 3).args()
    x = jnp.full_like(x, 0.7)
    got = _value_and_grads(solver, kernel, x, y, nz, mean)
    assert_trees_close(got, _value_and_grads("dense", kernel, x, y, nz, mean), rtol, "all equal")


def test_vmap_and_jit(x64):
    problems = [make_markov_problem("curve", "per_point_rank_deficient", s, 3) for s in range(3)]
    kernel, _, _, nz, mean = problems[0].args()
    xs = jnp.stack([p.x for p in problems])
    ys = jnp.stack([p.y for p in problems])
    f = functools.partial(gg.precision_form_log_likelihood, solver="markov")
    batched = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=1), in_axes=(None, 0, 0, None, None)))(
        kernel, xs, ys, nz, mean
    )
    for i in range(3):
        want = jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1)(kernel, xs[i], ys[i], nz, mean, solver="dense")
        assert_trees_close((batched[0][i], batched[1][i]), want, 1e-9 if x64 else 2e-3, f"batch {i}")


@pytest.mark.slow  # differentiating the smoother's rule compiles for 5 s on CPU
def test_second_derivatives(x64):
    kernel, x, y, nz, mean = make_markov_problem("curve", "per_point_rank_deficient", 0, 3).args()
    f = functools.partial(gg.precision_form_log_likelihood, solver="markov")
    # Forward over reverse, as jax.hessian does: it compiles in half the time of reverse over reverse.
    hessian = jax.jit(jax.jacfwd(jax.grad(lambda x_: f(kernel, x_, y, nz, mean))))(x)
    reference = jax.jit(jax.hessian(lambda x_: gg.reference.precision_form_log_likelihood(kernel, x_, y, nz, mean)))(x)
    np.testing.assert_allclose(hessian, reference, rtol=1e-7 if x64 else 2e-2, atol=1e-7 if x64 else 2e-2)


def test_markov_forms_no_n_by_n_array():
    """O(n) memory: nothing in the value-and-gradient has two axes of length n."""
    n = 40
    kernel, x, y, nz, mean = make_markov_problem("scaled_sum", "per_point_rank_deficient", 1, 3, n=n).args()
    f = functools.partial(gg.precision_form_log_likelihood, solver="markov")
    shapes = jaxpr_shapes(jax.grad(f, argnums=ALL_ARGS), kernel, x, y, nz, mean)
    assert any(n in s for s in shapes)
    assert not any(s.count(n) >= 2 for s in shapes), sorted(s for s in shapes if s.count(n) >= 2)


@pytest.mark.slow  # tests/test_float32.py checks the targets on harder problems in the fast profile
@pytest.mark.float32
def test_float32_long_curve_is_close_to_float64(x64):
    """The benchmark's camera-ray curve at n = 10⁴: float32 value and gradient within 1e-3 of float64."""
    if not x64:
        pytest.skip("needs float64 for the comparison")
    rng = np.random.default_rng(0)
    n = 10_000
    x = np.sort(rng.uniform(0.0, 10.0, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) + 0.1 * rng.normal(size=(n, 3))
    rays = rng.normal(size=(n, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / 0.1
    kernel = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)
    f = jax.jit(jax.value_and_grad(functools.partial(gg.precision_form_log_likelihood, solver="markov"), argnums=1))
    results = {}
    for dtype in (jnp.float32, jnp.float64):
        cast = functools.partial(jnp.asarray, dtype=dtype)
        results[dtype] = f(jax.tree_util.tree_map(cast, kernel), cast(x), cast(y), noise.PerPoint(cast(blocks)))
    (v32, g32), (v64, g64) = results[jnp.float32], results[jnp.float64]
    assert np.isfinite(v32) and np.all(np.isfinite(g32))
    assert abs(float(v32) - float(v64)) <= 1e-3 * abs(float(v64))
    assert np.linalg.norm(np.asarray(g32, np.float64) - g64) <= 1e-3 * np.linalg.norm(g64)


# ------------------------------------------------------------ solver choice


@pytest.mark.parametrize(
    "kernel, nz, x, fragment",
    [
        (
            kernels.ExpSquared(1.0, 1.0),
            noise.Isotropic(0.3),
            jnp.linspace(0, 1, 5),
            "ExpSquared has no state-space form",
        ),
        (
            kernels.CubicSpline(1.0) * kernels.Matern52(1.0, 1.0),
            noise.Isotropic(0.3),
            jnp.linspace(0, 1, 5),
            "Product(CubicSpline, Matern52)",
        ),
        (
            kernels.Matern32(1.0, 1.0),
            noise.Dense(jnp.eye(5)),
            jnp.linspace(0, 1, 5),
            "noise.Dense is not block diagonal",
        ),
        (kernels.Matern32(1.0, 1.0), noise.Isotropic(0.3), jnp.ones((5, 2)), "scalar indices"),
    ],
)
@pytest.mark.parametrize("solver", MARKOV_SOLVERS)
def test_markov_solver_refuses_what_it_cannot_do(kernel, nz, x, fragment, solver):
    y = jnp.zeros(5)
    for fn in (gg.precision_form_log_likelihood, gg.index_gradient):
        with pytest.raises(ValueError, match=f"solver='{solver}'") as info:
            fn(kernel, x, y, nz, solver=solver)
        assert fragment in str(info.value)
    # "auto" falls back to the dense solver instead.
    auto = gg.precision_form_log_likelihood(kernel, x, y, nz)
    np.testing.assert_allclose(auto, gg.precision_form_log_likelihood(kernel, x, y, nz, solver="dense"))


def test_unknown_solver_name():
    with pytest.raises(
        ValueError, match=r"`solver` must be one of 'auto', 'dense', 'markov', 'markov-parallel'(, '[\w-]+')* or a gpgrad_jax\.solvers\.Solver; got 'kalman'"
    ):
        gg.precision_form_log_likelihood(
            kernels.Matern32(1.0, 1.0), jnp.ones(3), jnp.ones(3), noise.Isotropic(1.0), solver="kalman"
        )


def test_auto_picks_markov_for_long_curves_and_dense_for_short_ones():
    kernel, nz = kernels.Matern32(1.0, 1.0), noise.Isotropic(0.3)
    resolve = gg.solvers.resolve
    assert resolve("auto", kernel, jnp.ones(1000), jnp.ones(1000), nz) == gg.solvers.Markov()
    assert resolve("auto", kernel, jnp.ones(4), jnp.ones(4), nz) == gg.solvers.Dense()
    assert resolve("auto", kernels.ExpSquared(1.0, 1.0), jnp.ones(1000), jnp.ones(1000), nz) == gg.solvers.Dense()
    # New indices count: 10 observations, 10⁵ new points.
    assert resolve("auto", kernel, jnp.ones(10), jnp.ones(10), nz, n_new=100_000) == gg.solvers.Markov()
