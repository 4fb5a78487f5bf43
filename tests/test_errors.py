"""Bad input gets a clear error; hard but valid numerics give finite, correct results."""

from __future__ import annotations

import functools
import traceback
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from problems import assert_trees_close

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, testing

N = 5
CURVE = kernels.CubicSpline(1.0) + kernels.Linear(0.5) + kernels.Constant(1.0)
X = jnp.linspace(0.1, 2.0, N)
Y3 = jnp.stack([jnp.sin(X), jnp.cos(X), X], axis=1)
BLOCKS = jnp.broadcast_to(jnp.eye(3) / 0.2, (N, 3, 3))
PER_POINT = noise.PerPoint(BLOCKS)


class UnregisteredKernel(kernels.Kernel):
    """A subclass without ``@kernels.register``: JAX cannot see its parameters."""

    variance = 1.0

    def evaluate(self, a, b):
        return self.variance * jnp.exp(-((a - b) ** 2))

    def grad_first(self, a, b):
        return -2.0 * (a - b) * self.evaluate(a, b)

# (description, kwargs overriding the good call, exception, substrings of the message)
BAD_INPUTS = [
    ("x length differs from y", dict(x=X[:4]), ValueError, ["`y`", "(4,)", "(5, 3)"]),
    ("y of rank 3", dict(y=Y3[:, :, None]), ValueError, ["`y`", "(5, 3, 1)"]),
    ("x of rank 3", dict(x=X[:, None, None]), ValueError, ["`x`", "(n,) or (n, d)"]),
    ("empty x", dict(x=X[:0], y=Y3[:0]), ValueError, ["`x`", "n >= 1"]),
    ("mean shape", dict(mean=jnp.zeros((N, 2))), ValueError, ["`mean`", "(5, 3)", "(5, 2)"]),
    ("PerPoint blocks", dict(noise=noise.PerPoint(BLOCKS[:, :2, :2])), ValueError, ["blocks", "(5, 3, 3)", "(5, 2, 2)"]),
    ("PerPoint (n,) blocks for 3-D data", dict(noise=noise.PerPoint(jnp.ones(N))), ValueError, ["blocks", "(5, 3, 3)", "(5,)"]),
    ("Dense width", dict(noise=noise.Dense(jnp.ones((4, 14)))), ValueError, ["matrix", "(m, 15)", "(4, 14)"]),
    ("Isotropic sigma vector", dict(noise=noise.Isotropic(jnp.ones(3))), ValueError, ["sigma", "scalar"]),
    ("d-dim x with cubic spline", dict(x=jnp.ones((N, 2))), ValueError, ["CubicSpline", "(n,)", "(5, 2)"]),
    ("boolean x", dict(x=jnp.ones(N, bool)), TypeError, ["`x`", "floating", "bool"]),
    ("complex y", dict(y=Y3 + 0j), TypeError, ["`y`", "floating", "complex"]),
    ("boolean mean", dict(mean=np.zeros((N, 3), bool)), TypeError, ["`mean`", "bool"]),
    ("complex noise", dict(noise=noise.Isotropic(1.0 + 1j)), TypeError, ["noise.sigma", "real"]),
    ("integer-array kernel parameter", dict(kernel=kernels.ExpSquared(jnp.array(1), 1.0)), TypeError, ["kernel.variance", "dtype int"]),
    ("not a kernel", dict(kernel=lambda a, b: a * b), TypeError, ["`kernel`", "Kernel"]),
    ("not a noise", dict(noise=0.1), TypeError, ["`noise`", "Isotropic"]),
    ("negative index", dict(x=X - 1.0), ValueError, ["`x`", ">= 0", "CubicSpline"]),
    ("NaN index", dict(x=X.at[2].set(jnp.nan)), ValueError, ["`x`", "finite"]),
    ("inf data", dict(y=Y3.at[1, 1].set(jnp.inf)), ValueError, ["`y`", "finite"]),
    ("NaN mean", dict(mean=jnp.full((N, 3), jnp.nan)), ValueError, ["`mean`", "finite"]),
    ("NaN noise block", dict(noise=noise.PerPoint(BLOCKS.at[0, 0, 0].set(jnp.nan))), ValueError, ["noise.blocks", "finite"]),
    ("zero variance", dict(kernel=kernels.CubicSpline(0.0)), ValueError, ["kernel.variance", "> 0"]),
    ("negative nested variance", dict(kernel=CURVE + kernels.Linear(-1.0)), ValueError, ["kernel.k2.variance", "> 0"]),
    ("zero lengthscale", dict(kernel=kernels.Matern32(1.0, 0.0)), ValueError, ["kernel.lengthscale", "> 0"]),
    ("negative sigma", dict(noise=noise.Isotropic(-0.1)), ValueError, ["noise.sigma", "> 0"]),
    ("inf variance", dict(kernel=kernels.ExpSquared(jnp.inf, 1.0)), ValueError, ["kernel.variance", "finite"]),
    ("ARD lengthscale on scalar x", dict(kernel=kernels.ExpSquared(1.0, jnp.ones(2))), ValueError, ["ExpSquared.lengthscale", "shape ()", "(2,)"]),
    ("ARD lengthscale of the wrong length", dict(kernel=kernels.Matern52(1.0, jnp.ones(3)), x=jnp.stack([X, -X], 1)), ValueError, ["Matern52.lengthscale", "() or (2,)", "(3,)"]),
    ("vector variance", dict(kernel=CURVE + kernels.Constant(jnp.ones(2))), ValueError, ["Constant.variance", "shape ()", "(2,)"]),
    ("float16 x", dict(x=X.astype(jnp.float16)), TypeError, ["`x`", "float16", "float32 or float64"]),
    ("bfloat16 y", dict(y=Y3.astype(jnp.bfloat16)), TypeError, ["`y`", "bfloat16", "astype"]),
    ("float16 kernel parameter", dict(kernel=kernels.CubicSpline(jnp.float16(1.0))), TypeError, ["kernel.variance", "float16"]),
    ("unregistered custom kernel", dict(kernel=CURVE + UnregisteredKernel()), TypeError, ["UnregisteredKernel", "registered pytree", "kernels.register"]),
]


