"""The inducing-point bound: value against independent constructions, its closed-form rule against
autodiff of the dense reference and finite differences, the variational posterior, bad input."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    FULL,
    KERNELS,
    assert_trees_close,
    data_dims,
    index_dims,
    jaxpr_shapes,
    kernel_noise_pairs,
    make_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, reference

N, M = 7, 4  # data points, inducing points: fixed shapes, one compilation per structure
BOUND_NOISES = ("isotropic", "per_point", "per_point_rank_deficient")
ALL_ARGS = (0, 1, 2, 3, 4, 5)  # kernel, x, y, noise, inducing, mean
INDUCING_KERNELS = [*sorted(KERNELS), "rational_quadratic", "matern12"]


@kernels.register
class RationalQuadratic(kernels.Kernel):
    """A user's kernel: ``k = σ² (1 + ‖a − b‖² / (2αℓ²))^(−α)``, with its hand-written derivative."""

    variance: jnp.ndarray
    lengthscale: jnp.ndarray
    alpha: jnp.ndarray
    positive_fields = ("variance", "lengthscale", "alpha")

    def evaluate(self, a, b):
        return self.variance * (1.0 + jnp.sum((a - b) ** 2) / (2 * self.alpha * self.lengthscale**2)) ** -self.alpha

    def grad_first(self, a, b):
        base = 1.0 + jnp.sum((a - b) ** 2) / (2 * self.alpha * self.lengthscale**2)
        return -self.variance * base ** (-self.alpha - 1.0) * (a - b) / self.lengthscale**2


def make_bound_problem(kernel_name, noise_kind, seed, dim, index_dim):
    """A problem with two tied indices and inducing inputs of which two coincide with data points."""
    if kernel_name in ("rational_quadratic", "matern12"):
        problem = make_problem("exp_squared", noise_kind, seed, dim, index_dim, n=N)
        rng = np.random.default_rng(seed + 1)
        if kernel_name == "matern12":  # a kink where an inducing input meets a data point
            kernel = kernels.Matern12(rng.uniform(0.5, 2.0), rng.uniform(0.5, 1.5))
        else:
            kernel = RationalQuadratic(rng.uniform(0.5, 2.0), rng.uniform(0.5, 1.5), rng.uniform(0.5, 3.0))
        problem.kernel = jax.tree_util.tree_map(lambda a: jnp.asarray(a, problem.x.dtype), kernel)
    else:
        problem = make_problem(kernel_name, noise_kind, seed, dim, index_dim, n=N)
    rng = np.random.default_rng(seed)
    x = np.array(problem.x)
    x[1] = x[4]  # a tie
    z = x[rng.permutation([0, 1, 2, 3, 5, 6])[:M]].copy()  # distinct (x[4] is x[1]): K_zz stays invertible
    z[2:] += 0.3 * rng.normal(size=z[2:].shape)  # two inducing inputs at data points, two elsewhere
    if any(part.nonnegative_index for part in problem.kernel.parts()):
        z = np.abs(z)
    problem.x = jnp.asarray(x)
    return problem, jnp.asarray(z, x.dtype)


#: The fast profile's kernels: a user's, a kinked one, the curve, a product, smooth d-dimensional ones.
FAST_KERNELS = ["rational_quadratic", "matern12", "curve", "scaled_product_plus_constant", "exp_squared", "matern52"]


def _cases():
    names = INDUCING_KERNELS if FULL else FAST_KERNELS
    if not FULL and not jax.config.jax_enable_x64:
        names = names[:3]
    return kernel_noise_pairs(names, BOUND_NOISES)


#: Random inducing inputs near data points make K_zz ill-conditioned: at the float64 default
#: jitter (1e-8) rounding alone moves both routes by ~1e-8. The rule is checked at 1e-6, where
#: the problems are well-conditioned (the default is exercised by the other tests).
TEST_JITTER = 1e-6 if jax.config.jax_enable_x64 else 1e-4


