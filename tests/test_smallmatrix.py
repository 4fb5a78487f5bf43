"""The written-out small-matrix algebra against NumPy, on random, rank-deficient and zero inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpgrad_jax import _smallmatrix as sm

seeds = st.integers(0, 2**32 - 1)
# (rows, columns, pivots): the shapes the solvers use, written out and as loops.
SHAPES = [(6, 12, 6), (12, 9, 3), (2, 4, 2), (15, 12, 6), (21, 42, 21)]


def _random(rng, shape, rank_deficient):
    x = rng.normal(size=shape)
    if rank_deficient:  # rows in the span of others, and a zero row
        x[..., 1, :] = 2.0 * x[..., 0, :]
        x[..., -1, :] = 0.0
    return x


def _gram(a):
    return a @ np.swapaxes(a, -1, -2)


@pytest.mark.float32
@pytest.mark.parametrize("rows, cols, pivots", SHAPES)
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=seeds, rank_deficient=st.booleans(), batched=st.booleans())
def test_triangularize_is_orthogonal_and_triangular(rows, cols, pivots, seed, rank_deficient, batched, x64):
    rng = np.random.default_rng(seed)
    x = _random(rng, ((3,) if batched else ()) + (rows, cols), rank_deficient)
    post = np.asarray(sm.triangularize(jnp.asarray(x), pivots), np.float64)
    assert np.all(np.triu(post[..., :pivots, :], 1) == 0.0), "the pivot rows must be exactly triangular"
    tol = (1e-12 if x64 else 1e-5) * np.abs(_gram(x)).max()
    np.testing.assert_allclose(_gram(post), _gram(x), atol=tol)  # [X; Y] Θ keeps every inner product


@pytest.mark.float32
@given(seed=seeds)
@settings(max_examples=min(4, settings.default.max_examples))
def test_unit_pivots_and_the_gain_of_a_pre_array(seed, x64):
    """``[[I, CS], [0, S], [I, 0]] Θ = [[R, 0], [K̄, S⁺], [R⁻ᵀ, −CS⁺]]``: the identities the filter uses."""
    rng = np.random.default_rng(seed)
    p, big = 3, 6
    c_s = 100.0 * rng.normal(size=(p, big))  # a strong observation
    s = np.tril(rng.normal(size=(big, big)))
    pre = np.block([[np.eye(p), c_s], [np.zeros((big, p)), s], [np.eye(p), np.zeros((p, big))]])
    post = np.asarray(sm.triangularize(jnp.asarray(pre), p, unit_pivots=True), np.float64)
    root, gain, factor = post[:p, :p], post[p : p + big, :p], post[p : p + big, p:]
    tol = 1e-10 if x64 else 1e-3
    np.testing.assert_allclose(root @ root.T, np.eye(p) + c_s @ c_s.T, rtol=tol)
    np.testing.assert_allclose(gain @ root.T, s @ c_s.T, rtol=tol, atol=tol * np.abs(s @ c_s.T).max())
    np.testing.assert_allclose(post[p + big :, :p], np.linalg.inv(root).T, atol=tol)
    # C S⁺ from the carried rows, against C S⁺ from the factor (here C = c_s S⁻¹).
    np.testing.assert_allclose(-post[p + big :, p:], c_s @ np.linalg.solve(s, factor), atol=tol * 100)


def test_rank_deficient_rows_give_the_same_factor_under_jit(x64):
    """Rows in the span of earlier ones leave rounding noise, which reflections must not amplify:
    an earlier version computed a noise row's reflection inconsistently inside a jitted
    associative scan (1e12 where eager evaluation gave 0.3; the Markov-vs-dense tests of the
    parallel solver caught it). Eager and jitted factors keep every inner product."""
    rng = np.random.default_rng(0)
    x = np.zeros((3, 7, 12))
    x[:, 6, :] = rng.normal(size=(3, 12))  # a carried data row
    x[1, :6, :3] = np.repeat(rng.normal(size=(3, 3)), 2, axis=0) * np.array([1.0, 0.54])[np.arange(6) % 2, None]
    x[1, :6, 6:9] = np.repeat(rng.normal(size=(3, 3)), 2, axis=0) * np.array([1.0, 0.54])[np.arange(6) % 2, None]
    eager = sm.triangularize(jnp.asarray(x), 6)
    jitted = jax.jit(lambda a: sm.triangularize(a, 6))(jnp.asarray(x))
    tol = 1e-12 if x64 else 2e-5  # entries up to ~3: a few float32 roundings (was 1e12 off)
    np.testing.assert_allclose(_gram(np.asarray(jitted)), _gram(x), atol=tol)
    np.testing.assert_allclose(_gram(np.asarray(eager)), _gram(x), atol=tol)


@pytest.mark.float32
@pytest.mark.parametrize("r", [3, 13, pytest.param(1, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
def test_solves_cholesky_and_inverse_match_numpy(r, x64):
    rng = np.random.default_rng(r)
    a = rng.normal(size=(4, r, r))
    spd = a @ np.swapaxes(a, -1, -2) + r * np.eye(r)
    b = rng.normal(size=(4, r, 2))
    tol = 1e-11 if x64 else 2e-4
    low = np.asarray(sm.cholesky(jnp.asarray(spd)), np.float64)
    np.testing.assert_allclose(low, np.linalg.cholesky(spd), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        sm.solve_lower(jnp.asarray(low), jnp.asarray(b)), np.linalg.solve(low, b), rtol=tol, atol=tol
    )
    np.testing.assert_allclose(
        sm.solve_lower_transposed(jnp.asarray(low), jnp.asarray(b)),
        np.linalg.solve(np.swapaxes(low, -1, -2), b),
        rtol=tol,
        atol=tol,
    )
    np.testing.assert_allclose(
        sm.solve(jnp.asarray(a), jnp.asarray(b)), np.linalg.solve(a, b), rtol=100 * tol, atol=100 * tol
    )
    inverse, logdet = sm.spd_inverse_and_logdet(jnp.asarray(spd))
    np.testing.assert_allclose(inverse, np.linalg.inv(spd), rtol=tol, atol=tol)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(spd)[1], rtol=tol)


def test_semidefinite_cholesky_and_zero_rows_have_finite_derivatives():
    psd = jnp.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [2.0, 0.0, 4.0]])
    low = sm.cholesky(psd, semidefinite=True)
    np.testing.assert_allclose(low @ low.T, psd, atol=1e-6)
    x = jnp.zeros((3, 6)).at[2].set(jnp.arange(6.0))
    for derivative in (
        jax.grad(lambda a: jnp.sum(sm.triangularize(a, 2) ** 3)),
        jax.jacfwd(lambda a: sm.triangularize(a, 2)),
    ):
        assert bool(jnp.all(jnp.isfinite(derivative(x))))


@pytest.mark.float32
@pytest.mark.parametrize("shape", [(3, 3), (2, 2), (4, 3), (2, 5)])
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=seeds)
def test_jacobi_singular_values_and_ranks_match_lapack(shape, seed, x64):
    """The noise blocks' pseudo-determinant without LAPACK: ``A V = W`` with orthogonal ``V``
    and orthogonal columns of ``W``; their norms are LAPACK's singular values, and the rank
    tolerance counts the same ranks — for full, rank-deficient (projections ``(I − rrᵀ)/σ``,
    rank 1) and zero blocks."""
    rng = np.random.default_rng(seed)
    dtype = np.float64 if x64 else np.float32
    eps = np.finfo(dtype).eps
    m, d = shape
    full = rng.normal(size=(60, m, d))
    ray = rng.normal(size=(60, d, 1))
    ray /= np.linalg.norm(ray, axis=1, keepdims=True)
    projection = np.eye(d) - ray @ np.swapaxes(ray, 1, 2)  # rank d − 1; rows repeated for m > d
    projection = np.concatenate([projection, projection], axis=1)[:, :m] / rng.uniform(0.01, 1.0, (60, 1, 1))
    rank_one = rng.normal(size=(60, m, 1)) @ rng.normal(size=(60, 1, d))
    blocks = np.concatenate([full, projection, rank_one, np.zeros((5, m, d))]).astype(dtype)
    w, v = jax.jit(sm.orthogonalize_columns)(jnp.asarray(blocks))
    w, v = np.asarray(w, np.float64), np.asarray(v, np.float64)
    scale = np.maximum(np.abs(blocks).max(axis=(1, 2), keepdims=True), 1e-30).astype(np.float64)
    assert np.max(np.abs(blocks @ v - w) / scale) < 50 * eps
    assert np.max(np.abs(np.swapaxes(v, 1, 2) @ v - np.eye(d))) < 50 * eps
    gram = np.swapaxes(w, 1, 2) @ w
    off = gram - np.einsum("bii->bi", gram)[..., None] * np.eye(d)
    assert np.max(np.abs(off) / scale**2) < 50 * eps
    ours = np.sort(np.linalg.norm(w, axis=1), axis=1)[:, ::-1][:, : min(m, d)]
    lapack = np.linalg.svd(blocks.astype(np.float64), compute_uv=False)
    assert np.max(np.abs(ours - lapack) / scale[:, 0]) < 50 * eps
    tolerance = lambda s: s[:, :1] * max(m, d) * eps  # noqa: E731  the library's rank tolerance
    lapack_own = np.linalg.svd(blocks, compute_uv=False)
    np.testing.assert_array_equal((ours > tolerance(ours)).sum(1), (lapack_own > tolerance(lapack_own)).sum(1))
