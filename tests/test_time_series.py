"""Time-series kernels on the O(n) path: Matérn 1/2, SHO, Cosine, products and sums of them, and
kernels registered by users — all through the generic closed-form state-space rule."""

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
    MARKOV_KERNELS,
    MARKOV_NOISES,
    TIME_SERIES_KERNELS,
    assert_trees_close,
    check_against_dense,
    data_dims,
    kernel_noise_pairs,
    make_markov_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, state_space, testing
from gpgrad_jax._likelihood import prepare
from gpgrad_jax._markov import _forward, backward
from gpgrad_jax._statespace import Kronecker, Oscillator, may_kink, model_components
from gpgrad_jax.reference import log_marginal_likelihood as reference_density

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean


def _problem(kernel_name, noise_kind, seed, dim=data_dims, n=7):
    return make_markov_problem(kernel_name, noise_kind, seed, dim, n=n, kernel_table=TIME_SERIES_KERNELS, ties=2)


def _cases(marks_by_kernel):
    return [
        pytest.param(k, nk, marks=marks_by_kernel.get(k, ()))
        for k, nk in kernel_noise_pairs(TIME_SERIES_KERNELS, MARKOV_NOISES)
    ]


# The float32 pass takes the kernels whose blocks differ in float32 (SHO's series factor, the
# Kronecker factor, Matérn 1/2's); the largest structure only in the full profile.
_FLOAT32 = pytest.mark.float32


@pytest.mark.parametrize(
    "kernel_name, noise_kind",
    _cases({"matern12": _FLOAT32, "sho": _FLOAT32, "quasi_periodic": _FLOAT32, "sum_of_products": pytest.mark.slow}),
)
@given(seed=seeds, dim=data_dims)
def test_markov_solver_equals_the_dense_solver(kernel_name, noise_kind, seed, dim, rtol):
    """Value and every cotangent (kernel, x, y, noise, mean) to 1e-9 in float64 (the float32
    pass: the square-root form, 2e-3), unsorted indices with two ties, rank-deficient and zero
    blocks; at ties both solvers take the mean of the one-sided derivatives."""
    check_against_dense("markov", _problem(kernel_name, noise_kind, seed, dim), rtol)


@pytest.mark.slow  # the associative scans compile for 5–20 s per structure: three kernels, two examples
@pytest.mark.parametrize(
    "kernel_name, noise_kind",
    [(k, nk) for k, nk in kernel_noise_pairs(TIME_SERIES_KERNELS, MARKOV_NOISES) if k in ("matern12", "sho", "quasi_periodic")],
)
@settings(max_examples=min(2, settings.default.max_examples))
@given(seed=seeds, dim=data_dims)
def test_parallel_solver_equals_the_dense_solver(kernel_name, noise_kind, seed, dim, rtol):
    check_against_dense("markov-parallel", _problem(kernel_name, noise_kind, seed, dim), rtol)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _rule(parallel, square_root, generic, kernel, x, y, nz, mean):
    prepared = prepare(kernel, x, y, nz, mean)
    _, state = _forward(parallel, square_root, *prepared)
    one = jnp.ones((), prepared[-1].dtype)
    return backward(parallel, square_root, True, True, *prepared, state, one, generic=generic)


@pytest.mark.parametrize(
    "kernel_name, square_root",
    [("scaled_sum", False)]
    + [pytest.param(k, f, marks=pytest.mark.slow) for k in ("curve", "matern32", "linear_constant", "sho") for f in (False, True)]
    + [pytest.param("scaled_sum", True, marks=pytest.mark.slow)],
)
@settings(max_examples=min(3, settings.default.max_examples))
@given(seed=seeds)
def test_generic_rule_equals_the_identities(kernel_name, square_root, seed, x64):
    """The generic rule (smoother adjoints → Ā_k, Q̄_k → vjp of the small per-step functions) gives
    what the per-kernel identities give — Matérn variance and lengthscale, the polynomial's
    ½(ννᵀ − qN), the slope identity for the index gradient — in both forms."""
    if not x64:
        pytest.skip("float64 comparison")
    table = TIME_SERIES_KERNELS if kernel_name in TIME_SERIES_KERNELS else MARKOV_KERNELS
    problem = make_markov_problem(kernel_name, "per_point_rank_deficient", seed, kernel_table=table)
    identities = _rule(False, square_root, False, *problem.args())
    generic = _rule(False, square_root, True, *problem.args())
    assert_trees_close(generic, identities, 1e-9, f"{kernel_name} generic vs identities")