# Cases whose check needs concrete values (under jit the arguments are tracers), and cases
# whose argument is not an array at all (jax.jit / jax.grad refuse it before our code runs).
VALUE_CASES = {
    "negative index", "NaN index", "inf data", "NaN mean", "NaN noise block", "zero variance",
    "negative nested variance", "zero lengthscale", "negative sigma", "inf variance",
}
NON_ARRAY_CASES = {"not a kernel", "not a noise", "unregistered custom kernel"}
assert VALUE_CASES | NON_ARRAY_CASES <= {case[0] for case in BAD_INPUTS}


def _call(fn, kernel=CURVE, x=X, y=Y3, noise=PER_POINT, mean=None):
    return fn(kernel, x, y, noise, mean)


@pytest.mark.parametrize(
    "fn_name", ["log_marginal_likelihood", "precision_form", "index_gradient", "reference", "jit", "grad"]
)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(case, fn_name):
    _, overrides, exception, fragments = case
    fn = {
        "log_marginal_likelihood": gg.log_marginal_likelihood,
        "precision_form": gg.precision_form_log_likelihood,
        "index_gradient": gg.index_gradient,
        "reference": gg.reference.precision_form_log_likelihood,
        "jit": jax.jit(gg.precision_form_log_likelihood),  # shape, dtype and constant checks happen at trace time
        "grad": jax.grad(gg.precision_form_log_likelihood, argnums=0),
    }[fn_name]
    if fn_name == "jit" and case[0] in VALUE_CASES:
        pytest.skip("value checks of traced arguments are the job of value_checks (tested below)")
    # Eager jax.grad: the differentiated argument's value is known, and checked as eagerly.
    if fn_name in ("jit", "grad") and case[0] in NON_ARRAY_CASES:
        pytest.skip("jax.jit / jax.grad reject a non-array argument themselves, before our code runs")
    if fn_name == "grad" and case[0] == "integer-array kernel parameter":
        pytest.skip("jax.grad itself rejects integer arguments it differentiates, with its own message")
    with pytest.raises(exception) as info:
        _call(fn, **overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_integer_indices_and_data_are_promoted_like_jax_numpy(solver, rtol):
    """Frame numbers and integer counts: the same result as the float arrays jnp would make."""
    x, y = np.arange(10), np.arange(10) % 3
    kernel, nz = kernels.Matern32(1.0, 2.0), noise.Isotropic(0.5)
    got = gg.precision_form_log_likelihood(kernel, x, y, nz, mean=np.ones(10, np.int32), solver=solver)
    want = gg.precision_form_log_likelihood(kernel, jnp.asarray(x, float), jnp.asarray(y, float), nz, mean=jnp.ones(10), solver=solver)
    assert got.dtype == want.dtype == jnp.result_type(float)
    np.testing.assert_allclose(got, want, rtol=rtol)
    mean, _ = gg.predict(kernel, x, y, nz, np.array([2, 7]), solver=solver)
    assert mean.dtype == jnp.result_type(float)


@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_python_lists_and_scalar_means_are_accepted(solver, rtol):
    """Lists where ``jax.numpy`` takes them (no deprecation warning), a constant mean as a number."""
    kernel, nz = kernels.Matern32(1.0, 1.0), noise.Isotropic(0.3)
    x, y = [0.0, 0.5, 1.5, 2.0], [0.1, -0.2, 0.4, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gg.precision_form_log_likelihood(kernel, x, y, nz, mean=0.5, solver=solver)
        mean, var = gg.predict(kernel, x, y, nz, [0.25, 1.0], mean=0.5, mean_new=0.5, solver=solver)
    want = gg.precision_form_log_likelihood(kernel, jnp.asarray(x), jnp.asarray(y), nz, mean=jnp.full(4, 0.5), solver=solver)
    np.testing.assert_allclose(got, want, rtol=rtol)
    want_mean, want_var = gg.predict(kernel, jnp.asarray(x), jnp.asarray(y), nz, jnp.array([0.25, 1.0]), mean=jnp.full(4, 0.5), mean_new=jnp.full(2, 0.5), solver=solver)
    np.testing.assert_allclose(mean, want_mean, rtol=rtol)
    np.testing.assert_allclose(var, want_var, rtol=rtol)


def test_predict_refuses_non_finite_new_indices_and_means():
    kernel, nz = kernels.Matern32(1.0, 1.0), noise.Isotropic(0.3)
    x = jnp.linspace(0.0, 1.0, 4)
    with pytest.raises(ValueError, match=r"`x_new` must be finite, got \[0.5, nan\]"):
        gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5, jnp.nan]))
    with pytest.raises(ValueError, match="`mean_new` must be finite"):
        gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5]), mean_new=jnp.array([jnp.inf]))


