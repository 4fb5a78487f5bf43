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
    TIME_SERIES_KERNELS,
    assert_trees_close,
    check_against_dense,
    data_dims,
    make_markov_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, state_space, testing
from gpgrad_jax.reference import log_marginal_likelihood as reference_density

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean


def _problem(kernel_name, noise_kind, seed, dim=data_dims, n=7):
    return make_markov_problem(kernel_name, noise_kind, seed, dim, n=n, kernel_table=TIME_SERIES_KERNELS, ties=2)


class _OpaqueBlock(state_space.Block):
    """A built-in block behind the bare block contract: no slope entry, no closed-form parameter
    cotangents — what the solver knows of a user's block, so it takes the generic rule."""

    def __init__(self, inner):
        self.inner = inner
        self.size = inner.size

    def transition(self, h):
        return self.inner.transition(h)

    def process_noise(self, h):
        return self.inner.process_noise(h)

    def initial(self, t):
        return self.inner.initial(t)

    def process_noise_factor(self, h):
        return self.inner.process_noise_factor(h)

    def initial_factor(self, t):
        return self.inner.initial_factor(t)

    def may_kink(self):
        return self.inner.may_kink()


class _OpaqueStationaryBlock(_OpaqueBlock, state_space.StationaryBlock):
    def stationary_covariance(self):
        return self.inner.stationary_covariance()

    def stationary_factor(self):
        return self.inner.stationary_factor()


for _cls in (_OpaqueBlock, _OpaqueStationaryBlock):
    jax.tree_util.register_pytree_node(_cls, lambda b: ((b.inner,), None), lambda _, c, cls=_cls: cls(*c))


@kernels.register
class _Opaque(kernels.Kernel):
    """A built-in kernel whose state-space blocks hide their closed forms (``_OpaqueBlock``)."""

    inner: kernels.Kernel

    def evaluate(self, a, b):
        return self.inner.evaluate(a, b)

    def grad_first(self, a, b):
        return self.inner.grad_first(a, b)


@state_space.register
def _(kernel: _Opaque):
    return tuple(
        (_OpaqueStationaryBlock if isinstance(b, state_space.StationaryBlock) else _OpaqueBlock)(b)
        for b in state_space.of(kernel.inner)
    )


@functools.partial(jax.jit, static_argnums=0)
def _value_and_every_cotangent(solver, kernel, x, y, nz, mean):
    f = functools.partial(gg.log_marginal_likelihood, solver=solver)
    return jax.value_and_grad(f, argnums=ALL_ARGS)(kernel, x, y, nz, mean)


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
    kernel, x, y, nz, mean = make_markov_problem(kernel_name, "per_point_rank_deficient", seed, kernel_table=table).args()
    solver = gg.solvers.Markov(form="square-root" if square_root else "covariance")
    identities = _value_and_every_cotangent(solver, kernel, x, y, nz, mean)
    value, (opaque, *rest) = _value_and_every_cotangent(solver, _Opaque(kernel), x, y, nz, mean)
    assert_trees_close((value, (opaque.inner, *rest)), identities, 1e-9, f"{kernel_name} generic vs identities")
    # The index gradient's own path (the slope identity against the generic jvp of the steps).
    assert_trees_close(
        gg.index_gradient(_Opaque(kernel), x, y, nz, mean, solver=solver),
        gg.index_gradient(kernel, x, y, nz, mean, solver=solver),
        1e-9,
        f"{kernel_name} generic index_gradient",
    )


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
    (block,) = state_space.of(kernels.SHO(jnp.asarray(1.0, dtype), jnp.asarray(1.0, dtype), jnp.asarray(quality, dtype)))
    steps = np.array([1e-5, 3e-3, 0.1, 0.5, 1.1, 2.0, 9.0])
    factors = np.asarray(block.process_noise_factor(jnp.asarray(steps, dtype)), np.float64)
    tol = 1e-12 if x64 else 2e-5
    for h, factor in zip(np.asarray(jnp.asarray(steps, dtype), np.float64), factors):
        reference = _oscillator_noise_reference(quality, h)
        scale = np.sqrt(np.outer(np.diag(reference), np.diag(reference)))
        np.testing.assert_array_less(np.abs(factor @ factor.T - reference) / scale, tol, err_msg=f"h = {h}")
    unit_sho = kernels.SHO(jnp.asarray(1.0, dtype), jnp.asarray(1.0, dtype), jnp.asarray(quality, dtype))
    (product,) = state_space.of(unit_sho * kernels.Matern12(jnp.asarray(0.7, dtype), jnp.asarray(0.9, dtype)))
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


@state_space.block
class _MixedReadout(state_space.StationaryBlock):
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

    def stationary_covariance(self):
        return self.variance * jnp.diag(jnp.stack([jnp.ones_like(self._rate()), self._rate() ** 2]))

    def process_noise(self, h):
        a = self.transition(h)
        return self.stationary_covariance() - a @ self.stationary_covariance() @ jnp.swapaxes(a, -1, -2)

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
        return read @ block.transition(tau) @ block.stationary_covariance() @ read

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
    assert state_space.of(problem.kernel)[0].may_kink()
    testing.check_kernel(problem.kernel, problem.x)
    check_against_dense("markov", problem, 1e-9)


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


def test_blocks_written_against_the_earlier_names_still_work(x64):
    """``Component``/``Stationary``/``component`` and a ``stationary()`` method: the contract before
    the blocks were renamed, read as ``Block``/``StationaryBlock``/``stationary_covariance``."""
    assert state_space.Component is state_space.Block and state_space.Stationary is state_space.StationaryBlock

    @state_space.component
    class Legacy(state_space.Stationary):
        variance: jnp.ndarray
        size = 1

        def transition(self, h):
            return jnp.exp(-h)[..., None, None]

        def process_noise(self, h):
            return -self.variance * jnp.expm1(-2.0 * h)[..., None, None]

        def stationary(self):
            return jnp.reshape(self.variance, (1, 1))

    np.testing.assert_allclose(Legacy(jnp.asarray(2.0)).stationary_covariance(), [[2.0]])
    np.testing.assert_allclose(Legacy(jnp.asarray(2.0)).initial(jnp.zeros(3)), np.full((3, 1, 1), 2.0))