@jax.jit
def _closed_and_reference(kernel, x, y, nz, z, mean):
    closed = jax.value_and_grad(functools.partial(gg.inducing_bound, jitter=TEST_JITTER), argnums=ALL_ARGS)
    ref = jax.value_and_grad(functools.partial(reference.inducing_bound, jitter=TEST_JITTER), argnums=ALL_ARGS)
    return closed(kernel, x, y, nz, z, mean), ref(kernel, x, y, nz, z, mean)


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name, noise_kind", _cases())
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_every_cotangent_equals_autodiff_of_the_dense_reference(kernel_name, noise_kind, seed, dim, index_dim, rtol):
    """Value and the cotangents of the kernel, x, y, the noise, Z and the mean: the closed-form rule
    against jax.grad of the n × n reference, with ties in x, inducing inputs at data points, rank-
    deficient and zero noise blocks; 1e-9 in float64."""
    problem, z = make_bound_problem(kernel_name, noise_kind, seed, dim, index_dim)
    kernel, x, y, nz, mean = problem.args()
    (value, grads), (ref_value, ref_grads) = _closed_and_reference(kernel, x, y, nz, z, mean)
    assert_trees_close(value, ref_value, rtol, "bound")
    for name, grad, ref in zip(("kernel", "x", "y", "noise", "inducing", "mean"), grads, ref_grads):
        assert_trees_close(grad, ref, rtol, f"d/d{name}")


def _numpy_bound(kernel, x, y, nz, z, mean, jitter):
    """The textbook covariance form, in NumPy: log N(y | μ, Q ⊗ I + Λ⁻¹) − ½ Σ tr(Λ_i)(k_ii − Q_ii)."""
    x, y, z, mean = (np.asarray(a, np.float64) for a in (x, y, z, mean))
    n = x.shape[0]
    y = y.reshape(n, -1)
    dim = y.shape[1]
    gram = np.asarray(kernel.matrix(z, z), np.float64)
    gram = gram + jitter * np.mean(np.diag(gram)) * np.eye(len(z))
    cross = np.asarray(kernel.matrix(x, z), np.float64)
    low_rank = cross @ np.linalg.solve(gram, cross.T)
    precision = np.asarray(nz.dense_matrix(n, dim), np.float64)
    precision = precision.T @ precision
    cov = np.kron(low_rank, np.eye(dim)) + np.linalg.inv(precision)
    r = (y - mean.reshape(n, dim)).reshape(-1)
    _, logdet = np.linalg.slogdet(cov)
    log_density = -0.5 * r @ np.linalg.solve(cov, r) - 0.5 * logdet - 0.5 * n * dim * math.log(2 * math.pi)
    block_traces = np.trace(precision.reshape(n, dim, n, dim), axis1=1, axis2=3).diagonal()
    leftover = np.diag(np.asarray(kernel.matrix(x, x), np.float64)) - np.diag(low_rank)
    return log_density - 0.5 * np.sum(block_traces * leftover)


@pytest.mark.parametrize(
    "kernel_name, noise_kind", _cases() if FULL else [("rational_quadratic", "per_point")]
)
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_value_equals_the_textbook_covariance_form(kernel_name, noise_kind, seed, dim, index_dim, x64):
    """Against an independent NumPy construction with Λ⁻¹ (invertible noise only)."""
    if noise_kind == "per_point_rank_deficient":
        noise_kind = "per_point"
    problem, z = make_bound_problem(kernel_name, noise_kind, seed, dim, index_dim)
    jitter = 1e-6 if x64 else 1e-4
    value = gg.inducing_bound(*problem.args()[:4], z, problem.mean, jitter=jitter)
    expected = _numpy_bound(*problem.args()[:4], z, problem.mean, jitter)
    assert abs(float(value) - expected) <= (1e-9 if x64 else 2e-3) * max(1.0, abs(expected))


def _mean_of_one_sided_differences(f, array, h):
    """The mean of the one-sided second-order differences, ``[4(f₊₁ − f₋₁) − (f₊₂ − f₋₂)] / 4h``:
    O(h²) away from kinks and at one (a plain central difference is O(h) there)."""
    flat = np.array(array, np.float64).reshape(-1)
    out = np.zeros_like(flat)
    at = lambda k, t: f((flat + t * h * np.eye(flat.size)[k]).reshape(array.shape))  # noqa: E731
    for k in range(flat.size):
        out[k] = (4 * (at(k, 1) - at(k, -1)) - (at(k, 2) - at(k, -2))) / (4 * h)
    return out.reshape(array.shape)