def test_value_checks_under_jit_with_checkify():
    def loss(x, y, sigma):
        nz = noise.Isotropic(sigma)
        gg.value_checks(CURVE, x, y, nz)
        return gg.precision_form_log_likelihood(CURVE, x, y, nz)

    checked = jax.jit(checkify.checkify(loss, errors=checkify.user_checks))
    error, value = checked(X, Y3, 0.3)
    error.throw()  # nothing wrong
    assert np.isfinite(value)
    for args, fragment in [
        ((X - 1.0, Y3, 0.3), "`x` must be >= 0"),
        ((X, Y3.at[0, 0].set(jnp.nan), 0.3), "`y` must be finite"),
        ((X, Y3, -0.3), "`noise.sigma` must be > 0"),
    ]:
        error, _ = checked(*args)
        with pytest.raises(checkify.JaxRuntimeError, match=fragment):
            error.throw()


# float32, 60 points on [0, 1] under a smooth kernel with tiny noise: K/σ² ~ 1e6 with eigenvalues
# decaying to rounding, and the Cholesky factorisation of U breaks down.
BREAKDOWN = (
    kernels.ExpSquared(jnp.float32(1.0), jnp.float32(3.0)),
    jnp.linspace(0.0, 1.0, 60, dtype=jnp.float32),
    jnp.sin(jnp.linspace(0.0, 1.0, 60, dtype=jnp.float32)),
    noise.Isotropic(jnp.float32(1e-4)),  # cond(U) ≈ 7e10: beyond float32
)
BREAKDOWN_FUNCTIONS = {
    "value": gg.precision_form_log_likelihood,
    "log_marginal_likelihood": gg.log_marginal_likelihood,
    "index_gradient": gg.index_gradient,
    "grad": jax.grad(gg.precision_form_log_likelihood, argnums=1),
}


