r"""Dense linear algebra that never runs a batched LAPACK call on the CPU: Cholesky factors and
their inverses, ``U⁻¹``, symmetric roots and singular values.

**Why.** jaxlib 0.10.2's CPU LAPACK kernels, once batched — any ``vmap`` of a program that calls
them — split their batch over the intra-op thread pool and wait for it; two of them running at once
can each wait for work queued behind the other, forever (``vmap(value_and_grad)`` of the dense
solver, 64 problems of 100 3-D points: 5 of 5 fresh processes hung). A single matrix runs inline.
So on the CPU every routine here runs LAPACK on one matrix outside ``vmap`` (as fast as before)
and, on a batch — under ``vmap`` (a ``custom_vmap`` rule) or with leading axes — either a
written-out form or LAPACK one matrix at a time (a ``lax.map``). On other platforms (GPU, TPU)
JAX's own routines run, batched (``lax.platform_dependent`` picks at lowering time).

**Cholesky on a batch**, written out: the lower factor ``L`` *and* ``T = L⁻¹`` by recursion on
2 × 2 blocks — ``L₂₁ = A₂₁T₁ᵀ``, ``L₂ = chol(A₂₂ − L₂₁L₂₁ᵀ)``, ``T₂₁ = −T₂L₂₁T₁`` — down to leaves
of at most ``LEAF`` rows, each one ``lax.fori_loop`` over its columns (a loop costs ~0.1 s to
compile: leaves are large). Nearly all flops are matrix products, and solves are products too
(``A⁻¹b = Tᵀ(Tb)``), as accurate as substitution on the likelihood's ill-conditioned ``U``
(float32, the curve kernel, ``cond(U) = 5e6``: ``wᵀU⁻¹w`` within 7e-5 of float64, LAPACK's
1.4e-3). A batch stays a batch of the same operations, so it shards over devices like any other.

**``U⁻¹``.** The closed-form gradient needs the whole of ``U⁻¹`` (``rowsum(M ⊙ Δ)`` reads every
entry of ``M = SᵀU⁻¹S``): ``cho_inverse`` forms ``TᵀT`` by a recursion that skips the zero
triangle (``n³/3`` flops); ``cho_inverse_lower`` gives only the lower triangle, all the
likelihood's rule needs when ``U`` is larger than ``n × n``.

**Singular values and symmetric eigenvalues on a batch**: the unrolled one-sided Jacobi sweeps of
``gpgrad_jax._smallmatrix`` for matrices of at most 8 columns (the per-point noise blocks), LAPACK
one matrix at a time beyond (``Dense`` noise, the dense solver's posterior draws): a round-robin
Jacobi method, tried, cost 240× LAPACK on 64 matrices of 150 × 150.

**Derivatives** are the textbook rules, as ``jax.custom_jvp`` whose tangents are products of the
outputs (forward mode, reverse mode by transposition, any order): for ``A = L Lᵀ``,
``L̇ = L Φ(T sym(Ȧ) Tᵀ)`` with ``Φ`` the lower triangle with half its diagonal, ``Ṫ = −T L̇ T``;
for ``x = A⁻¹b``, ``ẋ = A⁻¹(ḃ − Ȧx)``; for the symmetric root ``R = C^{1/2}`` of a positive
semi-definite ``C = V Λ Vᵀ``, ``Ṙ = V [(VᵀĊV)_{ij} / (√λ_i + √λ_j)] Vᵀ`` — finite for repeated
eigenvalues (a sum, not a difference, in the denominator).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from gpgrad_jax import _smallmatrix

Array = Any

#: Matrices of at most this many rows are leaves of the recursions: a ``fori_loop`` over their
#: columns. Larger ones split in two.
LEAF = 128


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _batch_safe(lapack, written_out=None, written_width=None):
    """On the CPU, ``lapack`` for a single matrix outside ``vmap`` and, for any batch — a ``vmap``
    or leading axes — ``written_out`` or, without one, ``lapack`` on one matrix after another (a
    ``lax.map``); ``lapack`` on other platforms. jaxlib's LAPACK kernels run a single matrix
    inline: only their batches go to the thread pool, which is the hazard. ``written_width``:
    batches of matrices with at most that many columns take ``written_out``, wider ones the map.

    Not differentiable by itself (``custom_vmap`` has no reverse mode): the public functions wrap
    it in ``custom_jvp`` rules whose tangents are products of its outputs.
    """

    def for_batch(*args):
        if written_out is not None and (written_width is None or args[0].shape[-1] <= written_width):
            return written_out(*args)
        # A map of the custom_vmap function itself: under a further vmap its body batches by this
        # rule again, never into a batched LAPACK call.
        batch = args[0].shape[:-2]
        flat = [a.reshape(-1, *a.shape[-2:]) for a in args]
        out = jax.lax.map(lambda parts: cpu(*parts), flat)
        return jax.tree_util.tree_map(lambda leaf: leaf.reshape(*batch, *leaf.shape[1:]), out)

    @custom_vmap
    def cpu(*args):
        if any(jnp.ndim(a) > 2 for a in args):
            batch = jnp.broadcast_shapes(*(jnp.shape(a)[:-2] for a in args))
            return for_batch(*[jnp.broadcast_to(a, (*batch, *jnp.shape(a)[-2:])) for a in args])
        return lapack(*args)

    @cpu.def_vmap
    def _batched(axis_size, in_batched, *args):
        if not any(in_batched):
            out = cpu(*args)
            return out, jax.tree_util.tree_map(lambda _: False, out)
        args = [a if batched else jnp.broadcast_to(a, (axis_size, *jnp.shape(a))) for a, batched in zip(args, in_batched)]
        out = for_batch(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    def dispatch(*args):
        return jax.lax.platform_dependent(*args, cpu=cpu, default=lapack)

    return dispatch


def _split(n: int) -> int:
    """Where a recursion splits ``n`` rows: half, rounded to a multiple of 8 (aligned blocks)."""
    return max(8, (n // 2) // 8 * 8)


def _row(a, i):
    """Row ``i`` (traced) of ``(..., r, c)`` matrices."""
    return jax.lax.dynamic_index_in_dim(a, i, axis=a.ndim - 2, keepdims=False)


# ----------------------------------------------------------------- Cholesky


class Cholesky(NamedTuple):
    """``A = L Lᵀ``: the lower factor ``L`` and its inverse ``T = L⁻¹`` (both lower triangular)."""

    low: Array
    inverse: Array

    def solve(self, b):
        """``A⁻¹ b`` for ``b`` of shape ``(..., n)`` or ``(..., n, k)``."""
        if b.ndim == self.inverse.ndim - 1:
            return self.solve(b[..., None])[..., 0]
        return _solve(self.low, self.inverse, b)

    def log_det(self):
        """``log |A| = 2 Σ log L_ii``."""
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(self.low, axis1=-2, axis2=-1)), axis=-1)


def _leaf_factor(a):
    """``(L, L⁻¹)`` of ``(..., n, n)``, one column of ``L`` and one row of ``L⁻¹`` per loop step:
    column ``j`` is ``a[:, j] − L L[j]ᵀ`` (columns ``≥ j`` of ``L`` still zero) over its pivot's
    root; row ``j`` of the inverse is ``(e_j − L[j] T) / L_jj`` (rows ``≥ j`` of ``T`` still
    zero). A pivot that is not positive gives NaN, which reaches every later column (as LAPACK's
    ``potrf`` leaves JAX's factor)."""
    n = a.shape[-1]
    rows = jnp.arange(n)

    def step(j, state):
        low, inverse = state
        col = jax.lax.dynamic_index_in_dim(a, j, axis=a.ndim - 1, keepdims=False)
        col = col - jnp.einsum("...ik,...k->...i", low, _row(low, j))
        pivot = jax.lax.dynamic_index_in_dim(col, j, axis=col.ndim - 1, keepdims=False)
        col = jnp.where(rows >= j, col / jnp.sqrt(pivot)[..., None], 0.0)
        low = jax.lax.dynamic_update_index_in_dim(low, col[..., :, None], j, axis=low.ndim - 1)
        row = _row(low, j)
        unit = (rows == j).astype(a.dtype)
        inverse_row = (unit - jnp.einsum("...k,...kc->...c", row, inverse)) / jax.lax.dynamic_index_in_dim(
            row, j, axis=row.ndim - 1
        )
        return low, jax.lax.dynamic_update_index_in_dim(inverse, inverse_row, j, axis=inverse.ndim - 2)

    zeros = jnp.zeros_like(a)
    return jax.lax.fori_loop(0, n, step, (zeros, zeros))


def _factor_blocks(a):
    """Recursion on ``[[A, Bᵀ], [B, C]]``: ``L₁ = chol(A)``, ``L₂₁ = B T₁ᵀ``,
    ``L₂ = chol(C − L₂₁L₂₁ᵀ)``, and the inverse ``[[T₁, 0], [−T₂ L₂₁ T₁, T₂]]`` — all products."""
    n = a.shape[-1]
    if n <= LEAF:
        return _leaf_factor(a)
    h = _split(n)
    low_top, inv_top = _factor_blocks(a[..., :h, :h])
    below = a[..., h:, :h] @ _t(inv_top)
    low_rest, inv_rest = _factor_blocks(a[..., h:, h:] - below @ _t(below))
    inv_below = -(inv_rest @ (below @ inv_top))
    zeros = jnp.zeros((*a.shape[:-2], h, n - h), a.dtype)

    def join(top, lower_left, rest):
        return jnp.concatenate([jnp.concatenate([top, zeros], -1), jnp.concatenate([lower_left, rest], -1)], -2)

    return join(low_top, below, low_rest), join(inv_top, inv_below, inv_rest)


def _phi(a):
    """The lower triangle of ``a`` with half its diagonal."""
    n = a.shape[-1]
    return jnp.tril(a) - 0.5 * a * jnp.eye(n, dtype=a.dtype)


def _lapack_factor(a):
    """``(L, L⁻¹)`` by LAPACK's (or the platform's) ``potrf``, then for one matrix the inverse by
    products (``triangular_inverse``); where only ``L`` is used, XLA drops the inverse."""
    low = jnp.linalg.cholesky(a, symmetrize_input=False)
    if low.ndim == 2:
        return low, triangular_inverse(low)
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
    return low, jax.scipy.linalg.solve_triangular(low, eye, lower=True)


_factor = _batch_safe(_lapack_factor, _factor_blocks)


@jax.custom_jvp
def _cholesky(a):
    return _factor(0.5 * (a + _t(a)))


@_cholesky.defjvp
def _cholesky_jvp(primals, tangents):
    (a,), (a_dot,) = primals, tangents
    low, inverse = _cholesky(a)
    low_dot = low @ _phi(inverse @ (0.5 * (a_dot + _t(a_dot))) @ _t(inverse))  # L Φ(T Ȧ Tᵀ)
    return (low, inverse), (low_dot, -(inverse @ low_dot @ inverse))  # Ṫ = −T L̇ T


def cholesky(a) -> Cholesky:
    """The lower Cholesky factor of symmetric positive definite ``(..., n, n)`` matrices (the
    input is symmetrised, as ``jnp.linalg.cholesky`` does) and its inverse; NaN where a pivot is
    not positive.

    Examples:
        >>> import jax.numpy as jnp
        >>> a = jnp.array([[4.0, 2.0], [2.0, 3.0]])
        >>> factor = cholesky(a)
        >>> bool(jnp.allclose(factor.low @ factor.low.T, a)), float(factor.low[0, 1])
        (True, 0.0)
        >>> bool(jnp.allclose(a @ factor.solve(jnp.array([1.0, 2.0])), jnp.array([1.0, 2.0])))
        True
    """
    return Cholesky(*_cholesky(a))


def _lapack_solve(low, inverse, b):
    return jax.scipy.linalg.cho_solve((low, True), b)


def _products_solve(low, inverse, b):
    return _t(inverse) @ (inverse @ b)


_solve_dispatch = _batch_safe(_lapack_solve, _products_solve)


@jax.custom_jvp
def _solve(low, inverse, b):
    """``(L Lᵀ)⁻¹ b``: LAPACK's ``potrs`` on one matrix, ``Tᵀ(T b)`` on a batch."""
    return _solve_dispatch(low, inverse, b)


@_solve.defjvp
def _solve_jvp(primals, tangents):
    (low, inverse, b), (low_dot, _, b_dot) = primals, tangents
    x = _solve(low, inverse, b)
    low_dot = jnp.tril(low_dot)
    change = low_dot @ (_t(low) @ x) + low @ (_t(low_dot) @ x)  # Ȧ x, Ȧ = L̇Lᵀ + LL̇ᵀ
    return x, _products_solve(low, inverse, b_dot - change)


# ------------------------------------------------------------------- U⁻¹


def cho_inverse_lower(inverse):
    """The lower triangle of ``A⁻¹ = TᵀT`` (strict upper triangle zero) from ``T = L⁻¹``.

    ``symmetrize_lower`` completes it to the full ``A⁻¹``.

    Examples:
        >>> import jax.numpy as jnp
        >>> u = jnp.array([[4.0, 2.0], [2.0, 3.0]])
        >>> inverse = symmetrize_lower(cho_inverse_lower(cholesky(u).inverse))
        >>> bool(jnp.allclose(inverse @ u, jnp.eye(2), atol=1e-6))
        True
    """
    return _gram_of_lower(inverse, full=False)


def cho_inverse(inverse):
    """The full symmetric ``A⁻¹ = TᵀT`` from ``T = L⁻¹``.

    The upper triangle is filled block by block during the recursion, transposing
    half as many entries as completing ``cho_inverse_lower`` afterwards would.
    """
    return _gram_of_lower(inverse, full=True)


def symmetrize_lower(lower):
    """``T + Tᵀ − diag(T)``: the symmetric matrix whose lower triangle is ``T``'s."""
    # One fused pass.  (A `where` on an iota mask compiles pathologically slowly on XLA:CPU
    # with --xla_cpu_multi_thread_eigen=false, the benchmark setting.)
    diagonal = jnp.diagonal(lower, axis1=-2, axis2=-1)
    return lower + jnp.swapaxes(lower, -1, -2) - diagonal[..., :, None] * jnp.eye(
        lower.shape[-1], dtype=lower.dtype
    )


# Below this size the products of the recursions are plain matmuls.
_PRODUCT_LEAF = 256


def _lower_times(t, x):
    """``T X`` for lower-triangular ``T``: recursion skips the zero block (half the flops)."""
    n = t.shape[-1]
    if n <= _PRODUCT_LEAF:
        return t @ x
    h = n // 2
    top = _lower_times(t[:h, :h], x[:h])
    bottom = t[h:, :h] @ x[:h] + _lower_times(t[h:, h:], x[h:])
    return jnp.concatenate([top, bottom], axis=0)


def _times_lower(x, t):
    """``X T`` for lower-triangular ``T``."""
    n = t.shape[-1]
    if n <= _PRODUCT_LEAF:
        return x @ t
    h = n // 2
    left = _times_lower(x[:, :h], t[:h, :h]) + x[:, h:] @ t[h:, :h]
    right = _times_lower(x[:, h:], t[h:, h:])
    return jnp.concatenate([left, right], axis=1)


def triangular_inverse(low):
    """``L⁻¹`` of one lower-triangular matrix by recursion on
    ``[[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]`` (``n³/3`` flops, against ``n³`` for a
    triangular solve with the identity), LAPACK's ``trsm`` at the leaves."""
    n = low.shape[-1]
    if n <= _PRODUCT_LEAF:
        return jax.scipy.linalg.solve_triangular(low, jnp.eye(n, dtype=low.dtype), lower=True)
    h = n // 2
    a_inv = triangular_inverse(low[:h, :h])
    c_inv = triangular_inverse(low[h:, h:])
    below = -_lower_times(c_inv, _times_lower(low[h:, :h], a_inv))
    return jnp.block([[a_inv, jnp.zeros((h, n - h), low.dtype)], [below, c_inv]])


def _lower_transposed_times(t, x):
    """``Tᵀ X`` for lower-triangular ``T`` (``..., n, n``)."""
    n = t.shape[-1]
    if n <= _PRODUCT_LEAF:
        return _t(t) @ x
    h = n // 2
    top = _lower_transposed_times(t[..., :h, :h], x[..., :h, :]) + _t(t[..., h:, :h]) @ x[..., h:, :]
    bottom = _lower_transposed_times(t[..., h:, h:], x[..., h:, :])
    return jnp.concatenate([top, bottom], axis=-2)


def _gram_of_lower(t, full):
    """``TᵀT`` for lower-triangular ``T`` (``..., n, n``; its lower triangle only unless ``full``);
    zero blocks are never multiplied."""
    n = t.shape[-1]
    if n <= _PRODUCT_LEAF:
        gram = _t(t) @ t
        return gram if full else jnp.tril(gram)
    h = n // 2
    p, q, r = t[..., :h, :h], t[..., h:, :h], t[..., h:, h:]
    cross = _t(q) @ q
    top_left = _gram_of_lower(p, full) + (cross if full else jnp.tril(cross))
    bottom_left = _lower_transposed_times(r, q)
    top_right = _t(bottom_left) if full else jnp.zeros((*t.shape[:-2], h, n - h), t.dtype)
    top = jnp.concatenate([top_left, top_right], -1)
    return jnp.concatenate([top, jnp.concatenate([bottom_left, _gram_of_lower(r, full)], -1)], -2)


# ------------------------------------------- singular values and symmetric eigenvalues


def _svd_columns(a):
    _, _, vh = jnp.linalg.svd(a, full_matrices=True)
    v = _t(vh)
    return a @ v, v


def _small_columns(a):
    return _smallmatrix.orthogonalize_columns(a)


# A batch of symmetric eigenvalue or singular value problems has no fast written-out form for
# any width: the round-robin Jacobi method, tried, costs O(sweeps·m·d²) in memory-bound rounds
# (240× LAPACK on 64 matrices of 150 × 150). Batches of narrow matrices (the per-point noise
# blocks) take the unrolled sweeps of ``gpgrad_jax._smallmatrix``; wider ones LAPACK, one at a time.
orthogonalize_columns = _batch_safe(_svd_columns, _small_columns, written_width=8)
orthogonalize_columns.__doc__ = """``(W, V)`` with ``A V = W``, ``V`` orthogonal and the columns of
``W`` orthogonal — the singular value decomposition ``A = U Σ Vᵀ`` with ``W = U Σ``
(``σ_j = ‖w_j‖``) — for ``(..., m, d)`` matrices: by LAPACK one matrix at a time, or by the
unrolled one-sided Jacobi sweeps of ``gpgrad_jax._smallmatrix`` for a batch of at most 8 columns.
Not differentiable in reverse mode; the callers define their own rules."""


def _small_eigen(c):
    """``(λ, V)`` from the one-sided Jacobi method on symmetric ``C`` itself: ``C V = W`` with
    orthogonal columns makes ``V`` the eigenvectors of ``C²``, hence of ``C`` (the callers' ``C``
    are positive semi-definite up to rounding), and ``λ_j = v_jᵀ w_j``."""
    w, v = _small_columns(c)
    return jnp.sum(v * w, axis=-2), v


def _lapack_eigen(c):
    return tuple(jnp.linalg.eigh(c))


_eigen = _batch_safe(_lapack_eigen, _small_eigen, written_width=8)


@jax.custom_jvp
def symmetric_eigen(c):
    """``(λ, V)`` with ``C = V diag(λ) Vᵀ`` for symmetric positive semi-definite ``(..., n, n)``
    matrices (in no particular order).

    Its derivative is the textbook one, ``λ̇ = diag(VᵀĊV)``, ``V̇ = V (F ⊙ VᵀĊV)`` with
    ``F_ij = 1/(λ_j − λ_i)``, except that ``F_ij = 0`` between eigenvalues equal to rounding: the
    eigenvectors of a repeated eigenvalue are any basis of its space, and what the callers build
    from them (``psd_sqrt`` and its derivative) does not depend on the basis. Without this rule a
    second derivative through ``psd_sqrt`` would differentiate the ``custom_vmap`` of the batch
    rule, which JAX's rule for that nests without end.
    """
    return _eigen(c)


@symmetric_eigen.defjvp
def _symmetric_eigen_jvp(primals, tangents):
    (c,), (c_dot,) = primals, tangents
    eigenvalues, vectors = symmetric_eigen(c)
    rotated = _t(vectors) @ (0.5 * (c_dot + _t(c_dot))) @ vectors
    gap = eigenvalues[..., None, :] - eigenvalues[..., :, None]
    scale = jnp.max(jnp.abs(eigenvalues), axis=-1, keepdims=True)[..., None]
    distinct = jnp.abs(gap) > 100 * c.shape[-1] * jnp.finfo(c.dtype).eps * scale
    inverse_gap = jnp.where(distinct, 1.0 / jnp.where(distinct, gap, 1.0), 0.0)
    return (eigenvalues, vectors), (jnp.diagonal(rotated, axis1=-2, axis2=-1), vectors @ (inverse_gap * rotated))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def psd_sqrt(c, floor: float = 0.0):
    """The symmetric square root ``R = V diag(√λ⁺) Vᵀ`` of positive semi-definite ``(..., n, n)``
    matrices ``C = V diag(λ) Vᵀ``, eigenvalues below ``floor · max|λ|`` (rounding, or directions
    without information) taken as zero.

    Its derivative solves ``R Ṙ + Ṙ R = Ċ``: ``Ṙ = V [(VᵀĊV)_ij / (√λ_i + √λ_j)] Vᵀ``, finite for
    repeated eigenvalues; zero between two zero eigenvalues.

    Examples:
        >>> import jax.numpy as jnp
        >>> c = jnp.array([[2.0, 1.0], [1.0, 2.0]])
        >>> root = psd_sqrt(c)
        >>> bool(jnp.allclose(root @ root, c, atol=1e-5)), bool(jnp.allclose(root, root.T))
        (True, True)
    """
    root, _, _ = _psd_root(c, floor)
    return root


def _psd_root(c, floor):
    eigenvalues, vectors = symmetric_eigen(0.5 * (c + _t(c)))
    largest = jnp.max(jnp.abs(eigenvalues), axis=-1, keepdims=True)
    roots = jnp.where(eigenvalues > floor * largest, jnp.sqrt(jnp.maximum(eigenvalues, 0.0)), 0.0)
    return (vectors * roots[..., None, :]) @ _t(vectors), roots, vectors


@psd_sqrt.defjvp
def _psd_sqrt_jvp(floor, primals, tangents):
    (c,), (c_dot,) = primals, tangents
    root, roots, vectors = _psd_root(c, floor)
    rotated = _t(vectors) @ (0.5 * (c_dot + _t(c_dot))) @ vectors
    total = roots[..., :, None] + roots[..., None, :]
    inner = jnp.where(total > 0, rotated / jnp.where(total > 0, total, 1.0), 0.0)
    return root, vectors @ inner @ _t(vectors)
