"""The solver protocol's contract, driven over every solver in ``tests/problems.py``'s ``SOLVERS``:
each solver against the dense solver on every state-space kernel, against autodiff of its own
forward computation, its posterior and its draws; a solver of one's own in one class and one
registry line; the argument path walked once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    FULL,
    MARKOV_KERNELS,
    MARKOV_NOISES,
    SLOW_SOLVERS,
    SOLVERS,
    STATE_SPACE_KERNELS,
    TIME_SERIES_KERNELS,
    assert_trees_close,
    check_against_dense,
    data_dims,
    kernel_noise_pairs,
    make_markov_problem,
    seeds,
    solver_params,
    state_space_problem,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, state_space

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean

# The kernels whose blocks differ in float32 (SHO's series factor, product blocks, Matérn 1/2's)
# and the curve kernels run in the fast profile's float32 pass (the full profile's: all of them).
_FLOAT32_KERNELS = ("curve", "scaled_sum", "matern12", "sho", "quasi_periodic")
# The parallel square-root scans in float32 (full profile): ~20 s of compilation per case.
_FLOAT32_PARALLEL_KERNELS = ("curve", "scaled_sum", "matern52", "matern12", "sho", "quasi_periodic")


def _contract_cases(solvers):
    """(solver, kernel, noise) cases: ``"markov"`` on every kernel and noise; the other Markov
    solvers on every kernel with one noise each — the square-root form in the fast profile on the
    Markov kernels, the parallel scans in the full profile; the parallel square-root scans (the
    slowest to compile, 30–70 s a case) in float64 on the kernels that the float32 pass does not
    give them (there ``"markov-parallel"`` is the square-root form)."""
    cases = []
    one_noise_each = [(k, MARKOV_NOISES[i % len(MARKOV_NOISES)]) for i, k in enumerate(sorted(STATE_SPACE_KERNELS))]
    for solver in solvers:
        pairs = kernel_noise_pairs(STATE_SPACE_KERNELS, MARKOV_NOISES) if solver == "markov" else one_noise_each
        for kernel_name, noise_kind in pairs:
            if solver == "markov-parallel-square-root" and kernel_name in _FLOAT32_PARALLEL_KERNELS:
                continue
            if solver == "markov":
                slow = kernel_name == "sum_of_products"
            else:
                slow = solver in SLOW_SOLVERS or kernel_name not in MARKOV_KERNELS
            marks = [pytest.mark.slow] if slow else []
            if (solver == "markov-parallel" and kernel_name in _FLOAT32_PARALLEL_KERNELS) or (
                solver == "markov" and (FULL or kernel_name in _FLOAT32_KERNELS)
            ):
                marks.append(pytest.mark.float32)
            cases.append(pytest.param(solver, kernel_name, noise_kind, marks=marks))
    return cases


def _check(solver, kernel_name, noise_kind, seed, dim, rtol, x64):
    if not x64 and solver.endswith("square-root"):
        pytest.skip("in float32 the default form is the square-root form; the forced one is checked in float64")
    check_against_dense(SOLVERS[solver], state_space_problem(kernel_name, noise_kind, seed, dim), rtol)


@pytest.mark.parametrize("solver, kernel_name, noise_kind", _contract_cases(("markov", "markov-square-root")))
@given(seed=seeds, dim=data_dims)
def test_every_state_space_solver_equals_the_dense_solver(solver, kernel_name, noise_kind, seed, dim, rtol, x64):
    """Value, the cotangent of every input (kernel, x, y, noise, mean) and ``index_gradient``, for
    unsorted indices with ties, rank-deficient and zero noise blocks: 1e-9 relative in float64
    (float32: ``"markov"``, the square-root form, 2e-3). At ties of a kinked kernel both solvers
    take the mean of the one-sided derivatives."""
    _check(solver, kernel_name, noise_kind, seed, dim, rtol, x64)


@pytest.mark.parametrize("solver, kernel_name, noise_kind", _contract_cases(SLOW_SOLVERS))
@settings(max_examples=min(2, settings.default.max_examples))  # the associative scans: compile-bound
@given(seed=seeds, dim=data_dims)
def test_the_parallel_solvers_equal_the_dense_solver(solver, kernel_name, noise_kind, seed, dim, rtol, x64):
    _check(solver, kernel_name, noise_kind, seed, dim, rtol, x64)


@functools.partial(jax.jit, static_argnums=0)
def _rule_and_plain(solver, kernel, x, y, nz, mean):
    rule = jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver=solver), argnums=ALL_ARGS)
    plain = jax.value_and_grad(functools.partial(gg.reference.plain_log_marginal_likelihood, solver=solver), argnums=ALL_ARGS)
    return rule(kernel, x, y, nz, mean), plain(kernel, x, y, nz, mean)


@pytest.mark.parametrize("solver", solver_params(fast=("dense",), float32=("dense",)))
@settings(max_examples=min(2, settings.default.max_examples))
@given(seed=seeds)
def test_the_rule_equals_autodiff_of_the_solvers_own_forward_pass(solver, seed, rtol):
    """Two implementations, one truth: the closed-form rule against ``jax.grad`` through the same
    factorisation or filter (the plain baseline of the benchmarks), every cotangent. Not the
    square-root form: autodiff through its QR factorisations is undefined at a rank-deficient
    factor — a Cosine block's zero process noise, a tie, a rank-deficient noise block — and gives
    NaN there, where the rule (the covariance form's derivative) is exact; that form is checked
    against the dense solver above."""
    chosen = SOLVERS[solver]
    if isinstance(chosen, gg.solvers.Markov) and chosen.scheme(jnp.zeros(()).dtype).square_root:
        pytest.skip("autodiff through the square-root form's QR is not a reference (NaN at rank-deficient factors)")
    kernel_name = "quasi_periodic" if FULL else "scaled_sum"
    table = TIME_SERIES_KERNELS if kernel_name in TIME_SERIES_KERNELS else MARKOV_KERNELS
    problem = make_markov_problem(kernel_name, "per_point", seed, 3, kernel_table=table, ties=0)
    rule, plain = _rule_and_plain(chosen, *problem.args())
    assert_trees_close(rule, plain, 10 * rtol, f"{solver}: rule against autodiff of its forward pass")


@pytest.mark.parametrize("solver", solver_params(fast=("markov",), float32=("markov",)))
@pytest.mark.parametrize("kernel_name", ["quasi_periodic", pytest.param("scaled_sum", marks=pytest.mark.slow)])
def test_predict_equals_the_dense_posterior(solver, kernel_name, rtol):
    """Posterior mean and variance at new indices between, on and beyond the data, for three
    kinds of noise — and the full covariance (every solver has one: the protocol's default is
    the dense formula)."""
    for noise_kind, dim in (("isotropic", 3), ("per_point_rank_deficient", 3), ("per_point", 1)):
        kernel, x, y, nz, mean = state_space_problem(kernel_name, noise_kind, 2, dim).args()
        x_new = jnp.concatenate([x[:2], x[:3] + 0.37, jnp.array([0.01, 5.0], x.dtype)])
        got = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=SOLVERS[solver])
        want = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver="dense")
        assert_trees_close(got, want, 10 * rtol, f"{solver} predict {noise_kind}")
    full = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=SOLVERS[solver], full_covariance=True)
    assert_trees_close(full, gg.predict(kernel, x, y, nz, x_new, mean=mean, full_covariance=True, solver="dense"), 10 * rtol)


@pytest.mark.parametrize("solver", solver_params(fast=("markov",), float32=()))
def test_draws_have_the_posterior_moments(solver, x64):
    """4000 draws through the solver's ``sample`` (pathwise on the Markov path; the symmetric root
    of the covariance by default): mean and spread match the dense posterior's to the Monte-Carlo
    error."""
    if not x64:
        pytest.skip("float64 comparison")
    kernel, x, y, nz, _ = state_space_problem("quasi_periodic", "isotropic", 5, 1).args()
    x_new = jnp.linspace(-0.5, 3.5, 7)
    draws = gg.sample_posterior(jax.random.key(0), kernel, x, y, nz, x_new, 4000, solver=SOLVERS[solver])
    mean, var = gg.predict(kernel, x, y, nz, x_new, solver="dense")
    draws = np.asarray(draws).reshape(4000, -1)
    sd = np.sqrt(np.asarray(var).reshape(-1))
    np.testing.assert_array_less(np.abs(draws.mean(0) - np.asarray(mean).reshape(-1)), 5 * sd / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(0), sd, rtol=0.1)


# ------------------------------------------------------------ a solver of one's own


class _Reference(gg.solvers.Solver):
    """A whole solver in one method: the dense reference's ``L`` (plain autodiff)."""

    name = "reference"

    def log_likelihood(self, problem):
        return gg.reference.precision_form_log_likelihood(problem.kernel, problem.x, problem.r, problem.noise)