@pytest.mark.float32
@pytest.mark.parametrize("name", sorted(BREAKDOWN_FUNCTIONS))
def test_failed_factorisation_is_one_outcome_eagerly_and_under_jit(name):
    """Eagerly a FactorizationError naming the cause and the remedy; under jit a NaN, and through
    checkify an error — with no value_checks call of the caller's."""
    fn = BREAKDOWN_FUNCTIONS[name]
    with pytest.raises(gg.FactorizationError, match=r"(?s)float32.*could not be Cholesky-factored.*condition number.*Rescale.*float64"):
        fn(*BREAKDOWN)
    assert not np.all(np.isfinite(jax.tree_util.tree_leaves(jax.jit(fn)(*BREAKDOWN))[0]))
    error, _ = jax.jit(checkify.checkify(fn))(*BREAKDOWN)
    with pytest.raises(checkify.JaxRuntimeError, match=r"(?s)not finite in float32.*Rescale.*float64"):
        error.throw()


@pytest.mark.float32
def test_ill_conditioned_but_usable_results_are_returned_with_one_warning():
    """A float32 cubic spline on [0, 3000]: cond(U) far beyond 1/eps, yet the result is the one
    jit returns, close to float64's: a warning (once per solver and precision), not an error."""
    x = jnp.linspace(0.0, 3000.0, 40)
    args = (kernels.CubicSpline(1.0), x.astype(jnp.float32), jnp.sin(x).astype(jnp.float32), noise.Isotropic(jnp.float32(0.01)))
    testing.reset_warnings()
    with pytest.warns(gg.ConditioningWarning, match=r"float32 resolves this dense problem.*condition number of about"):
        eager = gg.precision_form_log_likelihood(*args, solver="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        again = gg.precision_form_log_likelihood(*args, solver="dense")
    jitted = jax.jit(functools.partial(gg.precision_form_log_likelihood, solver="dense"))(*args)
    assert eager == again == jitted
    if jax.config.jax_enable_x64:
        with warnings.catch_warnings():  # cond(U) ≈ 1e15: float64 warns too
            warnings.simplefilter("ignore", gg.ConditioningWarning)
            want = gg.precision_form_log_likelihood(kernels.CubicSpline(1.0), x, jnp.sin(x), noise.Isotropic(0.01), solver="dense")
        np.testing.assert_allclose(eager, want, rtol=1e-3)


@pytest.mark.float32
@pytest.mark.skipif(jax.config.jax_enable_x64, reason="a float32 question (the float32 pass)")
def test_dense_float32_gradient_is_right_or_warned_eagerly_and_under_jit():
    """The camera curve the dense solver got 8.6 % wrong in float32 without a word (200 points on
    [0, 3], rank-2 blocks (I − rrᵀ)/0.01): now a ConditioningWarning, eagerly and from a jitted
    (and a vmapped) gradient; a well-conditioned problem stays silent."""
    rng = np.random.default_rng(0)
    n = 200
    x = np.linspace(0.0, 3.0, n)
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1)
    rays = rng.normal(size=(n, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    blocks = jnp.asarray((np.eye(3) - rays[:, :, None] * rays[:, None, :]) / 0.01, jnp.float32)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def gradient(x, y, blocks):
        return jax.grad(gg.log_marginal_likelihood, argnums=1)(CURVE, x, y, noise.PerPoint(blocks), solver="dense")

    for run, batched in ((gradient, False), (jax.jit(gradient), False), (jax.jit(jax.vmap(gradient)), True)):
        testing.reset_warnings()
        args = (x[None], y[None], blocks[None]) if batched else (x, y, blocks)
        with pytest.warns(gg.ConditioningWarning, match=r"dense problem.*condition number of about \d\.\de\+0[6-8]"):
            jax.block_until_ready(run(*args))
            jax.effects_barrier()
    testing.reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gg.ConditioningWarning)
        quiet = noise.Isotropic(jnp.float32(0.3))
        jax.grad(gg.log_marginal_likelihood, argnums=1)(kernels.Matern32(1.0, 1.0), x, y, quiet, solver="dense")


def test_invalid_domain_under_jit_is_nan_never_a_finite_number():
    """Negative indices of the curve kernel, a zero variance: eagerly an error; under jit the value
    and every cotangent NaN (before: a finite 236.886 for negative indices); under vmap only the
    offending problem's."""
    x = jnp.linspace(-1.0, 2.0, 40)
    y = jnp.sin(x)

    def value(x, variance):
        return gg.log_marginal_likelihood(kernels.CubicSpline(variance), x, y, noise.Isotropic(0.1))

    with pytest.raises(ValueError, match="`x` must be >= 0"):
        value(x, 1.0)
    for solver_value in (jax.jit(value), jax.jit(jax.value_and_grad(value, argnums=(0, 1)))):
        for leaf in jax.tree_util.tree_leaves(solver_value(x, 1.0)):
            assert np.all(np.isnan(leaf)), leaf
    assert np.isfinite(jax.jit(value)(x + 1.0, 1.0))
    values = jax.jit(jax.vmap(value, in_axes=(None, 0)))(x + 1.0, jnp.array([1.0, 0.0, 2.0]))
    assert np.isfinite(values[0]) and np.isnan(values[1]) and np.isfinite(values[2])
    new = jax.jit(lambda x_new: gg.predict(kernels.CubicSpline(1.0), x + 1.0, y, noise.Isotropic(0.1), x_new))
    assert np.all(np.isnan(new(jnp.array([-0.5, 1.0]))[0])) and np.all(np.isfinite(new(jnp.array([0.5, 1.0]))[0]))


def test_dense_predictions_that_cannot_fit_in_memory_say_so_first():
    """Draws at 10⁵ new points: "auto" takes the Markov solver where the kernel has a state-space
    form (it picked dense from the 10 observations, and asked for 80 GB); without one, a clear
    error before any allocation instead of a dead process."""
    x, y = jnp.linspace(0.0, 10.0, 10), jnp.sin(jnp.linspace(0.0, 10.0, 10))
    x_new = jnp.linspace(0.0, 10.0, 100_000)
    draws = gg.sample_posterior(jax.random.key(0), kernels.Matern32(1.0, 3.0), x, y, noise.Isotropic(0.1), x_new, 1)
    assert draws.shape == (1, 100_000) and np.all(np.isfinite(draws))
    with pytest.raises(ValueError, match=r"draws with solver .dense. at 100000 new rows .* GiB, more than the .* GiB free.*state-space form"):
        gg.sample_posterior(jax.random.key(0), kernels.ExpSquared(1.0, 3.0), x, y, noise.Isotropic(0.1), x_new, 1)
    with pytest.raises(ValueError, match="the full covariance at 100000 new rows"):
        gg.predict(kernels.ExpSquared(1.0, 3.0), x, y, noise.Isotropic(0.1), x_new, full_covariance=True)


def test_value_rules_reach_checkify_without_value_checks():
    def loss(x, y, sigma):
        return gg.precision_form_log_likelihood(CURVE, x, y, noise.Isotropic(sigma))

    checked = jax.jit(checkify.checkify(loss))
    error, _ = checked(X, Y3, 0.3)
    error.throw()
    error, _ = checked(X - 1.0, Y3, 0.3)
    with pytest.raises(checkify.JaxRuntimeError, match="`x` must be >= 0"):
        error.throw()
    error, _ = jax.jit(checkify.checkify(jax.grad(loss, argnums=2)))(X, Y3, -0.3)
    with pytest.raises(checkify.JaxRuntimeError, match=r"`noise\.sigma` must be > 0"):
        error.throw()


@pytest.mark.float32
@pytest.mark.parametrize("solver", ["markov", pytest.param("markov-parallel", marks=pytest.mark.slow)])
def test_state_space_overflow_names_the_cause_and_the_remedy(solver):
    """float32 data of 1e18 seen with precisions of 1e44: whitened, they overflow; the NaN the
    filter would return is an error instead. (Gaps of 77 under the cubic spline, which overflowed
    the covariance form, are fine in square roots: tests/test_float32.py.)"""
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 30.0, 40)
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) * 1e18
    rays = rng.normal(size=(40, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) * 1e22
    args = (CURVE, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), noise.PerPoint(jnp.asarray(blocks, jnp.float32)))
    for fn in (gg.precision_form_log_likelihood, gg.index_gradient, jax.grad(gg.precision_form_log_likelihood, argnums=1)):
        with pytest.raises(gg.NumericalError, match=r"(?s)non-finite result in float32.*overflowed.*float64"):
            fn(*args, solver=solver)


