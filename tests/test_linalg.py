"""The blocked inverse against a dense inverse, at sizes that exercise the recursion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpgrad_jax._linalg import cho_inverse, cho_inverse_lower, symmetrize_lower


@pytest.mark.float32
@pytest.mark.parametrize("m", [1, 7, 256, 300, 777])
def test_inverse_from_factor_matches_dense_inverse(m, x64):
    rng = np.random.default_rng(m)
    a = rng.normal(size=(m, m))
    u = np.eye(m) + a @ a.T / m
    chol = jnp.linalg.cholesky(jnp.asarray(u))
    lower = cho_inverse_lower(chol)
    expected = np.linalg.inv(u)
    tol = 1e-11 if x64 else 1e-4
    np.testing.assert_allclose(lower, np.tril(expected), atol=tol * np.abs(expected).max())
    np.testing.assert_allclose(symmetrize_lower(lower), expected, atol=tol * np.abs(expected).max())
    full = cho_inverse(chol)
    np.testing.assert_allclose(full, expected, atol=tol * np.abs(expected).max())
    np.testing.assert_array_equal(full, full.T)


def test_inverse_is_differentiable_and_batches(x64):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 300, 300))
    u = jnp.asarray(np.eye(300) + a @ np.swapaxes(a, 1, 2) / 300)
    chol = jnp.linalg.cholesky(u)
    batched = jax.vmap(cho_inverse_lower)(chol)
    for i in range(3):
        np.testing.assert_allclose(batched[i], cho_inverse_lower(chol[i]), rtol=1e-12 if x64 else 1e-5)
    direction = jnp.asarray(np.tril(rng.normal(size=(300, 300))))
    f = lambda c: jnp.sum(symmetrize_lower(cho_inverse_lower(c)) * direction)  # noqa: E731
    g = lambda c: jnp.sum(jnp.linalg.inv(c @ c.T) * direction)  # noqa: E731
    # The factor is lower triangular: only its lower triangle is an input of the algorithm.
    np.testing.assert_allclose(jnp.tril(jax.grad(f)(chol[0])), jnp.tril(jax.grad(g)(chol[0])), rtol=1e-8 if x64 else 1e-2, atol=1e-10 if x64 else 1e-3)
