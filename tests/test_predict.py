"""Posterior prediction against the dense textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import NOISES, assert_trees_close, data_dims, index_dims, kernel_noise_pairs, make_problem, seeds

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise
from gpgrad_jax._likelihood import prepare
from gpgrad_jax._solvers import resolve


def _dense_posterior(kernel, x, y, nz, mean, x_new):
    n = x.shape[0]
    y2 = y.reshape(n, -1)
    dim = y2.shape[1]
    eye = jnp.eye(dim)
    s = nz.dense_matrix(n, dim)
    u = jnp.eye(s.shape[0]) + s @ jnp.kron(kernel.matrix(x, x), eye) @ s.T
    m = s.T @ jnp.linalg.solve(u, s)
    cross = jnp.kron(kernel.matrix(x_new, x), eye)
    mu = cross @ m @ (y2 - mean.reshape(n, dim)).reshape(-1)
    cov = jnp.kron(kernel.matrix(x_new, x_new), eye) - cross @ m @ cross.T
    return mu.reshape(-1, dim), jnp.diagonal(cov).reshape(-1, dim), cov


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name, noise_kind", kernel_noise_pairs(["curve", "matern52"], NOISES))
@settings(max_examples=min(6, settings.default.max_examples))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_predict_matches_dense_formula(kernel_name, noise_kind, seed, dim, index_dim, rtol):
    problem = make_problem(kernel_name, noise_kind, seed, dim, index_dim)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.concatenate([x[:2], x[:3] + 0.37])  # at data points and between them
    mu, var = gg.predict(kernel, x, y, nz, x_new, mean=mean)
    want_mu, want_var, _ = _dense_posterior(kernel, x, y, nz, mean, x_new)
    assert mu.shape == var.shape == (5, *y.shape[1:])
    np.testing.assert_allclose(mu.reshape(5, -1), want_mu, rtol=100 * rtol, atol=100 * rtol)
    np.testing.assert_allclose(var.reshape(5, -1), want_var, rtol=100 * rtol, atol=100 * rtol)


@pytest.mark.float32
@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_variance_clamp_only_hides_rounding(solver, x64):
    """Before ``predict``'s ``max(·, 0)``: negative variances are rounding, ≤ 10³·eps·k(x, x)."""
    problem = make_problem("curve", "per_point", 3, 3, None)
    kernel, x, y, nz, mean = problem.args()
    nz = noise.PerPoint(nz.blocks * 1e4)  # nearly noise-free: posterior variance ≈ 0 at the data
    args = prepare(kernel, x, y, nz, mean)
    _, raw = resolve(solver, *args[:2], args[2]).predict(*args, args[2])
    prior = jax.vmap(kernel.evaluate)(x, x)[:, None]
    eps = float(jnp.finfo(raw.dtype).eps)
    assert np.all(np.asarray(raw) >= -1e3 * eps * np.asarray(prior)), raw
    _, var = gg.predict(kernel, x, y, nz, x, mean=mean, solver=solver)
    np.testing.assert_array_equal(var, np.maximum(np.asarray(raw), 0.0))


def test_predict_validates_new_indices():
    problem = make_problem("curve", "isotropic", 0, 3, None)
    kernel, x, y, nz, _mean = problem.args()
    with pytest.raises(ValueError, match="x_new"):
        gg.predict(kernel, x, y, nz, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="mean_new"):
        gg.predict(kernel, x, y, nz, jnp.ones(3), mean_new=jnp.ones(3))