def _tinygp_kernels():
    from tinygp.kernels import quasisep

    return {
        "matern12": (kernels.Matern12(1.7, 0.6), 1.7 * quasisep.Exp(scale=0.6)),
        "sho_underdamped": (kernels.SHO(1.3, 2.5, 4.0), quasisep.SHO(omega=2.5, quality=4.0, sigma=1.3)),
        "sho_critical": (kernels.SHO(1.3, 2.5, 0.5), quasisep.SHO(omega=2.5, quality=0.5, sigma=1.3)),
        "sho_overdamped": (kernels.SHO(1.3, 2.5, 0.2), quasisep.SHO(omega=2.5, quality=0.2, sigma=1.3)),
        "cosine": (kernels.Cosine(0.9, 1.4), 0.9 * quasisep.Cosine(scale=1.4)),
        "quasi_periodic": (
            kernels.Matern32(1.2, 2.0) * kernels.Cosine(1.0, 1.4) + kernels.Matern12(0.3, 0.5),
            1.2 * quasisep.Matern32(scale=2.0) * quasisep.Cosine(scale=1.4) + 0.3 * quasisep.Exp(scale=0.5),
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["matern12", "sho_critical", "quasi_periodic"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in ("sho_underdamped", "sho_overdamped", "cosine")],
)
def test_agrees_with_tinygp_quasiseparable(name, x64):
    """The log density against tinygp's quasiseparable solver on the same kernel, to 1e-9."""
    if not x64:
        pytest.skip("float64 comparison")
    tinygp = pytest.importorskip("tinygp")
    ours, theirs = _tinygp_kernels()[name]
    rng = np.random.default_rng(11)
    x = np.sort(rng.uniform(0.0, 10.0, 60))
    y = np.sin(x) + 0.3 * rng.normal(size=60)
    sigma = 0.4
    expected = tinygp.GaussianProcess(theirs, jnp.asarray(x), diag=sigma**2).log_probability(jnp.asarray(y))
    for solver in ("markov", "dense"):
        got = gg.log_marginal_likelihood(ours, x, y, noise.Isotropic(sigma), solver=solver)
        np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=solver)


def _five_point(f, at, h=2e-5):
    """Mean of the one-sided second-order differences: the mean of the one-sided derivatives."""
    grad = np.empty(at.size)
    for i in range(at.size):
        e = np.zeros(at.size)
        e[i] = h
        grad[i] = (-f(at + 2 * e) + 4 * f(at + e) - 4 * f(at - e) + f(at - 2 * e)) / (4 * h)
    return grad


@pytest.mark.parametrize(
    "kernel_name, solver",
    [("matern12", "markov")]
    + [pytest.param(k, s, marks=pytest.mark.slow) for k, s in [("quasi_periodic", "markov"), ("matern12", "markov-parallel")]],
)
def test_ties_take_the_mean_of_the_one_sided_derivatives(kernel_name, solver, x64):
    """Where indices tie, a kernel with a kink gives the likelihood a kink: the gradient in ``x``
    is the mean of its one-sided derivatives (differences of the dense *reference*, independent
    of both solvers' rules), on a triple and a double tie."""
    if not x64:
        pytest.skip("differences need float64")
    kernel = TIME_SERIES_KERNELS[kernel_name](np.random.default_rng(2))
    x = np.array([0.9, 0.3, 1.7, 0.3, 2.2, 0.3, 1.7, 0.05])
    rng = np.random.default_rng(5)
    y = rng.normal(size=(8, 3))
    nz = noise.PerPoint(jnp.asarray(2.0 * np.eye(3) + 0.3 * rng.normal(size=(8, 3, 3))))
    reference = lambda x_: float(reference_density(kernel, jnp.asarray(x_), y, nz))  # noqa: E731
    expected = _five_point(reference, x)
    for which in (solver, "dense"):
        grad = jax.grad(gg.log_marginal_likelihood, argnums=1)(kernel, jnp.asarray(x), y, nz, solver=which)
        np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6, err_msg=which)
    # The ties are kinks: the one-sided derivatives at the triple tie differ.
    step = np.zeros(8)
    step[1] = 2e-5
    right = (-3 * reference(x) + 4 * reference(x + step) - reference(x + 2 * step)) / 4e-5
    left = (3 * reference(x) - 4 * reference(x - step) + reference(x - 2 * step)) / 4e-5
    assert abs(right - left) > 1e-2, (right, left)


