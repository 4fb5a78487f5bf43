r"""Algebra of small fixed-size matrices, written out: products, Cholesky, triangular solves and
Householder triangularisation, elementwise over any batch of leading axes.

The state-space solvers work on many small matrices (a few states per coordinate, a few
coordinates per point). Two reasons keep LAPACK out of them:

* **speed**: inside a ``lax.scan`` or over a batch of ``n`` points, a LAPACK call per step
  (or one batched call) costs more than the arithmetic; written out, the same work is a few
  fused elementwise loops that vectorise over the batch;
* **no hangs**: jaxlib's batched CPU LAPACK kernels (``getrf``, ``trsm``, ``orgqr``, …) split
  their batch over the intra-op thread pool and wait for it; two of them running concurrently
  in one program can each wait for work queued behind the other — a deadlock seen in jaxlib
  0.10.2 (``tests/test_no_lapack.py`` checks the compiled solvers for such calls).

The Householder step is the ``tria`` operation of square-root filtering: for a matrix ``X``
(``r × c``, ``r ≤ c``) an orthogonal ``Θ`` with ``X Θ = [L, 0]``, ``L`` lower triangular, so
``L Lᵀ = X Xᵀ``; rows below the first ``pivots`` ride along (``[X; Y] Θ``), which is how a
filter reads off the gain and the transformed factors of a pre-array.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def small_matmul(a, b):
    """``a @ b`` (batched) for the state-space solvers' small matrices.

    Up to 8 columns of ``a`` it is an unrolled sum of broadcast products, which XLA:CPU fuses
    into the surrounding elementwise work: a ``dot`` per step inside a ``lax.scan`` that also
    writes outputs measured 20× slower, and a broadcast-and-reduce 8× slower over a batch.
    Larger matrices use ``matmul`` (the unrolled form would only lengthen compilation).
    """
    if a.shape[-1] > 8:
        return jnp.matmul(a, b)
    return sum(a[..., :, j, None] * b[..., None, j, :] for j in range(a.shape[-1]))


def transpose(a):
    return jnp.swapaxes(a, -1, -2)


def triangularize(x, pivots: int | None = None, unit_pivots: bool = False):
    """``[X; Y] Θ`` for the orthogonal ``Θ`` (a product of Householder reflections) that makes the
    first ``pivots`` rows of ``x`` (``..., r, c``) lower triangular: their entries right of the
    diagonal become exactly zero, and the other rows are transformed alike.

    ``pivots`` defaults to ``min(r, c)``. ``unit_pivots`` declares that ``x`` starts with an
    identity block, ``x[:pivots, :pivots] = I`` (the pre-arrays ``[[I, M], [0, S]]`` of
    square-root updates): each reflection then has ``u₀ = 1`` and a norm ``≥ 1``, and skips
    the guards a zero row needs. The diagonal of the result may have either sign (it is
    ``−‖u‖`` with ``u₀ ≥ 0``); factors are defined up to such signs.

    On a single matrix (a step of a ``lax.scan``) up to ``UNROLL`` reflections are written
    out, which XLA fuses with their neighbours; on a batch, or beyond that, they run as a
    ``fori_loop``: the loop costs nothing next to batched work, and compilation stays short
    (an associative scan inlines its combination at every level).

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]])
        >>> low = triangularize(x)[:, :2]
        >>> bool(jnp.allclose(low @ low.T, x @ x.T)), float(low[0, 1])
        (True, 0.0)
    """
    rows, cols = x.shape[-2:]
    pivots = min(rows, cols) if pivots is None else pivots
    # What is left of a pivot row after the earlier reflections is rounding noise when the row
    # lies in their span (rank-deficient blocks, unobserved points): below this floor it is
    # treated as zero. Reflecting noise would be orthogonal only if computed consistently —
    # and XLA may recompute its vector in two fusions with different roundings (seen: a jitted
    # associative scan returning 1e12 where eager evaluation returned 0.3).
    floor = None
    if not unit_pivots:
        floor = (cols * jnp.finfo(x.dtype).eps) ** 2 * jnp.sum(x[..., :pivots, :] ** 2, axis=-1)
    if _unrolled(x, pivots):
        for i in range(pivots):
            x = _reflect(x, i, floor)
        return x
    return jax.lax.fori_loop(0, pivots, lambda i, x: _reflect(x, i, floor), x)


def _unrolled(x, steps):
    """Whether ``triangularize`` and the substitutions write their ``steps`` out."""
    return steps <= (UNROLL if x.ndim == 2 else 2)


#: Matrices with up to this many rows or pivots are handled by written-out code.
UNROLL = 8


def _index(a, i, axis):
    """``a`` at position ``i`` along ``axis`` (negative): a static slice for a Python ``i``."""
    if isinstance(i, int):
        return a[(Ellipsis, i) + (slice(None),) * (-axis - 1)]
    return jax.lax.dynamic_index_in_dim(a, i, axis=a.ndim + axis, keepdims=False)


def _reflect(x, i, floor):
    """The ``i``-th Householder reflection of ``triangularize`` (``i`` static or traced);
    ``floor`` (``..., pivots``): squared norms below which a pivot row counts as zero, or
    ``None`` for unit pivots.

    Written as one reduction (``x u`` for every row, which also holds ``‖u‖²``) and one
    elementwise update whose row and column masks are constants for a static ``i``: XLA:CPU
    then runs a reflection as a few fused loops. (Selecting rows with ``where`` ran the same
    reflection 15× slower inside a ``lax.scan``; slicing and concatenating rows, 2×.)
    """
    rows, cols = x.shape[-2:]
    dtype = x.dtype
    index = np if isinstance(i, int) else jnp  # NumPy masks are compile-time constants
    active = (index.arange(cols) >= i).astype(dtype)
    unit = (index.arange(cols) == i).astype(dtype)
    below = (index.arange(rows) > i).astype(dtype)[:, None]
    at = (index.arange(rows) == i).astype(dtype)[:, None]
    pivot_row = _index(x, i, -2)
    u = pivot_row * active
    products = jnp.sum(x * u[..., None, :], axis=-1)  # x_r · u; at r = i, ‖u‖²
    norm_sq = _index(products, i, -1)
    column_i = _index(x, i, -1)  # x_r,i
    u0 = _index(pivot_row, i, -1)
    if floor is None:
        alpha = jnp.sqrt(norm_sq)  # ≥ 1
        tau = 1.0 / (alpha * (alpha + u0))
    else:
        # A zero row (no information, no process noise) is left as it is: τ = 0, α = 0.
        nonzero = (norm_sq > _index(floor, i, -1)).astype(dtype)
        alpha = jnp.copysign(jnp.sqrt(norm_sq + (1.0 - nonzero)), u0) * nonzero
        tau = nonzero / (alpha * (alpha + u0) + (1.0 - nonzero))
    # H = I − τ v vᵀ with v = u + α e_i maps u to −α e_i; x_r v = x_r u + α x_r,i.
    v = u + alpha[..., None] * unit
    w = (products + alpha[..., None] * column_i) * tau[..., None]
    updated = x - w[..., :, None] * v[..., None, :]
    # The pivot row: its settled entries left of i, −α at i, exact zeros to the right.
    pivot = pivot_row * (1.0 - active) - alpha[..., None] * unit
    return below * updated + at * pivot[..., None, :] + (1.0 - below - at) * x


def solve_lower(low, b):
    """``L⁻¹ b`` by forward substitution, ``low`` (``..., r, r``) lower triangular, ``b`` (``..., r, k``)."""
    return _substitute(low, b, transposed=False)


def solve_lower_transposed(low, b):
    """``L⁻ᵀ b`` by back substitution, ``low`` lower triangular."""
    return _substitute(low, b, transposed=True)


def _substitute(low, b, transposed):
    r = low.shape[-1]
    order = range(r - 1, -1, -1) if transposed else range(r)
    matrix = transpose(low) if transposed else low  # upper triangular when transposed

    def row(i, x):
        # Entries of x not yet solved are zero, so a full row product adds only solved ones.
        coefficients = jax.lax.dynamic_index_in_dim(matrix, i, axis=matrix.ndim - 2, keepdims=False)
        rhs = jax.lax.dynamic_index_in_dim(b, i, axis=b.ndim - 2, keepdims=False)
        diagonal = jnp.sum(coefficients * (jnp.arange(r) == i), axis=-1)
        value = (rhs - jnp.sum(coefficients[..., :, None] * x, axis=-2)) / diagonal[..., None]
        return jnp.where((jnp.arange(r) == i)[:, None], value[..., None, :], x)

    x = jnp.zeros(jnp.broadcast_shapes(low.shape[:-2], b.shape[:-2]) + b.shape[-2:], b.dtype)
    if _unrolled(x, r):
        for i in order:
            x = row(i, x)
        return x
    if transposed:
        return jax.lax.fori_loop(0, r, lambda j, x: row(r - 1 - j, x), x)
    return jax.lax.fori_loop(0, r, row, x)


def solve(m, b):
    """``M⁻¹ b`` for small square nonsingular ``m`` (``..., r, r``), ``b`` (``..., r, k``), by QR:
    ``[Mᵀ; I] Θ = [L; Θ]`` gives ``M = Θ Lᵀ``, so ``M⁻¹ b = L⁻ᵀ Θᵀ b`` — backward stable, no
    pivoting decisions."""
    r = m.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(r, dtype=m.dtype), m.shape)
    post = triangularize(jnp.concatenate([transpose(m), eye], axis=-2), r)
    low, theta = post[..., :r, :], post[..., r:, :]
    return solve_lower_transposed(low, small_matmul(transpose(theta), b))


def cholesky(a, semidefinite: bool = False):
    """The lower Cholesky factor of small symmetric positive definite matrices (``..., p, p``).

    With ``semidefinite``, a pivot that is not positive (a direction of zero variance, or a
    rounding error below it) gives a zero column instead of a NaN: the factor of the nearest
    positive semi-definite matrix in that sense.
    """
    p = a.shape[-1]
    low = [[None] * p for _ in range(p)]
    zero = jnp.zeros_like(a[..., 0, 0])
    for j in range(p):
        pivot = a[..., j, j] - sum((low[j][i] ** 2 for i in range(j)), zero)
        if semidefinite:
            positive = pivot > 0
            root = jnp.sqrt(jnp.where(positive, pivot, 1.0))
            low[j][j] = jnp.where(positive, root, 0.0)
            inverse = jnp.where(positive, 1.0 / root, 0.0)
        else:
            low[j][j] = jnp.sqrt(pivot)
            inverse = 1.0 / low[j][j]
        for r in range(j + 1, p):
            low[r][j] = (a[..., r, j] - sum((low[r][i] * low[j][i] for i in range(j)), zero)) * inverse
    return jnp.stack([jnp.stack([low[r][c] if c <= r else zero for c in range(p)], -1) for r in range(p)], -2)


def spd_inverse_and_logdet(u):
    """``(U⁻¹, log|U|)`` for small symmetric positive definite ``U`` (``..., p, p``), by the
    written-out Cholesky factorisation: elementwise over any batch."""
    p = u.shape[-1]
    if p == 1:
        return 1.0 / u, jnp.log(u[..., 0, 0])
    low = cholesky(u)
    inverse_low = solve_lower(low, jnp.broadcast_to(jnp.eye(p, dtype=u.dtype), u.shape))  # T = L⁻¹
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(low, axis1=-2, axis2=-1)), axis=-1)
    return small_matmul(transpose(inverse_low), inverse_low), logdet  # U⁻¹ = TᵀT


#: Cyclic sweeps of the one-sided Jacobi method: it converges quadratically, and 8 sweeps took
#: every tested 3 × 3 block (projections ``(I − rrᵀ)/σ``, rank 1, full, ill-conditioned) to
#: orthogonal columns in float64 — the smallest singular value of an exactly rank-deficient
#: block then at most 2.5 eps of the largest (LAPACK's gesdd: 2.8 eps).
JACOBI_SWEEPS = 8


# Jitted so that eager callers (the noise term of an eager likelihood call) reuse one compiled
# program per shape: the loop's body is a new closure per call, and an eager ``fori_loop``
# recompiled it every time (0.15 s a call for 5 points).
@functools.partial(jax.jit, static_argnames="sweeps")
def orthogonalize_columns(a, sweeps: int = JACOBI_SWEEPS):
    """``(W, V)`` with ``A V = W``, ``V`` orthogonal and the columns of ``W`` orthogonal: the
    singular value decomposition ``A = U Σ Vᵀ`` with ``W = U Σ`` (``σ_j = ‖w_j‖``), by the
    one-sided (Hestenes) Jacobi method, elementwise over any batch of ``(..., m, d)``
    matrices. Jacobi rotations of column pairs are orthogonal, so the singular values keep full
    relative accuracy; written out (``d`` small), it needs no LAPACK."""
    d = a.shape[-1]
    eps = jnp.finfo(a.dtype).eps
    eye = np.eye(d)
    basis = [jnp.broadcast_to(jnp.asarray(eye[:, j], a.dtype), (*a.shape[:-2], d)) for j in range(d)]

    def sweep(_, state):
        columns, basis = list(state[0]), list(state[1])
        for p in range(d - 1):
            for q in range(p + 1, d):
                alpha = jnp.sum(columns[p] ** 2, axis=-1)
                beta = jnp.sum(columns[q] ** 2, axis=-1)
                gamma = jnp.sum(columns[p] * columns[q], axis=-1)
                # Rotate only pairs not yet orthogonal to working precision (zero columns: never).
                rotate = jnp.abs(gamma) > eps * jnp.sqrt(alpha * beta)
                zeta = (beta - alpha) / (2.0 * jnp.where(rotate, gamma, 1.0))
                tangent = jnp.where(zeta >= 0, 1.0, -1.0) / (jnp.abs(zeta) + jnp.sqrt(1.0 + zeta**2))
                cosine = jnp.where(rotate, 1.0 / jnp.sqrt(1.0 + tangent**2), 1.0)[..., None]
                sine = jnp.where(rotate, cosine[..., 0] * tangent, 0.0)[..., None]
                pair = (
                    cosine * columns[p] - sine * columns[q],
                    sine * columns[p] + cosine * columns[q],
                    cosine * basis[p] - sine * basis[q],
                    sine * basis[p] + cosine * basis[q],
                )
                # Each rotation reads its inputs twice: without the barrier XLA's fusion would
                # recompute the whole chain of earlier rotations inside every later one.
                columns[p], columns[q], basis[p], basis[q] = jax.lax.optimization_barrier(pair)
        return tuple(columns), tuple(basis)

    columns, basis = jax.lax.fori_loop(0, sweeps, sweep, (tuple(a[..., :, j] for j in range(d)), tuple(basis)))
    return jnp.stack(columns, axis=-1), jnp.stack(basis, axis=-1)
