"""Posterior prediction against the dense textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import NOISES, data_dims, index_dims, make_problem, seeds

import gpgrad_jax as gg
from gpgrad_jax import noise
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
    return mu.reshape(-1, dim), jnp.diagonal(cov).reshape(-1, dim)


@pytest.mark.float32
@pytest.mark.parametrize("noise_kind", NOISES)
@pytest.mark.parametrize("kernel_name", ["curve", "matern52"])
@settings(max_examples=min(6, settings.default.max_examples))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_predict_matches_dense_formula(kernel_name, noise_kind, seed, dim, index_dim, rtol):
    problem = make_problem(kernel_name, noise_kind, seed, dim, index_dim)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.concatenate([x[:2], x[:3] + 0.37])  # at data points and between them
    mu, var = gg.predict(kernel, x, y, nz, x_new, mean=mean)
    want_mu, want_var = _dense_posterior(kernel, x, y, nz, mean, x_new)
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