@pytest.mark.parametrize(
    "kernel",
    [
        kernels.Matern12(1.3, 0.7),
        pytest.param(kernels.SHO(1.0, 2.0, 0.3), marks=pytest.mark.slow),
        pytest.param(kernels.SHO(1.0, 2.0, 0.5), marks=pytest.mark.slow),
        pytest.param(kernels.SHO(1.0, 2.0, 4.0), marks=pytest.mark.slow),
        pytest.param(kernels.Cosine(1.0, 1.3), marks=pytest.mark.slow),
        kernels.Matern32(1.0, 1.2) * kernels.Cosine(0.8, 1.7) + kernels.Matern12(0.5, 0.4),
    ],
    ids=["matern12", "sho_over", "sho_critical", "sho_under", "cosine", "quasi_periodic"],
)
def test_check_kernel_accepts_the_time_series_kernels(kernel):
    testing.check_kernel(kernel, jnp.array([0.1, 0.5, 0.5, 1.3, 2.0, 0.1, 2.7]))


def test_check_kernel_judges_a_kink_by_the_mean_of_the_one_sided_derivatives(x64):
    """A Matérn 1/2 whose ``grad_first`` reports one side at ``a == b`` is rejected there."""

    @kernels.register
    class OneSidedExp(kernels.Kernel):
        variance: jnp.ndarray

        def evaluate(self, a, b):
            return self.variance * jnp.exp(-jnp.abs(a - b))

        def grad_first(self, a, b):
            return -self.variance * jnp.where(a >= b, 1.0, -1.0) * jnp.exp(-jnp.abs(a - b))

    with pytest.raises(AssertionError, match="grad_first disagrees"):
        testing.check_kernel(OneSidedExp(1.0), jnp.array([0.1, 0.5, 1.3]))


@pytest.mark.parametrize("kernel_name", sorted(TIME_SERIES_KERNELS))
def test_state_space_forms_reproduce_the_kernels(kernel_name, x64):
    """``Cov(s(a), s(b)) = P(a) A(b − a)ᵀ``: its (f, f) entry is ``k(a, b)``; for blocks with a
    slope entry, its (f', f) entry is ``∂k(a, b)/∂a``."""
    kernel = TIME_SERIES_KERNELS[kernel_name](np.random.default_rng(3))
    a, b = jnp.asarray(0.4), jnp.asarray(1.3)
    value = slope = 0.0
    with_slopes = True
    for block in model_components(kernel):
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


def _oscillator_noise_reference(quality, h):
    """``Q(h)`` of the unit oscillator (``ω = σ = 1``) by quadrature in float64."""
    from scipy.integrate import quad
    from scipy.linalg import expm

    drift = np.array([[0.0, 1.0], [-1.0, -1.0 / quality]])
    column = lambda t: expm(drift * t)[:, -1]  # noqa: E731
    def entry(a, b):
        with warnings.catch_warnings():  # quad may doubt it reached 2e-14; it is checked at 1e-12
            warnings.simplefilter("ignore")
            return quad(lambda t: column(t)[a] * column(t)[b], 0.0, h, epsabs=0.0, epsrel=2e-14, limit=200)[0]

    return 2.0 / quality * np.array([[entry(a, b) for b in range(2)] for a in range(2)])