@pytest.mark.float32
def test_overflow_of_the_value_says_so():
    y = jnp.array([0.0, 0.0, 1e30], jnp.float32)
    with pytest.raises(gg.NumericalError, match=r"(?s)overflowed float32.*rescale"):
        gg.precision_form_log_likelihood(kernels.ExpSquared(1.0, 1.0), jnp.zeros(3, jnp.float32), y, noise.Isotropic(jnp.float32(1.0)))


# --------------------------------------------------------- hard but valid


def _agree_with_reference(kernel, x, y, nz, rtol):
    value, grads = jax.value_and_grad(gg.precision_form_log_likelihood, argnums=(0, 1, 2, 3))(kernel, x, y, nz)
    ref = jax.value_and_grad(gg.reference.precision_form_log_likelihood, argnums=(0, 1, 2, 3))(kernel, x, y, nz)
    assert_trees_close((value, grads), ref, rtol, "vs reference")


HARD_CASES = {
    "duplicated indices": (CURVE, X.at[3].set(X[1]), None),
    "all-equal indices": (CURVE, jnp.full(N, 0.7), None),
    "index at zero": (CURVE, X.at[0].set(0.0), None),
    "singular K (linear + constant)": (kernels.Linear(1.0) + kernels.Constant(1.0), X, None),
    "tiny lengthscale": (kernels.Matern52(1.0, 1e-6), X, None),
    "huge lengthscale": (kernels.ExpSquared(1.0, 1e6), X, None),
    "tiny Matern32 lengthscale": (kernels.Matern32(1.0, 1e-4), X, None),
    "rank-zero noise blocks": (CURVE, X, noise.PerPoint(BLOCKS.at[1:3].set(0.0))),
    "all noise blocks zero": (CURVE, X, noise.PerPoint(jnp.zeros_like(BLOCKS))),
}