@pytest.mark.parametrize("kernel_name", ["matern12", "exp_squared", "rational_quadratic"] if FULL else ["matern12"])
@settings(max_examples=min(2, settings.default.max_examples))
@given(seed=seeds)
def test_index_gradients_equal_central_differences(kernel_name, seed, x64):
    """∂F/∂x and ∂F/∂Z against finite differences of the bound itself — where autodiff of the
    reference is suspect: Matérn 1/2 has a kink where an inducing input meets a data point, and
    its gradient there is the mean of the one-sided derivatives."""
    if not x64:
        pytest.skip("finite differences need float64")
    problem, z = make_bound_problem(kernel_name, "isotropic", seed, 1, None)
    kernel, x, y, nz, mean = problem.args()
    bound = jax.jit(gg.inducing_bound)
    grad_x, grad_z = jax.jit(jax.grad(gg.inducing_bound, argnums=(1, 4)))(kernel, x, y, nz, z, mean)
    fd_x = _mean_of_one_sided_differences(lambda v: float(bound(kernel, jnp.asarray(v), y, nz, z, mean)), x, 1e-5)
    fd_z = _mean_of_one_sided_differences(lambda v: float(bound(kernel, x, y, nz, jnp.asarray(v), mean)), z, 1e-5)
    np.testing.assert_allclose(grad_x, fd_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_z, fd_z, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("noise_kind", BOUND_NOISES if FULL else ["per_point_rank_deficient"])
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_bound_is_exact_at_the_data_and_below_elsewhere(noise_kind, seed, dim, index_dim, x64):
    """Z = x gives the exact log density (jitter 0: Q = K); any other Z gives less."""
    if not x64:
        pytest.skip("Z = x with no jitter needs float64")
    problem, z = make_bound_problem("matern52", noise_kind, seed, dim, index_dim)
    kernel, x, y, nz, mean = problem.args()
    x = x.at[1].add(0.1)  # no tie: K_xx must be invertible for Z = x without jitter
    exact = float(gg.log_marginal_likelihood(kernel, x, y, nz, mean))
    at_data = float(gg.inducing_bound(kernel, x, y, nz, x, mean, jitter=0.0))
    assert abs(at_data - exact) <= 1e-8 * max(1.0, abs(exact))
    assert float(gg.inducing_bound(kernel, x, y, nz, z, mean)) <= exact + 1e-9


def test_no_n_by_n_array_and_linear_memory():
    """The forward pass and the rule hold nothing with two axes of n (n = 61, m = 5)."""
    n, m = 61, 5
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 2)))
    y = jnp.asarray(rng.normal(size=(n, 3)))
    z = jnp.asarray(rng.normal(size=(m, 2)))
    k = kernels.ExpSquared(1.0, jnp.array([1.0, 0.7]))
    for nz in (noise.Isotropic(0.3), noise.PerPoint(jnp.broadcast_to(3.0 * jnp.eye(3), (n, 3, 3)))):
        shapes = jaxpr_shapes(jax.value_and_grad(gg.inducing_bound, argnums=ALL_ARGS[:5]), k, x, y, nz, z)
        offenders = {s for s in shapes if sum(1 for a in s if a == n) >= 2}
        assert not offenders, f"arrays with two axes of n: {offenders}"
        assert any(n in s and m in s for s in shapes)  # the n × m cross-covariance is there


@pytest.mark.slow  # compiles the blocked scan with its remainder: ~9 s
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rank_deficient"])
def test_blocked_backward_pass_equals_the_reference(noise_kind, rtol):
    """The rule runs over blocks of points (a scan and a remainder): with blocks of 10 points,
    61 points take six full blocks and one of a single point; every cotangent still equals the
    reference's."""
    problem = make_problem("matern52", noise_kind, 11, 3, 2, n=61)
    kernel, x, y, nz, mean = problem.args()
    z = x[:5] + 0.1
    closed = jax.value_and_grad(
        functools.partial(gg.inducing_bound, jitter=TEST_JITTER, points_per_block=10), argnums=ALL_ARGS
    )
    ref = jax.value_and_grad(functools.partial(reference.inducing_bound, jitter=TEST_JITTER), argnums=ALL_ARGS)
    (value, grads), (ref_value, ref_grads) = closed(kernel, x, y, nz, z, mean), ref(kernel, x, y, nz, z, mean)
    assert_trees_close(value, ref_value, rtol, "bound")
    for name, grad, ref in zip(("kernel", "x", "y", "noise", "inducing", "mean"), grads, ref_grads):
        assert_trees_close(grad, ref, rtol, f"d/d{name}")


def _layout_problem():
    problem, z = make_bound_problem("exp_squared", "isotropic", 3, 3, 2)  # x[6] sits on z[1]
    return (*problem.args(), z)


def test_jit_and_vmap_agree_with_the_reference():
    """vmap over a batch of latent layouts, under jit."""
    kernel, x, y, nz, mean, z = _layout_problem()
    batch = x[None] + 0.1 * jnp.arange(3.0)[:, None, None]
    closed = jax.jit(jax.vmap(jax.grad(gg.inducing_bound, argnums=1), in_axes=(None, 0, None, None, None, None)))
    ref = jax.jit(jax.vmap(jax.grad(reference.inducing_bound, argnums=1), in_axes=(None, 0, None, None, None, None)))
    tolerance = 1e-9 if x.dtype == jnp.float64 else 2e-3
    assert_trees_close(closed(kernel, batch, y, nz, z, mean), ref(kernel, batch, y, nz, z, mean), tolerance, "vmap")


