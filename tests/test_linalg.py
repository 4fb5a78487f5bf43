"""The dense linear algebra of ``gpgrad_jax._linalg`` against NumPy's LAPACK, at sizes that exercise
the recursions — on one matrix (LAPACK, inline) and on batches, under ``vmap`` or with leading axes
(written out) — and its derivative rules against JAX's own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from problems import FULL

from gpgrad_jax import _linalg as la


def _spd(rng, m, dtype=np.float64):
    a = rng.normal(size=(m, m))
    return (np.eye(m) + a @ a.T / m).astype(dtype)


def _on(path, fn, *args):
    """``fn(*args)`` on one matrix, or on a batch of one (by ``vmap`` or as a leading axis); jitted."""
    if path == "single":
        return jax.jit(fn)(*args)
    batch = [a[None] for a in args]
    out = jax.jit(jax.vmap(fn) if path == "vmap" else fn)(*batch)
    return jax.tree_util.tree_map(lambda leaf: leaf[0], out)


PATHS = ["single", "vmap", "leading"]


# The fast profile: a leaf and one recursion (300 = two leaves of 148 and 152).
SIZES = [1, 7, la.LEAF, la.LEAF + 1, 300, 777] if FULL else [7, 300]


@pytest.mark.float32
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m", SIZES)
def test_factor_solve_and_inverse_match_lapack(m, path, x64):
    rng = np.random.default_rng(m)
    u = _spd(rng, m)
    factor = _on(path, la.cholesky, jnp.asarray(u))
    tol = 1e-11 if x64 else 2e-4
    expected_low = np.linalg.cholesky(u)
    np.testing.assert_allclose(factor.low, expected_low, atol=tol * np.abs(expected_low).max())
    np.testing.assert_array_equal(np.triu(factor.low, 1), 0.0)
    np.testing.assert_array_equal(np.triu(factor.inverse, 1), 0.0)
    expected_inverse = np.linalg.inv(expected_low)
    np.testing.assert_allclose(factor.inverse, expected_inverse, atol=tol * np.abs(expected_inverse).max())
    b = rng.normal(size=(m, 3))
    expected_solution = np.linalg.solve(u, b)
    solution = _on(path, lambda low, inverse, b: la.Cholesky(low, inverse).solve(b), *factor, jnp.asarray(b))
    np.testing.assert_allclose(solution, expected_solution, atol=tol * np.abs(expected_solution).max())
    np.testing.assert_allclose(factor.log_det(), np.linalg.slogdet(u)[1], rtol=tol)
    expected = np.linalg.inv(u)
    lower = la.cho_inverse_lower(factor.inverse)
    np.testing.assert_allclose(lower, np.tril(expected), atol=tol * np.abs(expected).max())
    np.testing.assert_allclose(la.symmetrize_lower(lower), expected, atol=tol * np.abs(expected).max())
    full = la.cho_inverse(factor.inverse)
    np.testing.assert_allclose(full, expected, atol=tol * np.abs(expected).max())
    np.testing.assert_array_equal(full, full.T)


def test_not_positive_definite_gives_nan():
    u = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    factor = la.cholesky(u)
    assert np.isnan(factor.low[1, 1]) and np.isnan(factor.inverse[1, 1])


def test_factor_batches_and_differentiates_as_lapack(x64):
    rng = np.random.default_rng(0)
    size = 150 if FULL else 40  # a recursion, or a leaf
    u = jnp.asarray(np.stack([_spd(rng, size) for _ in range(3)]))
    batched = jax.vmap(la.cholesky)(u)
    direct = la.cholesky(u)  # leading batch dimensions work without vmap too
    tol = 1e-12 if x64 else 1e-5
    for i in range(3):
        single = la.cholesky(u[i]).low
        np.testing.assert_allclose(batched.low[i], single, atol=tol * np.abs(single).max())
        np.testing.assert_allclose(direct.low[i], single, atol=tol * np.abs(single).max())
    tangent = jnp.asarray(rng.normal(size=(size, size)))
    lapack = jax.jvp(jnp.linalg.cholesky, (u[0],), (tangent,))[1]
    for path in PATHS:
        mine = _on(path, lambda a, t: jax.jvp(lambda a: la.cholesky(a).low, (a,), (t,))[1], u[0], tangent)
        np.testing.assert_allclose(mine, lapack, atol=(1e-10 if x64 else 1e-3) * np.abs(lapack).max())
    b = jnp.asarray(rng.normal(size=size))

    def f(solve, a):
        return jnp.sum(jnp.sin(solve(a, b)))

    ours = functools.partial(f, lambda a, b: la.cholesky(a).solve(b))
    theirs = functools.partial(f, lambda a, b: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), b))
    for path in ("single", "vmap"):  # (the objective closes over an unbatched b)
        np.testing.assert_allclose(_on(path, jax.grad(ours), u[0]), jax.grad(theirs)(u[0]), atol=1e-10 if x64 else 1e-3)
    small = u[0][:6, :6]
    b = b[:6]
    for path in ("single", "vmap"):  # forward over reverse, and reverse over reverse
        expected = jax.hessian(theirs)(small)
        np.testing.assert_allclose(_on(path, jax.hessian(ours), small), expected, atol=1e-9 if x64 else 1e-2)
        np.testing.assert_allclose(_on(path, jax.jacrev(jax.grad(ours)), small), expected, atol=1e-9 if x64 else 1e-2)


@pytest.mark.parametrize("path", PATHS)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from([(3, 3), (5, 2), (2, 5), (40, 40), (30, 61), (70, 33)]))
def test_orthogonalize_columns_is_an_svd(path, seed, shape, x64):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    if rng.uniform() < 0.5:  # rank deficient
        a[:, -1] = a[:, 0]
    w, v = _on(path, la.orthogonalize_columns, jnp.asarray(a, jnp.zeros(()).dtype))
    w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
    eps = 1e-12 if x64 else 1e-4
    scale = np.linalg.norm(a, 2)
    np.testing.assert_allclose(v.T @ v, np.eye(shape[1]), atol=eps * 10)
    np.testing.assert_allclose(w, a @ v, atol=eps * 10 * scale)
    gram = w.T @ w
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=eps * 10 * scale**2)
    singular = np.sort(np.linalg.norm(w, axis=0))[::-1][: min(shape)]
    np.testing.assert_allclose(singular, np.linalg.svd(a, compute_uv=False), atol=eps * 10 * scale)


@pytest.mark.float32
@pytest.mark.parametrize("path", PATHS)
def test_psd_sqrt_and_its_derivative_with_repeated_eigenvalues(path, x64):
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    eigenvalues = np.array([2.0, 2.0, 2.0, 0.5, 0.0, 0.0])  # repeated, and rank deficient
    c = jnp.asarray((basis * eigenvalues) @ basis.T, jnp.zeros(()).dtype)
    root = _on(path, lambda c: la.psd_sqrt(c, 1e-6), c)
    expected = (basis * np.sqrt(eigenvalues)) @ basis.T
    tol = 1e-10 if x64 else 1e-4
    np.testing.assert_allclose(root, expected, atol=tol)
    # The derivative solves R Ṙ + Ṙ R = Ċ on the range of C (a direction within it).
    direction = jnp.asarray((basis[:, :4] * rng.normal(size=4)) @ basis[:, :4].T, c.dtype)
    _, root_dot = _on(path, lambda c, d: jax.jvp(lambda m: la.psd_sqrt(m, 1e-6), (c,), (d,)), c, direction + direction.T)
    np.testing.assert_allclose(root @ root_dot + root_dot @ root, direction + direction.T, atol=10 * tol)
    assert np.all(np.isfinite(_on(path, jax.grad(lambda m: jnp.sum(la.psd_sqrt(m, 1e-6) ** 3)), c)))