def test_a_solver_of_ones_own_is_one_class_and_one_registry_line(x64):
    """``log_likelihood`` alone gives the rest by the protocol's defaults (the gradient in ``x`` by
    autodiff, the posterior by the dense formula, draws from it); by name after ``register``."""
    gg.solvers.register("reference", _Reference())
    assert "reference" in gg.solvers.names()
    kernel, x, y, nz, mean = state_space_problem("quasi_periodic", "per_point_rank_deficient", 1, 3).args()
    rtol = 1e-9 if x64 else 2e-3
    for solver in ("reference", _Reference()):
        got = jax.value_and_grad(gg.log_marginal_likelihood, argnums=ALL_ARGS)(kernel, x, y, nz, mean, solver=solver)
        want = jax.value_and_grad(gg.log_marginal_likelihood, argnums=ALL_ARGS)(kernel, x, y, nz, mean, solver="dense")
        assert_trees_close(got, want, rtol, "value and cotangents")
    assert_trees_close(
        gg.index_gradient(kernel, x, y, nz, mean, solver="reference"), gg.index_gradient(kernel, x, y, nz, mean), rtol
    )
    x_new = jnp.array([0.2, 1.1], x.dtype)
    assert_trees_close(
        gg.predict(kernel, x, y, nz, x_new, mean=mean, solver="reference"),
        gg.predict(kernel, x, y, nz, x_new, mean=mean, solver="dense"),
        10 * rtol,
    )
    draws = gg.sample_posterior(jax.random.key(1), kernel, x, y, nz, x_new, 3, mean=mean, solver="reference")
    assert draws.shape == (3, 2, 3) and np.all(np.isfinite(draws))
    with pytest.raises(ValueError, match="other than 'auto'"):
        gg.solvers.register("auto", _Reference())
    with pytest.raises(TypeError, match="Solver instance"):
        gg.solvers.register("mine", "dense")
    with pytest.raises(TypeError, match="`solver` must be a name"):
        gg.log_marginal_likelihood(kernel, x, y, nz, solver=3)