@pytest.mark.slow  # compiling the reference's Hessian takes ~8 s
def test_second_order_agrees_with_the_reference():
    """The Hessian in (x, Z) by reverse-over-reverse through the rule, against the reference's —
    with a data point on an inducing input, where the kernel's second derivative at a tie counts."""
    kernel, x, y, nz, mean, z = _layout_problem()
    hessian = jax.jit(jax.hessian(gg.inducing_bound, argnums=(1, 4)))(kernel, x, y, nz, z, mean)
    ref_hessian = jax.jit(jax.hessian(reference.inducing_bound, argnums=(1, 4)))(kernel, x, y, nz, z, mean)
    assert_trees_close(hessian, ref_hessian, 1e-8 if x.dtype == jnp.float64 else 5e-3, "hessian")


def _predict_numpy(kernel, x, y, nz, z, x_new, mean, mean_new, jitter):
    """Titsias' predictive in covariance form: Σ = (K_zz + K_zx Λ K_xz)⁻¹ per coordinate block."""
    x, y, z, x_new = (np.asarray(a, np.float64) for a in (x, y, z, x_new))
    n = x.shape[0]
    y = y.reshape(n, -1) - np.asarray(mean).reshape(n, -1)
    dim = y.shape[1]
    eye = np.eye(dim)
    gram = np.asarray(kernel.matrix(z, z), np.float64)
    gram = gram + jitter * np.mean(np.diag(gram)) * np.eye(len(z))
    cross = np.kron(np.asarray(kernel.matrix(z, x)), eye)
    new = np.kron(np.asarray(kernel.matrix(x_new, z)), eye)
    precision = np.asarray(nz.dense_matrix(n, dim), np.float64)
    precision = precision.T @ precision
    sigma = np.linalg.inv(np.kron(gram, eye) + cross @ precision @ cross.T)
    mean_out = new @ sigma @ cross @ precision @ y.reshape(-1)
    prior = np.kron(np.asarray(kernel.matrix(x_new, x_new)), eye) - new @ np.linalg.solve(np.kron(gram, eye), new.T)
    variance = np.diag(prior + new @ sigma @ new.T)
    return mean_out.reshape(len(x_new), dim) + mean_new, variance.reshape(len(x_new), dim)


@pytest.mark.parametrize("noise_kind", BOUND_NOISES if FULL else ["isotropic", "per_point_rank_deficient"])
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_predict_is_the_variational_posterior(noise_kind, seed, dim, index_dim, x64):
    """Mean and variance against the covariance-form predictive in NumPy; with Z = x, the exact
    posterior of gg.predict."""
    problem, z = make_bound_problem("matern32", noise_kind, seed, dim, index_dim)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.concatenate([x[:3] + 0.05, z[:1]])
    jitter = 1e-6 if x64 else 1e-4
    mu, var = gg.predict(kernel, x, y, nz, x_new, mean, 0.5, inducing=z, jitter=jitter)
    expected_mu, expected_var = _predict_numpy(kernel, x, y, nz, z, x_new, mean, 0.5, jitter)
    tolerance = 1e-8 if x64 else 2e-3
    np.testing.assert_allclose(np.asarray(mu).reshape(expected_mu.shape), expected_mu, atol=tolerance)
    np.testing.assert_allclose(np.asarray(var).reshape(expected_var.shape), expected_var, atol=tolerance)
    if x64:
        x_free = x.at[1].add(0.1)
        exact = gg.predict(kernel, x_free, y, nz, x_new, mean, solver="dense")
        at_data = gg.predict(kernel, x_free, y, nz, x_new, mean, inducing=x_free, jitter=0.0)
        assert_trees_close(at_data, exact, 1e-7, "Z = x")


def test_draws_have_the_posterior_moments():
    """20 000 draws: mean and variance within Monte Carlo error of predict's, latent and with
    noise_new; shape and mean_new as for the exact posterior."""
    problem, z = make_bound_problem("exp_squared", "per_point", 5, 3, None)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.linspace(-0.5, 3.5, 6).astype(x.dtype)
    for noise_new in (None, noise.Isotropic(jnp.asarray(0.3, x.dtype))):
        mu, var = gg.predict(kernel, x, y, nz, x_new, mean, 1.0, inducing=z, noise_new=noise_new)
        draws = gg.sample_posterior(
            jax.random.key(0), kernel, x, y, nz, x_new, 20_000, mean, 1.0, inducing=z, noise_new=noise_new
        )
        assert draws.shape == (20_000, 6, 3)
        sd = np.sqrt(np.asarray(var))
        assert np.all(np.abs(np.mean(draws, 0) - mu) <= 5 * sd / np.sqrt(20_000) + 1e-6)
        assert np.all(np.abs(np.var(draws, 0) - var) <= 5 * np.asarray(var) * np.sqrt(2 / 20_000) + 1e-6)


