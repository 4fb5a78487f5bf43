"""``log_marginal_likelihood``: the Gaussian density of what is observed (every solver, against
``multivariate_normal.logpdf`` and an independent dense route), and safe noise learning; the
precision form ``L`` differs by a noise-only term."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    MARKOV_NOISES,
    NOISES,
    assert_trees_close,
    data_dims,
    index_dims,
    make_markov_problem,
    make_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise
from gpgrad_jax._noise import log_pseudo_determinants

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean


@functools.partial(jax.jit, static_argnums=0)
def closed_form_and_reference(solver, *args):
    return (
        jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver=solver), argnums=ALL_ARGS)(*args),
        jax.value_and_grad(gg.reference.log_marginal_likelihood, argnums=ALL_ARGS)(*args),
    )


def _check(solver, problem, rtol):
    (value, grads), (ref_value, ref_grads) = closed_form_and_reference(solver, *problem.args())
    assert_trees_close(value, ref_value, rtol, f"{solver} value")
    for name, grad, ref in zip(("kernel", "x", "y", "noise", "mean"), grads, ref_grads):
        assert_trees_close(grad, ref, rtol, f"{solver} d/d{name}")


@pytest.mark.parametrize("noise_kind", NOISES)
@settings(max_examples=min(2, settings.default.max_examples))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_dense_solver_matches_plain_autodiff(noise_kind, seed, dim, index_dim, rtol):
    """Value and every cotangent against the reference, whose pseudo-determinant takes another
    route (``½ log det(SᵀS + P₀)`` through ``slogdet``)."""
    _check("dense", make_problem("matern52", noise_kind, seed, dim, index_dim), rtol)


@pytest.mark.float32
@pytest.mark.parametrize("noise_kind", MARKOV_NOISES)
@settings(max_examples=min(2, settings.default.max_examples))
@given(seed=seeds, dim=data_dims)
def test_markov_solver_matches_plain_autodiff(noise_kind, seed, dim, rtol):
    _check("markov", make_markov_problem("curve", noise_kind, seed, dim), rtol)


def _gaussian(residual, cov):
    return jax.scipy.stats.multivariate_normal.logpdf(residual, jnp.zeros(residual.shape[0]), cov)


@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point", "dense_square", "dense_tall"])
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=seeds)
def test_invertible_precision_gives_the_gaussian_log_likelihood(noise_kind, seed, x64):
    """``log N(y | μ, K ⊗ I_D + Λ⁻¹)``, by another formula, and ``L`` differs from it."""
    rng = np.random.default_rng(seed)
    problem = make_problem("curve", "per_point", seed, 3, None)
    kernel, x, y, nz, mean = problem.args()
    n, dim = y.shape
    if noise_kind == "isotropic":
        nz = noise.Isotropic(jnp.asarray(rng.uniform(0.3, 1.0), x.dtype))
    elif noise_kind.startswith("dense"):
        rows = n * dim + (0 if noise_kind == "dense_square" else 4)
        nz = noise.Dense(jnp.asarray(rng.normal(size=(rows, n * dim)) + 3 * np.eye(rows, n * dim), x.dtype))
    s = nz.dense_matrix(n, dim)
    cov = jnp.kron(kernel.matrix(x, x), jnp.eye(dim)) + jnp.linalg.inv(s.T @ s)
    expected = _gaussian((y - mean).reshape(-1), cov)
    rtol = 1e-9 if x64 else 1e-3
    solvers = ["dense"] if noise_kind.startswith("dense") else ["dense", "markov"]
    for solver in solvers:
        got = gg.log_marginal_likelihood(kernel, x, y, nz, mean, solver=solver)
        np.testing.assert_allclose(got, expected, rtol=rtol, err_msg=solver)
    assert abs(gg.precision_form_log_likelihood(kernel, x, y, nz, mean) - expected) > 1e-3 * abs(expected)


@pytest.mark.slow  # the associative scans compile slowly on CPU
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point"])
def test_the_parallel_solver_gives_the_gaussian_log_likelihood(noise_kind, x64):
    problem = make_markov_problem("scaled_sum", noise_kind, 2, 3)
    kernel, x, y, nz, mean = problem.args()
    n, dim = y.shape
    s = nz.dense_matrix(n, dim)
    cov = jnp.kron(kernel.matrix(x, x), jnp.eye(dim)) + jnp.linalg.inv(s.T @ s)
    expected = _gaussian((y - mean).reshape(-1), cov)
    got = gg.log_marginal_likelihood(kernel, x, y, nz, mean, solver="markov-parallel")
    np.testing.assert_allclose(got, expected, rtol=1e-9 if x64 else 1e-3)


@pytest.mark.parametrize("solver", ["dense", "markov"])
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rank_deficient"])
def test_the_precision_form_has_the_same_index_and_kernel_gradient(solver, noise_kind, rtol):
    """``L`` and the density differ by a noise-only term: the same gradient in ``x``, the kernel,
    ``y`` and the mean, a different one in the noise; ``index_gradient`` returns the density's
    value."""
    kernel, x, y, nz, mean = make_markov_problem("curve", noise_kind, 3, 3).args()
    grad = functools.partial(jax.grad, argnums=(0, 1, 2, 3, 4))
    density = grad(functools.partial(gg.log_marginal_likelihood, solver=solver))(kernel, x, y, nz, mean)
    precision = grad(functools.partial(gg.precision_form_log_likelihood, solver=solver))(kernel, x, y, nz, mean)
    for name, a, b in zip(("kernel", "x", "y", "mean"), density[:3] + density[4:], precision[:3] + precision[4:]):
        assert_trees_close(a, b, rtol, f"d/d{name}")
    noise_leaves = zip(jax.tree_util.tree_leaves(density[3]), jax.tree_util.tree_leaves(precision[3]))
    assert not all(np.allclose(a, b) for a, b in noise_leaves), "the noise gradients must differ"
    value, grad_x = gg.index_gradient(kernel, x, y, nz, mean, solver=solver)
    assert_trees_close(value, gg.log_marginal_likelihood(kernel, x, y, nz, mean, solver=solver), rtol, "value")
    assert_trees_close(grad_x, density[1], rtol, "index_gradient")


@pytest.mark.float32
@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_rank_deficient_blocks_give_the_density_of_the_observed_coordinates(solver, x64):
    """Per block ``B_i = U Σ Vᵀ`` (rank ``r_i``, zero blocks included): the observed coordinates
    ``c_i = V_rᵀ r_i`` have covariance ``V_rᵀ (K ⊗ I) V_r + Σ_r⁻²``."""
    problem = make_problem("curve", "per_point_rank_deficient", 5, 3, None, n=8)
    kernel, x, y, nz, mean = problem.args()
    blocks = np.array(nz.blocks, np.float64)
    blocks[1] *= 1e-3  # a block on a much smaller scale than the others
    nz = noise.PerPoint(jnp.asarray(blocks, x.dtype))
    n, dim = y.shape
    rows, scales = [], []
    for i, block in enumerate(blocks):
        _, singular_values, vh = np.linalg.svd(block)
        for sv, v in zip(singular_values, vh):
            if sv > 1e-5 * max(singular_values.max(), 1e-300):  # rounding is not rank, in float32 too
                row = np.zeros(n * dim)
                row[i * dim : (i + 1) * dim] = v
                rows.append(row)
                scales.append(sv)
    basis = np.array(rows)
    prior = np.kron(np.asarray(kernel.matrix(x, x), np.float64), np.eye(dim))
    cov = basis @ prior @ basis.T + np.diag(np.array(scales) ** -2.0)
    residual = np.asarray(y - mean, np.float64).reshape(-1)
    expected = _gaussian(jnp.asarray(basis @ residual), jnp.asarray(cov))
    got = gg.log_marginal_likelihood(kernel, x, y, nz, mean, solver=solver)
    np.testing.assert_allclose(got, expected, rtol=1e-9 if x64 else 1e-4)
    assert len(scales) < n * dim  # the problem was rank deficient


@pytest.mark.float32
def test_pseudo_determinant_rule_is_finite_at_repeated_singular_values(rtol):
    """``(I − rrᵀ)/σ`` has a repeated singular value, where autodiff through the SVD divides by
    zero; the rule gives the transposed pseudo-inverse. A zero block gives zero."""
    ray = jnp.array([0.6, 0.0, 0.8])
    block = (jnp.eye(3) - jnp.outer(ray, ray)) / 0.3
    blocks = jnp.stack([block, jnp.zeros((3, 3)), jnp.diag(jnp.array([2.0, 0.5, 1.0]))])
    (log_pdet, rank), vjp = jax.vjp(log_pseudo_determinants, blocks)
    np.testing.assert_allclose(log_pdet, [2 * np.log(1 / 0.3), 0.0, 0.0], rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(rank, [2, 0, 3])
    (grad,) = vjp((jnp.ones(3), jnp.zeros(3)))
    pinv = np.linalg.pinv(np.asarray(blocks, np.float64), rcond=1e-5)  # rounding is not rank, in float32 too
    np.testing.assert_allclose(grad, np.transpose(pinv, (0, 2, 1)), rtol=rtol, atol=rtol)


def test_noise_scale_gradient_matches_finite_differences(x64):
    """Rank-deficient blocks scaled by ``1/σ``: ``d log p/dσ`` by central differences (the rank is
    constant along the path, so the derivative exists)."""
    if not x64:
        pytest.skip("finite differences need float64")
    problem = make_problem("curve", "per_point_rank_deficient", 9, 3, None)
    kernel, x, y, nz, mean = problem.args()

    def log_p(sigma):
        return gg.log_marginal_likelihood(kernel, x, y, noise.PerPoint(nz.blocks / sigma), mean)

    sigma, eps = 0.7, 1e-6
    numeric = (log_p(sigma + eps) - log_p(sigma - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(log_p)(sigma), numeric, rtol=1e-6)


def _simulate(key, kernel, x, sigma):
    n = x.shape[0]
    f = jnp.linalg.cholesky(kernel.matrix(x, x) + 1e-4 * jnp.eye(n)) @ jax.random.normal(key, (n, 3))  # jitter float32 holds
    return f + sigma * jax.random.normal(jax.random.fold_in(key, 1), (n, 3))


@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rays"])
def test_noise_scale_is_recovered_by_the_marginal_likelihood_not_by_L(noise_kind):
    """Data simulated with ``σ = 0.1``: maximising ``log_marginal_likelihood`` over ``log σ``
    recovers it; maximising the precision form ``L`` runs away (the reason it is not the
    public meaning of the name)."""
    true_sigma, n = 0.1, 120
    x = jnp.linspace(0.0, 6.0, n)
    kernel = kernels.Matern52(1.0, 1.0)
    y = _simulate(jax.random.key(0), kernel, x, true_sigma)
    rays = jax.random.normal(jax.random.key(2), (n, 3))
    rays = rays / jnp.linalg.norm(rays, axis=1, keepdims=True)
    projectors = jnp.eye(3) - rays[:, :, None] * rays[:, None, :]

    def noise_at(log_sigma):
        if noise_kind == "isotropic":
            return noise.Isotropic(jnp.exp(log_sigma))
        return noise.PerPoint(projectors / jnp.exp(log_sigma))  # no information along each ray

    def fit(objective):
        """The maximiser over σ ∈ [0.01, 10] by bisection on the sign of the derivative in log σ."""
        low, high = np.log(0.01), np.log(10.0)
        grad = jax.jit(jax.grad(lambda s: objective(kernel, x, y, noise_at(s), solver="markov")))
        for _ in range(30):
            middle = 0.5 * (low + high)
            low, high = (middle, high) if grad(middle) > 0 else (low, middle)
        return float(jnp.exp(0.5 * (low + high)))

    recovered = fit(gg.log_marginal_likelihood)
    assert abs(recovered / true_sigma - 1) < 0.15, recovered
    assert fit(gg.precision_form_log_likelihood) > 9.9  # L increases up to the end of the interval


@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_zero_blocks_mask_missing_data_like_dropping_the_points(solver, rtol):
    """The documented way to handle missing observations: zero ``PerPoint`` blocks give the value
    and the gradient of the problem without those points, and exactly zero gradient for them."""
    kernel, x, y, nz, mean = make_markov_problem("curve", "per_point", 4, 3).args()
    seen = np.ones(x.shape[0], bool)
    seen[[1, 4, 5]] = False
    masked = noise.PerPoint(jnp.where(jnp.asarray(seen)[:, None, None], nz.blocks, 0.0))
    value_and_grad = jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver=solver), argnums=1)
    value, grad = value_and_grad(kernel, x, y, masked, mean)
    kept = jnp.asarray(np.flatnonzero(seen))
    dropped_value, dropped_grad = value_and_grad(kernel, x[kept], y[kept], noise.PerPoint(nz.blocks[kept]), mean[kept])
    assert_trees_close(value, dropped_value, rtol, "value")
    assert_trees_close(grad[kept], dropped_grad, rtol, "gradient of the seen points")
    assert np.all(np.asarray(grad)[~seen] == 0.0)