def test_solver_objects_are_static_values():
    """Frozen, hashable and equal by their options: they ride through ``jit`` as static arguments
    and a new object with the same options reuses the compiled program."""
    a, b = gg.solvers.Markov(form="square-root", parallel=True), gg.solvers.Markov(form="square-root", parallel=True)
    assert a == b and hash(a) == hash(b) and a != gg.solvers.Markov()
    assert "square-root" in repr(a)
    with pytest.raises(ValueError, match="`form` must be None, 'covariance' or 'square-root'"):
        gg.solvers.Markov(form="sqrt")
    with pytest.raises(TypeError, match="`parallel` must be a bool"):
        gg.solvers.Markov(parallel=1)
    x = jnp.linspace(0.0, 3.0, 40)
    traces = []

    def value(x, solver):
        traces.append(solver)
        return gg.log_marginal_likelihood(kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1), solver=solver)

    f = jax.jit(value, static_argnames="solver")
    np.testing.assert_allclose(f(x, solver=a), f(x, solver=b))
    assert traces == [a], "an equal solver object traced again"


def test_log_marginal_likelihood_never_returns_a_bound():
    x = jnp.linspace(0.0, 3.0, 20)
    args = (kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1))
    with pytest.raises(ValueError, match="lower bound, not the log marginal likelihood"):
        gg.log_marginal_likelihood(*args, solver=gg.solvers.Inducing(x[::4]))
    # predict takes the bound's posterior as a solver object, the same as inducing=.
    by_object = gg.predict(*args, x[:3], solver=gg.solvers.Inducing(x[::4]))
    by_argument = gg.predict(*args, x[:3], inducing=x[::4])
    assert_trees_close(by_object, by_argument, 1e-12)


# ------------------------------------------------------------ one argument path


def _counting_kernel():
    """A Matérn 3/2 registered as a kernel of its own whose state-space form counts its builds."""
    builds = []

    @kernels.register
    class Counted(kernels.Kernel):
        variance: jnp.ndarray
        lengthscale: jnp.ndarray
        scalar_index_only = True

        def evaluate(self, a, b):
            return kernels.Matern32(self.variance, self.lengthscale).evaluate(a, b)

        def grad_first(self, a, b):
            return kernels.Matern32(self.variance, self.lengthscale).grad_first(a, b)

    def form(kernel):
        builds.append(1)
        return state_space.of(kernels.Matern32(kernel.variance, kernel.lengthscale))

    state_space.register(Counted, form)

    return Counted(jnp.asarray(1.0), jnp.asarray(0.7)), builds


def test_the_state_space_form_is_built_once_per_call():
    """Once per value call, once per value-and-gradient (the rule returns the blocks' cotangents;
    autodiff of the one build carries them to the kernel); never for what ``"auto"`` does not use."""
    kernel, builds = _counting_kernel()
    x = jnp.linspace(0.0, 5.0, 64)
    y, nz = jnp.sin(x), noise.Isotropic(0.1)
    gg.log_marginal_likelihood(kernel, x, y, nz, solver="markov")
    assert len(builds) == 1, f"value: {len(builds)} builds"
    builds.clear()
    jax.value_and_grad(gg.log_marginal_likelihood, argnums=(0, 1))(kernel, x, y, nz, solver="markov")
    assert len(builds) == 1, f"value and gradient: {len(builds)} builds"
    builds.clear()
    gg.index_gradient(kernel, x, y, nz, solver="markov")
    assert len(builds) == 1, f"index_gradient: {len(builds)} builds"
    builds.clear()
    gg.log_marginal_likelihood(kernel, x[:8], y[:8], nz)  # "auto" below MARKOV_MIN_POINTS: dense
    assert builds == [], "'auto' built a state-space form it did not use"
    gg.log_marginal_likelihood(kernel, x, y, nz)  # "auto" takes the Markov solver: one build
    assert len(builds) == 1