@pytest.mark.float32
@pytest.mark.parametrize("quality", [0.2, 0.5, 3.0])
def test_oscillator_noise_factors_are_accurate_in_every_entry(quality, x64):
    """The SHO's ``L Lᵀ = Q(h)`` entry by entry (scaled by ``√(Q_aa Q_bb)``) down to ``ωh = 1e-5``,
    where ``P∞ − A P∞ Aᵀ`` has no correct digit in float32; Kronecker products of blocks keep it."""
    dtype = jnp.zeros(()).dtype
    block = Oscillator(jnp.asarray(1.0, dtype), jnp.asarray(1.0, dtype), jnp.asarray(quality, dtype))
    steps = np.array([1e-5, 3e-3, 0.1, 0.5, 1.1, 2.0, 9.0])
    factors = np.asarray(block.process_noise_factor(jnp.asarray(steps, dtype)), np.float64)
    tol = 1e-12 if x64 else 2e-5
    for h, factor in zip(np.asarray(jnp.asarray(steps, dtype), np.float64), factors):
        reference = _oscillator_noise_reference(quality, h)
        scale = np.sqrt(np.outer(np.diag(reference), np.diag(reference)))
        np.testing.assert_array_less(np.abs(factor @ factor.T - reference) / scale, tol, err_msg=f"h = {h}")
    product = Kronecker(block, model_components(kernels.Matern12(jnp.asarray(0.7, dtype), jnp.asarray(0.9, dtype)))[0])
    noise_factor = product.process_noise_factor(jnp.asarray(steps, dtype))
    np.testing.assert_allclose(
        noise_factor @ jnp.swapaxes(noise_factor, -1, -2),
        product.process_noise(jnp.asarray(steps, dtype)),
        rtol=10 * tol,
        atol=10 * tol,
    )


def test_products_with_the_curve_kernels_are_not_markov():
    kernel = kernels.CubicSpline(1.0) * kernels.Matern32(1.0, 1.0)
    x, y = jnp.array([0.1, 0.5, 0.9]), jnp.array([0.3, -0.2, 0.1])
    with pytest.raises(ValueError, match="is not stationary"):
        gg.log_marginal_likelihood(kernel, x, y, noise.Isotropic(0.5), solver="markov")
    auto = gg.log_marginal_likelihood(kernel, x, y, noise.Isotropic(0.5), solver="auto")
    np.testing.assert_allclose(auto, gg.log_marginal_likelihood(kernel, x, y, noise.Isotropic(0.5), solver="dense"))


# --------------------------------------------------- a user's own state-space form


@state_space.component
class _MixedReadout(state_space.Stationary):
    """A Matérn 3/2 SDE read out as ``g = f + c f'`` (``H = [1, c]``, not the first entry)."""

    variance: jnp.ndarray
    lengthscale: jnp.ndarray
    mix: jnp.ndarray
    size = 2

    def _rate(self):
        return math.sqrt(3.0) / self.lengthscale

    def transition(self, h):
        lam = self._rate()
        h = jnp.asarray(h)[..., None, None]
        nilpotent = jnp.stack([jnp.stack([lam, jnp.ones_like(lam)]), jnp.stack([-(lam**2), -lam])])
        return jnp.exp(-lam * h) * (jnp.eye(2) + nilpotent * h)

    def stationary(self):
        return self.variance * jnp.diag(jnp.stack([jnp.ones_like(self._rate()), self._rate() ** 2]))

    def process_noise(self, h):
        a = self.transition(h)
        return self.stationary() - a @ self.stationary() @ jnp.swapaxes(a, -1, -2)

    def observation(self):
        return jnp.stack([jnp.ones_like(self.mix), self.mix])


@kernels.register
class _MixedMatern(kernels.Kernel):
    """``Cov(g(a), g(b))`` with ``g = f + c f'`` for a Matérn 3/2 ``f``: a kink at ``a == b``."""

    variance: jnp.ndarray
    lengthscale: jnp.ndarray
    mix: jnp.ndarray
    scalar_index_only = True

    def _block(self):
        return _MixedReadout(self.variance, self.lengthscale, self.mix)

    def _profile(self, tau):  # k(τ) for τ ≥ 0: H A(τ) P∞ Hᵀ
        block = self._block()
        read = block.observation()
        return read @ block.transition(tau) @ block.stationary() @ read

    def evaluate(self, a, b):
        return self._profile(jnp.abs(a - b))

    def grad_first(self, a, b):  # 0 at a == b: the mean of the one-sided derivatives
        tau = jnp.abs(a - b)
        return jnp.sign(a - b) * jax.jvp(self._profile, (tau,), (jnp.ones_like(tau),))[1]


@state_space.register
def _(kernel: _MixedMatern):
    return (kernel._block(),)


