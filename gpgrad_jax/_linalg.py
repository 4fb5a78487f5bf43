"""``U⁻¹`` from the Cholesky factor of ``U``, by matrix products.

The closed-form gradient needs the whole of ``U⁻¹`` (``rowsum(M ⊙ Δ)`` reads every
entry of ``M = SᵀU⁻¹S``), so this inverse is the one O(m³) step after the
factorisation.  Two triangular solves against the identity cost about six
Cholesky factorisations; LAPACK's ``potri`` (``L⁻¹``, then ``L⁻ᵀL⁻¹``, each
exploiting triangularity) about two.  Here both steps recurse on 2×2 blocks so
that every product skips the zero triangle — ``2m³/3`` flops, like ``potri`` —
and are made of ``matmul`` only: pure JAX, fast on CPU and GPU alike, no host
round trip, differentiable (reverse-over-reverse through the likelihood works).

``cho_inverse`` gives the full ``U⁻¹``; ``cho_inverse_lower`` only its
lower triangle, which is all the likelihood's VJP needs when ``U`` is larger
than ``n × n`` (then the block trace is completed by an ``n × n`` transpose
instead of an ``m × m`` one).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

_LEAF = 256  # below this size the blocked recursion falls back to a triangular solve


def cho_inverse_lower(chol):
    """The lower triangle of ``U⁻¹`` (strict upper triangle zero) from ``U``'s lower Cholesky factor.

    ``symmetrize_lower`` completes it to the full ``U⁻¹``.

    Examples:
        >>> import jax.numpy as jnp
        >>> u = jnp.array([[4.0, 2.0], [2.0, 3.0]])
        >>> inverse = symmetrize_lower(cho_inverse_lower(jnp.linalg.cholesky(u)))
        >>> bool(jnp.allclose(inverse @ u, jnp.eye(2), atol=1e-6))
        True
    """
    return _gram_of_lower(_triangular_inverse(chol), full=False)


def cho_inverse(chol):
    """The full symmetric ``U⁻¹`` from ``U``'s lower Cholesky factor.

    The upper triangle is filled block by block during the recursion, transposing
    half as many entries as completing ``cho_inverse_lower`` afterwards would.
    """
    return _gram_of_lower(_triangular_inverse(chol), full=True)


def symmetrize_lower(lower):
    """``T + Tᵀ − diag(T)``: the symmetric matrix whose lower triangle is ``T``'s."""
    # One fused pass.  (A `where` on an iota mask compiles pathologically slowly on XLA:CPU
    # with --xla_cpu_multi_thread_eigen=false, the benchmark setting.)
    diagonal = jnp.diagonal(lower, axis1=-2, axis2=-1)
    return lower + jnp.swapaxes(lower, -1, -2) - diagonal[..., :, None] * jnp.eye(
        lower.shape[-1], dtype=lower.dtype
    )


def _lower_times(t, x):
    """``T X`` for lower-triangular ``T``: recursion skips the zero block (half the flops)."""
    n = t.shape[-1]
    if n <= _LEAF:
        return t @ x
    h = n // 2
    top = _lower_times(t[:h, :h], x[:h])
    bottom = t[h:, :h] @ x[:h] + _lower_times(t[h:, h:], x[h:])
    return jnp.concatenate([top, bottom], axis=0)


def _times_lower(x, t):
    """``X T`` for lower-triangular ``T``."""
    n = t.shape[-1]
    if n <= _LEAF:
        return x @ t
    h = n // 2
    left = _times_lower(x[:, :h], t[:h, :h]) + x[:, h:] @ t[h:, :h]
    right = _times_lower(x[:, h:], t[h:, h:])
    return jnp.concatenate([left, right], axis=1)


def _lower_transposed_times(t, x):
    """``Tᵀ X`` for lower-triangular ``T``."""
    n = t.shape[-1]
    if n <= _LEAF:
        return t.T @ x
    h = n // 2
    top = _lower_transposed_times(t[:h, :h], x[:h]) + t[h:, :h].T @ x[h:]
    bottom = _lower_transposed_times(t[h:, h:], x[h:])
    return jnp.concatenate([top, bottom], axis=0)


def _triangular_inverse(chol):
    """``L⁻¹`` by recursion on ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]`` (n³/3 flops)."""
    n = chol.shape[-1]
    if n <= _LEAF:
        return solve_triangular(chol, jnp.eye(n, dtype=chol.dtype), lower=True)
    h = n // 2
    a_inv = _triangular_inverse(chol[:h, :h])
    c_inv = _triangular_inverse(chol[h:, h:])
    below = -_lower_times(c_inv, _times_lower(chol[h:, :h], a_inv))
    return jnp.block([[a_inv, jnp.zeros((h, n - h), chol.dtype)], [below, c_inv]])


def _gram_of_lower(t, full):
    """``TᵀT`` for lower-triangular ``T`` (its lower triangle only unless ``full``); zero blocks
    are never multiplied."""
    n = t.shape[-1]
    if n <= _LEAF:
        gram = t.T @ t
        return gram if full else jnp.tril(gram)
    h = n // 2
    p, q, r = t[:h, :h], t[h:, :h], t[h:, h:]
    top_left = _gram_of_lower(p, full) + (q.T @ q if full else jnp.tril(q.T @ q))
    bottom_left = _lower_transposed_times(r, q)
    top_right = bottom_left.T if full else jnp.zeros((h, n - h), t.dtype)
    return jnp.block([[top_left, top_right], [bottom_left, _gram_of_lower(r, full)]])