@pytest.mark.float32
@pytest.mark.parametrize("solver", ["dense", "markov"])
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rank_deficient"])
def test_full_covariance_and_noise_inclusive_variance(solver, noise_kind, rtol):
    problem = make_problem("curve", noise_kind, 4, 3, None)
    kernel, x, y, nz, mean = problem.args()
    n_new, dim = 5, 3
    x_new = jnp.concatenate([x[:2], x[:3] + 0.37])
    _, _, want_cov = _dense_posterior(kernel, x, y, nz, mean, x_new)
    mu, cov = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=solver, full_covariance=True)
    assert cov.shape == (n_new, dim, n_new, dim)
    np.testing.assert_allclose(cov.reshape(n_new * dim, -1), want_cov, rtol=100 * rtol, atol=100 * rtol)
    mu_marginal, var = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=solver)
    np.testing.assert_allclose(mu, mu_marginal, rtol=100 * rtol, atol=100 * rtol)
    np.testing.assert_allclose(jnp.diagonal(cov.reshape(n_new * dim, -1)).reshape(n_new, dim), var, rtol=100 * rtol, atol=100 * rtol)

    new_noise = noise.PerPoint.from_covariance(jnp.stack([jnp.diag(jnp.array([0.1, 0.2, 0.3], x.dtype))] * n_new))
    _, noisy_var = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=solver, noise_new=new_noise)
    np.testing.assert_allclose(noisy_var - var, jnp.broadcast_to(jnp.array([0.1, 0.2, 0.3]), (n_new, dim)), rtol=100 * rtol, atol=100 * rtol)
    _, noisy_cov = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=solver, full_covariance=True, noise_new=noise.Isotropic(0.5))
    np.testing.assert_allclose((noisy_cov - cov).reshape(n_new * dim, -1), 0.25 * np.eye(n_new * dim), rtol=100 * rtol, atol=100 * rtol)


def test_one_dimensional_full_covariance_is_square_and_noise_new_must_be_invertible():
    x = jnp.linspace(0.0, 2.0, 6)
    kernel, nz = kernels.Matern52(1.0, 0.7), noise.Isotropic(0.2)
    _, cov = gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5, 1.5, 2.5]), full_covariance=True)
    assert cov.shape == (3, 3)
    np.testing.assert_allclose(cov, cov.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`noise_new` must have an invertible precision"):
        gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5, 1.5]), noise_new=noise.PerPoint(jnp.array([1.0, 0.0])))
    with pytest.raises(ValueError, match=r"noise.PerPoint: `blocks` must have shape \(2, 1, 1\) or \(2,\)"):
        gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5, 1.5]), noise_new=noise.PerPoint(jnp.ones(3)))
    with pytest.raises(ValueError, match=r"`noise_new\.sigma` must be > 0"):
        gg.predict(kernel, x, jnp.sin(x), nz, jnp.array([0.5, 1.5]), noise_new=noise.Isotropic(-1.0))


@pytest.mark.parametrize("solver", ["dense", "markov"])
def test_posterior_samples_have_the_predicted_moments(solver, x64):
    """4000 draws: sample mean and covariance within Monte Carlo error of ``predict``'s."""
    problem = make_problem("curve", "per_point_rank_deficient", 6, 3, None)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.concatenate([x[:2], x[:2] + 0.5])
    draws = gg.sample_posterior(jax.random.key(1), kernel, x, y, nz, x_new, 4000, mean=mean, solver=solver, noise_new=noise.Isotropic(0.3))
    assert draws.shape == (4000, 4, 3)
    mu, cov = gg.predict(kernel, x, y, nz, x_new, mean=mean, full_covariance=True, noise_new=noise.Isotropic(0.3))
    flat = np.asarray(draws, np.float64).reshape(4000, -1)
    scale = np.sqrt(np.diagonal(np.asarray(cov).reshape(12, 12)))
    np.testing.assert_allclose(flat.mean(0), np.asarray(mu).reshape(-1), atol=5 * scale.max() / np.sqrt(4000))
    np.testing.assert_allclose(np.cov(flat.T), np.asarray(cov).reshape(12, 12), atol=0.1 * scale.max() ** 2)
    again = gg.sample_posterior(jax.random.key(1), kernel, x, y, nz, x_new, 4000, mean=mean, solver=solver, noise_new=noise.Isotropic(0.3))
    np.testing.assert_array_equal(draws, again)
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer, got 0"):
        gg.sample_posterior(jax.random.key(1), kernel, x, y, nz, x_new, 0)


def test_predict_and_samples_under_jit(rtol):
    problem = make_problem("matern52", "isotropic", 2, 3, 2)
    kernel, x, y, nz, mean = problem.args()
    x_new = x[:3] + 0.1
    jitted = jax.jit(gg.predict, static_argnames=("solver", "full_covariance"))
    assert_trees_close(jitted(kernel, x, y, nz, x_new, mean, full_covariance=True), gg.predict(kernel, x, y, nz, x_new, mean, full_covariance=True), rtol, "jit")
    sample = jax.jit(gg.sample_posterior, static_argnums=6)
    assert sample(jax.random.key(0), kernel, x, y, nz, x_new, 2, mean).shape == (2, 3, 3)