@pytest.mark.parametrize("noise_kind", ["isotropic", pytest.param("per_point_rank_deficient", marks=pytest.mark.slow)])
def test_a_registered_user_kernel_gets_the_exact_o_n_rule(noise_kind, x64):
    """A user's block with its own read-out ``H`` and a kink, registered through the public API:
    value and every cotangent equal the dense solver's, ties included."""
    if not x64:
        pytest.skip("float64 comparison")
    problem = make_markov_problem("matern12", noise_kind, 4, 3, kernel_table=TIME_SERIES_KERNELS, ties=2)
    problem.kernel = _MixedMatern(jnp.asarray(1.3), jnp.asarray(0.8), jnp.asarray(0.4))
    assert may_kink(model_components(problem.kernel)[0])
    testing.check_kernel(problem.kernel, problem.x)
    check_against_dense("markov", problem, 1e-9)


@pytest.mark.float32
def test_predict_equals_the_dense_posterior(rtol):
    """Posterior mean and variance at new indices (between, on and beyond the data) through the
    Kronecker and Matérn 1/2 blocks — both forms, by dtype."""
    kernel, x, y, nz, _ = _problem("quasi_periodic", "per_point_rank_deficient", 3, 3).args()
    x_new = jnp.asarray([-0.2, 0.4, float(x[2]), 1.77, 3.5], x.dtype)
    markov = gg.predict(kernel, x, y, nz, x_new, solver="markov")
    dense = gg.predict(kernel, x, y, nz, x_new, solver="dense")
    assert_trees_close(markov, dense, 10 * rtol, "predict")


def test_posterior_draws_have_the_dense_posterior_moments(x64):
    """Pathwise draws through the generic blocks: their mean and covariance over 4000 draws
    match the dense posterior's to the Monte-Carlo error."""
    if not x64:
        pytest.skip("float64 comparison")
    kernel, x, y, nz, _ = _problem("quasi_periodic", "isotropic", 5, 1).args()
    x_new = jnp.linspace(-0.5, 3.5, 7)
    draws = gg.sample_posterior(jax.random.key(0), kernel, x, y, nz, x_new, 4000, solver="markov")
    mean, var = gg.predict(kernel, x, y, nz, x_new, solver="dense")
    draws = np.asarray(draws).reshape(4000, -1)
    sd = np.sqrt(np.asarray(var).reshape(-1))
    np.testing.assert_array_less(np.abs(draws.mean(0) - np.asarray(mean).reshape(-1)), 5 * sd / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.1)


@pytest.mark.slow  # differentiating the rule's backward pass compiles for several seconds
def test_second_derivatives_through_the_generic_rule(x64):
    """``jax.hessian`` in ``x`` of a sum of a Kronecker, a Matérn 1/2 and an SHO block equals the
    dense solver's (no ties: the Hessian of a kinked kernel is not defined at one)."""
    if not x64:
        pytest.skip("float64 comparison")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.permutation(rng.uniform(0, 3, 6)))
    y = jnp.asarray(rng.normal(size=6))
    kernel = TIME_SERIES_KERNELS["quasi_periodic"](rng) + kernels.SHO(0.5, 2.0, 0.7)
    hessians = [
        jax.hessian(lambda x_, s=s: gg.log_marginal_likelihood(kernel, x_, y, noise.Isotropic(0.5), solver=s))(x)
        for s in ("markov", "markov-parallel", "dense")
    ]
    assert_trees_close(hessians[0], hessians[2], 1e-9, "markov hessian")
    assert_trees_close(hessians[1], hessians[2], 1e-9, "markov-parallel hessian")


@pytest.mark.slow
def test_a_registered_block_with_its_own_read_out_inside_a_product(x64):
    """``H₁ ⊗ H₂`` for a product whose factor reads ``f + c f'``: equal to the dense solver."""
    if not x64:
        pytest.skip("float64 comparison")
    problem = make_markov_problem("matern12", "per_point", 6, 1, kernel_table=TIME_SERIES_KERNELS)
    problem.kernel = _MixedMatern(jnp.asarray(1.3), jnp.asarray(0.8), jnp.asarray(0.4)) * kernels.Cosine(1.0, 2.0)
    check_against_dense("markov", problem, 1e-9)