def test_bad_input_gets_named_errors():
    x = jnp.linspace(0.0, 1.0, 5)
    y = jnp.sin(x)
    k, nz = kernels.Matern32(1.0, 0.5), noise.Isotropic(0.1)
    with pytest.raises(ValueError, match=r"`inducing` must have shape \(m,\)"):
        gg.inducing_bound(k, x, y, nz, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"`inducing` must have shape \(m, 2\)"):
        gg.inducing_bound(k, jnp.stack([x, x], 1), y, nz, jnp.zeros(3))
    with pytest.raises(ValueError, match="`inducing` must be finite"):
        gg.inducing_bound(k, x, y, nz, jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match="`noise`: the inducing-point bound needs noise that is block diagonal"):
        gg.inducing_bound(k, x, y, noise.Dense(jnp.eye(5)), x[:2])
    with pytest.raises(ValueError, match="`jitter` must be a Python number >= 0"):
        gg.inducing_bound(k, x, y, nz, x[:2], jitter=-1.0)
    with pytest.raises(ValueError, match=r"`inducing` must be >= 0 for the CubicSpline kernel"):
        gg.inducing_bound(kernels.CubicSpline(1.0), x, y, nz, jnp.array([-0.5, 0.5]))
    with pytest.raises(ValueError, match="`solver`: with `inducing`"):
        gg.predict(k, x, y, nz, x, inducing=x[:2], solver="dense")
    with pytest.raises(ValueError, match="`full_covariance=True` is not available with `inducing`"):
        gg.predict(k, x, y, nz, x, inducing=x[:2], full_covariance=True)
    with pytest.warns(UserWarning, match=r"m = 8 points for n = 5 data points: the bound costs O\(n m² \+ m³\)"):
        gg.inducing_bound(k, x, y, nz, jnp.linspace(0.0, 1.0, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gg.inducing_bound(k, [0, 1, 2, 3, 4], [0.1, 0.2, 0.0, 0.3, 0.1], nz, [1, 3])  # lists and integers


@pytest.mark.float32
def test_float32_bound_follows_float64(x64):
    """A well-scaled GPLVM-shaped problem in float32: value and gradients within float32 rounding
    of the float64 result."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = np.sin(x @ rng.normal(size=(2, 4)))
    z = rng.normal(size=(8, 2))

    def run(dtype):
        cast = functools.partial(jnp.asarray, dtype=dtype)
        k = kernels.ExpSquared(cast(1.0), cast([1.0, 0.8]))
        bound = functools.partial(gg.inducing_bound, jitter=1e-4)  # float32's default in both
        return jax.value_and_grad(bound, argnums=(0, 1, 3, 4))(k, cast(x), cast(y), noise.Isotropic(cast(0.2)), cast(z))

    value32, grads32 = run(jnp.float32)
    assert value32.dtype == jnp.float32
    if x64:
        value64, grads64 = run(jnp.float64)
        assert abs(float(value32) - float(value64)) <= 1e-4 * abs(float(value64))
        assert_trees_close(grads32, grads64, 2e-3, "float32 vs float64")
    else:
        assert np.isfinite(float(value32)) and all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads32))


@settings(max_examples=min(3, settings.default.max_examples))
@given(seed=seeds, scale=st.sampled_from([0.01, 100.0]))
def test_jitter_follows_the_kernel_scale(seed, scale, x64):
    """The jitter is relative to the prior variance at Z: rescaling the kernel and the data by the
    same factor shifts the bound by the noise-free change of units only."""
    problem, z = make_bound_problem("matern52", "isotropic", seed, 1, None)
    kernel, x, y, nz, mean = problem.args()
    base = gg.inducing_bound(kernel, x, y, nz, z, mean)
    root = math.sqrt(scale)
    scaled = gg.inducing_bound(
        kernels.Matern52(kernel.variance * scale, kernel.lengthscale), x, y * root, noise.Isotropic(nz.sigma * root), z, mean * root
    )
    assert abs(float(scaled) - (float(base) - 0.5 * N * math.log(scale))) <= (1e-9 if x64 else 1e-3) * abs(float(base))