@pytest.mark.parametrize("case", sorted(HARD_CASES))
def test_hard_but_valid_inputs_are_finite_and_match_the_reference(case, rtol):
    kernel, x, nz = HARD_CASES[case]
    _agree_with_reference(kernel, x, Y3, nz or noise.PerPoint(BLOCKS), rtol)


@pytest.mark.float32
@pytest.mark.parametrize("kernel_type", [kernels.ExpSquared, kernels.Matern32, kernels.Matern52])
def test_lengthscale_whose_square_underflows_gives_an_exact_white_kernel(kernel_type, x64):
    """ℓ² underflows and (x_i − x_j)/ℓ² overflows: K must be σ²I and ∂L/∂x exactly 0, not NaN."""
    lengthscale = 1e-200 if x64 else 1e-30
    kernel = kernel_type(1.0, lengthscale)
    value, grad_x = jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1)(kernel, X, Y3, noise.PerPoint(BLOCKS))
    white = gg.precision_form_log_likelihood(kernels.ExpSquared(1.0, 1e-3), X, Y3, noise.PerPoint(BLOCKS))
    np.testing.assert_allclose(value, white, rtol=1e-6)
    np.testing.assert_array_equal(grad_x, np.zeros(N))


@pytest.mark.parametrize("nz", [noise.Isotropic(0.3), noise.PerPoint(jnp.ones((1, 3, 3))), noise.Dense(jnp.ones((2, 3)))])
def test_a_single_point(nz, rtol):
    _agree_with_reference(CURVE, jnp.array([0.4]), Y3[:1], nz, rtol)


