"""Posterior prediction against the dense textbook formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    NOISES,
    assert_trees_close,
    data_dims,
    index_dims,
    jaxpr_shapes,
    kernel_noise_pairs,
    make_markov_problem,
    make_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise


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
@pytest.mark.filterwarnings("ignore::gpgrad_jax.ConditioningWarning")  # a pinned Constant: cond(U) ≈ 1e5
def test_variance_clamp_only_hides_rounding(solver, x64):
    """Before ``predict``'s ``max(·, 0)``: negative variances are rounding, ≤ 10³·eps·k(x, x)."""
    problem = make_problem("curve", "per_point", 3, 3, None)
    kernel, x, y, nz, mean = problem.args()
    nz = noise.PerPoint(nz.blocks * 1e4)  # nearly noise-free: posterior variance ≈ 0 at the data
    chosen, prepared = gg.solvers.prepare(solver, kernel, x, y, nz, mean)
    _, raw = chosen.predict(prepared, prepared.x)
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
    np.testing.assert_allclose(
        jnp.diagonal(cov.reshape(n_new * dim, -1)).reshape(n_new, dim), var, rtol=100 * rtol, atol=100 * rtol
    )

    new_noise = noise.PerPoint.from_covariance(jnp.stack([jnp.diag(jnp.array([0.1, 0.2, 0.3], x.dtype))] * n_new))
    _, noisy_var = gg.predict(kernel, x, y, nz, x_new, mean=mean, solver=solver, noise_new=new_noise)
    np.testing.assert_allclose(
        noisy_var - var, jnp.broadcast_to(jnp.array([0.1, 0.2, 0.3]), (n_new, dim)), rtol=100 * rtol, atol=100 * rtol
    )
    _, noisy_cov = gg.predict(
        kernel, x, y, nz, x_new, mean=mean, solver=solver, full_covariance=True, noise_new=noise.Isotropic(0.5)
    )
    np.testing.assert_allclose(
        (noisy_cov - cov).reshape(n_new * dim, -1), 0.25 * np.eye(n_new * dim), rtol=100 * rtol, atol=100 * rtol
    )


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


@pytest.mark.parametrize("solver", ["dense", "markov", pytest.param("markov-parallel", marks=pytest.mark.slow)])
@pytest.mark.parametrize("noise_new_kind", ["isotropic", "per_point"])
def test_posterior_samples_have_the_predicted_moments(solver, noise_new_kind, x64):
    """4000 draws: sample mean and covariance within Monte Carlo error of ``predict``'s — of the
    latent function and of new observations, with unsorted indices, a tie, rank-2 blocks and a
    new index on a data point."""
    problem = make_markov_problem("curve", "per_point_rank_deficient", 6, 3)
    kernel, x, y, nz, mean = problem.args()
    x_new = jnp.concatenate([x[:2], x[:2] + 0.5])
    blocks = jnp.asarray(np.linalg.cholesky(np.linalg.inv(np.eye(3) + 0.5 * np.ones((3, 3)))).T / 0.4, x.dtype)
    noise_new = (
        noise.Isotropic(0.3) if noise_new_kind == "isotropic" else noise.PerPoint(jnp.broadcast_to(blocks, (4, 3, 3)))
    )
    for new in (None, noise_new):
        draws = gg.sample_posterior(
            jax.random.key(1), kernel, x, y, nz, x_new, 4000, mean=mean, mean_new=0.2, solver=solver, noise_new=new
        )
        assert draws.shape == (4000, 4, 3)
        mu, cov = gg.predict(kernel, x, y, nz, x_new, mean=mean, mean_new=0.2, full_covariance=True, noise_new=new)
        flat = np.asarray(draws, np.float64).reshape(4000, -1)
        cov = np.asarray(cov, np.float64).reshape(12, 12)
        scale = np.sqrt(np.diagonal(cov))
        np.testing.assert_allclose(flat.mean(0), np.asarray(mu).reshape(-1), atol=5 * scale.max() / np.sqrt(4000))
        # Entrywise standard error of a sample covariance: sqrt((C_ij² + C_ii C_jj) / S).
        error = np.sqrt((cov**2 + np.outer(scale**2, scale**2)) / 4000)
        assert np.all(np.abs(np.cov(flat.T) - cov) <= 5 * error + 1e-6 * scale.max() ** 2), (
            np.abs(np.cov(flat.T) - cov) / error
        )
    again = gg.sample_posterior(
        jax.random.key(1), kernel, x, y, nz, x_new, 4000, mean=mean, mean_new=0.2, solver=solver, noise_new=new
    )
    np.testing.assert_array_equal(draws, again)
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer, got 0"):
        gg.sample_posterior(jax.random.key(1), kernel, x, y, nz, x_new, 0)


@pytest.mark.slow  # the associative scans compile slowly on CPU
def test_parallel_draws_equal_sequential_draws(rtol):
    """The same key gives the same prior draw by an associative scan as by a sequential one."""
    kernel, x, y, nz, mean = make_markov_problem("scaled_sum", "isotropic", 3, 3).args()
    x_new = jnp.linspace(0.0, 3.0, 9, dtype=x.dtype)
    draws = [
        gg.sample_posterior(jax.random.key(7), kernel, x, y, nz, x_new, 5, mean=mean, solver=s)
        for s in ("markov", "markov-parallel")
    ]
    assert_trees_close(draws[1], draws[0], 10 * rtol, "parallel draws")


def test_markov_draws_never_build_a_dense_covariance():
    """O(n + n_new) memory: no array of the sampling program has two axes of n_new (or n) points."""
    n, n_new = 37, 41
    kernel, x, y, nz, mean = make_markov_problem("curve", "per_point_rank_deficient", 1, 3, n=n).args()
    x_new = jnp.linspace(0.0, 3.0, n_new, dtype=x.dtype)
    shapes = jaxpr_shapes(
        lambda k, x_new: gg.sample_posterior(k, kernel, x, y, nz, x_new, 3, mean=mean, solver="markov"),
        jax.random.key(0),
        x_new,
    )
    points = {n, n_new, 64, n + 64}  # x_new is padded to 64 points; the filter runs over all n + 64
    assert any(len(points.intersection(s)) for s in shapes)
    dense = [s for s in shapes if sum(d in points for d in s) >= 2]
    assert not dense, dense


def test_predict_and_samples_under_jit(rtol):
    problem = make_problem("matern52", "isotropic", 2, 3, 2)
    kernel, x, y, nz, mean = problem.args()
    x_new = x[:3] + 0.1
    jitted = jax.jit(gg.predict, static_argnames=("solver", "full_covariance"))
    assert_trees_close(
        jitted(kernel, x, y, nz, x_new, mean, full_covariance=True),
        gg.predict(kernel, x, y, nz, x_new, mean, full_covariance=True),
        rtol,
        "jit",
    )
    sample = jax.jit(gg.sample_posterior, static_argnums=6)
    assert sample(jax.random.key(0), kernel, x, y, nz, x_new, 2, mean).shape == (2, 3, 3)
