"""Noise constructors: from a covariance, a precision, or camera projections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise
from gpgrad_jax._noise import log_pseudo_determinants

N, D = 4, 3


def _spd(rng, n, d):
    a = rng.normal(size=(n, d, d))
    return a @ np.swapaxes(a, 1, 2) + 0.5 * np.eye(d)


def _precision(nz, dim):
    s = np.asarray(nz.dense_matrix(N, dim), np.float64)
    return s.T @ s


def test_per_point_from_covariance_is_the_gaussian_with_that_covariance(x64):
    rng = np.random.default_rng(0)
    covariance = _spd(rng, N, D)
    nz = noise.PerPoint.from_covariance(covariance)
    np.testing.assert_allclose(_precision(nz, D), np.linalg.inv(jax.scipy.linalg.block_diag(*covariance)), rtol=1e-6 if x64 else 1e-3, atol=1e-6 if x64 else 1e-3)
    x, y = jnp.linspace(0.1, 2.0, N), jnp.asarray(rng.normal(size=(N, D)))
    kernel = kernels.Matern32(1.0, 1.0)
    cov = jnp.kron(kernel.matrix(x, x), jnp.eye(D)) + jax.scipy.linalg.block_diag(*covariance)
    want = jax.scipy.stats.multivariate_normal.logpdf(y.reshape(-1), jnp.zeros(N * D), cov)
    np.testing.assert_allclose(gg.log_marginal_likelihood(kernel, x, y, nz), want, rtol=1e-9 if x64 else 1e-4)
    variances = noise.PerPoint.from_covariance(jnp.array([0.25, 1.0, 4.0]))
    np.testing.assert_allclose(variances.blocks.reshape(-1), [2.0, 1.0, 0.5], rtol=1e-6)


def test_dense_from_covariance_and_from_precision(x64):
    rng = np.random.default_rng(1)
    covariance = _spd(rng, 1, N * D)[0]
    tol = dict(rtol=1e-6 if x64 else 1e-2, atol=1e-6 if x64 else 1e-2)
    np.testing.assert_allclose(_precision(noise.Dense.from_covariance(covariance), D), np.linalg.inv(covariance), **tol)
    precision = np.linalg.inv(covariance)
    np.testing.assert_allclose(_precision(noise.Dense.from_precision(precision), D), precision, **tol)


def test_from_precision_allows_rank_deficiency():
    rng = np.random.default_rng(2)
    rays = rng.normal(size=(N, D))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    precision = (np.eye(D) - rays[:, :, None] * rays[:, None, :]) * 25.0
    precision[1] = 0.0  # an unseen point
    nz = noise.PerPoint.from_precision(precision)
    np.testing.assert_allclose(_precision(nz, D), jax.scipy.linalg.block_diag(*precision), atol=1e-5)
    np.testing.assert_array_equal(log_pseudo_determinants(nz.blocks)[1], [2, 0, 2, 2])  # rounding is not information


def _pinhole(focal, center):
    camera = np.array([[focal, 0.0, 320.0, 0.0], [0.0, focal, 240.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    extrinsic = np.concatenate([rotation, -rotation @ np.asarray(center)[:, None]], axis=1)
    matrix = jnp.asarray(camera @ np.concatenate([extrinsic, [[0, 0, 0, 1.0]]]))
    return lambda point: (matrix @ jnp.append(point, 1.0))[:2] / (matrix @ jnp.append(point, 1.0))[2]


def test_from_projection_is_pixel_noise_seen_through_the_cameras():
    """One camera: rank 2, blind along the ray to the camera centre; two cameras: full rank;
    ``BᵀB = JᵀJ/σ²`` either way."""
    center_a, center_b = np.array([0.0, 0.0, -5.0]), np.array([4.0, 0.0, -4.0])
    project_a, project_b = _pinhole(500.0, center_a), _pinhole(400.0, center_b)
    points = jnp.asarray(np.random.default_rng(4).uniform(-0.5, 0.5, (N, D)))
    one = jax.vmap(jax.jacfwd(project_a))(points)  # (n, 2, 3)
    two = jnp.concatenate([one, jax.vmap(jax.jacfwd(project_b))(points)], axis=1)  # (n, 4, 3)
    sigma = 1.5
    for jacobians, rank in ((one, 2), (two, 3)):
        nz = noise.PerPoint.from_projection(jacobians, sigma)
        blocks = np.asarray(nz.blocks, np.float64)
        j = np.asarray(jacobians, np.float64)
        np.testing.assert_allclose(
            np.swapaxes(blocks, 1, 2) @ blocks, np.swapaxes(j, 1, 2) @ j / sigma**2, rtol=1e-4, atol=1e-6 * np.abs(j).max() ** 2
        )
        _, ranks = log_pseudo_determinants(nz.blocks)  # the rank log_marginal_likelihood counts
        np.testing.assert_array_equal(ranks, rank)
    ray = np.asarray(points[0]) - center_a
    np.testing.assert_allclose(np.asarray(noise.PerPoint.from_projection(one, sigma).blocks[0]) @ ray, 0.0, atol=1e-4 * np.linalg.norm(ray) * np.abs(blocks).max())
    per_row = noise.PerPoint.from_projection(two, jnp.full((N, 4), sigma))
    np.testing.assert_allclose(np.abs(per_row.blocks), np.abs(noise.PerPoint.from_projection(two, sigma).blocks), rtol=1e-5)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: noise.PerPoint.from_covariance(np.zeros((N, D, D))), "`covariance` must be positive definite"),
        (lambda: noise.PerPoint.from_covariance(np.ones((N, 2, 3))), "`covariance` must have shape (n, D, D) or (n,)"),
        (lambda: noise.PerPoint.from_precision(np.triu(np.ones((N, D, D)))), "`precision` must be symmetric"),
        (lambda: noise.Dense.from_precision(-np.eye(6)), "`precision` must be positive semi-definite"),
        (lambda: noise.PerPoint.from_projection(np.ones((N, 2)), 1.0), "`jacobians` must have shape (n, k, D)"),
        (lambda: noise.PerPoint.from_projection(np.ones((N, 2, 3)), np.ones(3)), "`pixel_sigma` must be a scalar or have shape (4, 2)"),
    ],
)
def test_constructors_name_what_is_wrong(call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)