# ------------------------------------------------------------------- fuzz

DOCUMENTED_ERRORS = (TypeError, ValueError, gg.NumericalError)  # FactorizationError is a NumericalError
CULPRITS = ("`x`", "`y`", "`mean`", "`kernel", "`noise", "noise.", "kernel", "indices")


@st.composite
def arbitrary_calls(draw):
    n = draw(st.sampled_from([1, 3]))
    dim = draw(st.sampled_from([None, 1, 3]))
    x_dims = draw(st.sampled_from([(n,), (n, 2), (n + 1,), (n, 1, 1)]))
    y_shape = (n,) if dim is None else (n, dim)
    if draw(st.booleans()):
        y_shape = draw(st.sampled_from([(n + 1,), (n, 2, 1), ()]))
    dtype = draw(st.sampled_from(["float32", "float64", "int32", "complex64", "bool"]))
    values = st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, np.nan, np.inf, 3.0])

    def array(shape, dtype=dtype):
        flat = [draw(values) for _ in range(int(np.prod(shape, dtype=int)))]
        with np.errstate(all="ignore"):
            return np.asarray(flat, np.float64).reshape(shape).astype(dtype)

    kernel = draw(
        st.sampled_from(
            [
                kernels.CubicSpline(draw(values)),
                kernels.ExpSquared(draw(values), draw(values)) + kernels.Linear(draw(values)),
                kernels.Matern32(1.0, draw(values)) * kernels.Constant(draw(values)),
            ]
        )
    )
    d = 1 if dim is None else dim
    nz = draw(
        st.sampled_from(
            [
                noise.Isotropic(draw(values)),
                noise.PerPoint(array((n, d, d), "float64")),
                noise.PerPoint(array((n,), "float64")),
                noise.Dense(array((n * d, n * d), "float64")),
                noise.Dense(array((2, n * d + 1), "float64")),
            ]
        )
    )
    mean = None if draw(st.booleans()) else array(y_shape)
    return kernel, array(x_dims), array(y_shape), nz, mean


@pytest.mark.float32
@settings(max_examples=150 if settings.default.max_examples >= 12 else 30)
@given(call=arbitrary_calls(), fn=st.sampled_from(["value", "grad", "index_gradient"]))
def test_fuzz_public_functions_return_finite_or_raise_documented_errors(call, fn):
    kernel, x, y, nz, mean = call
    target = {
        "value": gg.precision_form_log_likelihood,
        "grad": jax.grad(gg.precision_form_log_likelihood, argnums=(0, 1, 3)),
        "index_gradient": gg.index_gradient,
    }[fn]
    try:
        out = target(kernel, x, y, nz, mean)
    except DOCUMENTED_ERRORS as err:
        if fn == "grad" and str(err).startswith("grad requires real- or complex-valued inputs"):
            return  # jax.grad's own front door: an integer or boolean argument to differentiate
        # The library's own check, not an error from deep inside JAX, and it names the culprit.
        origin = traceback.extract_tb(err.__traceback__)[-1].filename
        assert "gpgrad_jax" in origin and "site-packages/jax" not in origin, (origin, err)
        assert any(word in str(err) for word in CULPRITS), err
        return
    for leaf in jax.tree_util.tree_leaves(out):
        assert np.all(np.isfinite(np.asarray(leaf))), f"non-finite result {out} without an error"
