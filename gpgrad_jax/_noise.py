"""Observation noise, given as a square root ``S`` of the noise precision ``Λ = SᵀS``.

Data ``r = y − μ`` of shape ``(n, D)`` is flattened point-major to length
``n·D``.  A noise model never builds the ``(nD × nD)`` matrix ``S`` (except
[``Dense``][gpgrad_jax.noise.Dense], which *is* one); instead it exposes the few structured maps the
likelihood needs.  ``U = I + S (K ⊗ I_D) Sᵀ`` is represented by its *core*
``U_c`` of shape ``(p, p)`` with ``U = U_c ⊗ I_q`` and ``m = p·q`` rows:

* [``Isotropic``][gpgrad_jax.noise.Isotropic] — ``S = I/σ``: ``U = (I + K/σ²) ⊗ I_D``, so ``p = n``,
  ``q = D`` and only an ``n × n`` matrix is ever factored;
* [``PerPoint``][gpgrad_jax.noise.PerPoint] — ``S = blockdiag(B_1 … B_n)``: ``p = nD``, ``q = 1``;
* [``Dense``][gpgrad_jax.noise.Dense] — any ``(m, nD)`` matrix: ``p = m``, ``q = 1``.

``S`` may be rank deficient (a 3-D point seen along one camera ray has a
rank-2 precision): ``U``'s eigenvalues are still ``≥ 1``.

The maps above are the dense solver's interface.  The state-space solvers need each
point's own block instead: [``BlockDiagonal``][gpgrad_jax.noise.BlockDiagonal] noises (``Isotropic``, ``PerPoint``)
provide it; ``Dense`` cannot, and the solver choice says so.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from gpgrad_jax import _linalg, _smallmatrix
from gpgrad_jax._pytree import pytree_dataclass

Array = Any


class Noise(abc.ABC):
    """Abstract base of the noise models: shapes, parameters and the dense solver's maps."""

    @abc.abstractmethod
    def core_shape(self, n: int, dim: int) -> tuple[int, int]:
        r"""``(p, q)``: $U = U_c \otimes I_q$ with $U_c$ of shape ``(p, p)``."""

    @abc.abstractmethod
    def whiten(self, r: Array) -> Array:
        """$w = S r$ for residuals ``r`` of shape ``(n, D)``; returns ``(p, q)``."""

    @abc.abstractmethod
    def adjoint_whiten(self, v: Array, dim: int) -> Array:
        r"""$S^\top v$ for ``v`` of shape ``(p, q)``; returns ``(n, D)``."""

    @abc.abstractmethod
    def core(self, kernel_matrix: Array, dim: int) -> Array:
        r"""$U_c - I$: the core of $S (K \otimes I_D) S^\top$, shape ``(p, p)``."""

    @abc.abstractmethod
    def core_adjoint(self, v: Array, dim: int) -> Array:
        r"""Adjoint of [``core``][gpgrad_jax.noise.Noise.core] in $K$: $V \mapsto \operatorname{blocktrace}(S^\top (V \otimes I_q) S)$, ``(n, n)``."""

    @abc.abstractmethod
    def core_adjoint_diagonal(self, d: Array, dim: int) -> Array:
        r"""[``core_adjoint``][gpgrad_jax.noise.Noise.core_adjoint] of the diagonal matrix $\operatorname{diag}(d)$ (``d`` of length ``p``), ``(n, n)``."""

    def core_adjoint_from_lower(self, lower: Array, dim: int) -> Array:
        r"""[``core_adjoint``][gpgrad_jax.noise.Noise.core_adjoint] of the symmetric $V = T + T^\top - \operatorname{diag}(T)$ given only $T = \operatorname{tril}(V)$.

        The adjoint commutes with transposition, so ``core_adjoint(V) = X + Xᵀ − Y`` with
        ``X = core_adjoint(T)`` and ``Y`` from the diagonal: the transpose is taken of an
        ``n × n`` matrix instead of a ``p × p`` one.
        """
        half = self.core_adjoint(lower, dim)
        diagonal = jnp.diagonal(lower)
        return half + half.T - self.core_adjoint_diagonal(diagonal, dim)

    @abc.abstractmethod
    def dense_matrix(self, n: int, dim: int) -> Array:
        """The explicit ``(m, nD)`` matrix ``S`` (for reference code and tests only)."""

    @abc.abstractmethod
    def check_shapes(self, n: int, dim: int) -> None:
        """Raise ``ValueError`` if this noise does not fit ``n`` points of dimension ``D``."""

    def positive_parameters(self) -> dict[str, Array]:
        """Parameters that must be strictly positive, by name."""
        return {}

    def covariance(self, n: int, dim: int) -> Array:
        r"""$\Lambda^{-1} = (S^\top S)^{-1}$, the noise covariance of ``n`` points of dimension ``D``, ``(nD, nD)``.

        Only for an invertible precision: along a direction without information the variance is
        infinite (the result is then not finite, or meaningless).
        """
        return _gram_inverse(self.dense_matrix(n, dim))

    def variance(self, n: int, dim: int) -> Array:
        """The diagonal of [``covariance``][gpgrad_jax.noise.Noise.covariance] as ``(n, D)``."""
        return jnp.diagonal(self.covariance(n, dim)).reshape(n, dim)

    @abc.abstractmethod
    def log_pseudo_determinant(self, n: int, dim: int) -> tuple[Array, Array]:
        r"""$(\log \operatorname{pdet} S, \operatorname{rank} S)$: the sum of the logs of $S$'s nonzero singular values, and
        their number (counted per block for block-diagonal $S$).

        What [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] adds to $L$. The rank is a float array (it is
        constant where the pseudo-determinant is differentiable); the derivative in $S$ is
        $(S^+)^\top$, the transposed pseudo-inverse, at fixed rank.
        """


class BlockDiagonal(Noise):
    """Noise whose $S$ is block diagonal per point: what the state-space solvers need.

    Besides the dense solver's maps above it gives each point's own block.
    """

    @abc.abstractmethod
    def observation_blocks(self, n: int, dim: int) -> tuple[Array, int]:
        """``(B, q)``: per-point blocks ``B`` of shape ``(n, p, p)`` acting on each point's
        residual reshaped to ``(p, q)``, ``p·q = D`` (``q > 1`` when the ``D`` coordinates are
        independent with one shared block, as for [``Isotropic``][gpgrad_jax.noise.Isotropic])."""


@pytree_dataclass
class Isotropic(BlockDiagonal):
    r"""Independent noise of standard deviation ``sigma`` on every coordinate: $S = I / \sigma$.

    Examples:
        >>> import jax.numpy as jnp
        >>> from gpgrad_jax import noise
        >>> noise.Isotropic(0.5).whiten(jnp.ones((2, 3))).shape
        (2, 3)
    """

    sigma: Array

    def core_shape(self, n, dim):
        return n, dim

    def whiten(self, r):
        return r / self.sigma

    def adjoint_whiten(self, v, dim):
        return v / self.sigma

    def core(self, kernel_matrix, dim):
        return kernel_matrix / self.sigma**2

    def core_adjoint(self, v, dim):
        return v / self.sigma**2

    def core_adjoint_diagonal(self, d, dim):
        return jnp.diag(d) / self.sigma**2

    def dense_matrix(self, n, dim):
        return jnp.eye(n * dim) / self.sigma

    def check_shapes(self, n, dim):
        if jnp.shape(self.sigma) != ():
            raise ValueError(
                f"noise.Isotropic: `sigma` must be a scalar, got shape {jnp.shape(self.sigma)}"
            )

    def positive_parameters(self):
        return {"sigma": self.sigma}

    def log_pseudo_determinant(self, n, dim):
        return -n * dim * jnp.log(self.sigma), jnp.asarray(n * dim, jnp.result_type(self.sigma))

    def covariance(self, n, dim):
        return self.sigma**2 * jnp.eye(n * dim, dtype=jnp.result_type(self.sigma))

    def variance(self, n, dim):
        return jnp.full((n, dim), self.sigma**2)

    def observation_blocks(self, n, dim):
        # One coordinate's 1×1 block, shared by the D coordinates (q = D columns).
        return jnp.broadcast_to(1.0 / self.sigma, (n, 1, 1)), dim


@pytree_dataclass
class PerPoint(BlockDiagonal):
    r"""Per-point precision square roots $B_i$ ($S = \operatorname{blockdiag}(B_1, \dots, B_n)$).

    ``blocks`` has shape ``(n, D, D)``; for 1-D data also ``(n,)`` ($B_i$ a
    scalar inverse standard deviation). They are square roots of *precisions*, not covariances:
    from what you have, use [``from_covariance``][gpgrad_jax.noise.PerPoint.from_covariance], [``from_precision``][gpgrad_jax.noise.PerPoint.from_precision] or
    [``from_projection``][gpgrad_jax.noise.PerPoint.from_projection] (cameras).  Blocks may be rank deficient or zero:
    a point seen by one camera gives $B_i$ of rank 2, $B_i^\top B_i$ the
    precision orthogonal to the viewing ray.

    Examples:
        >>> import jax.numpy as jnp
        >>> from gpgrad_jax import noise
        >>> ray = jnp.array([0.0, 0.0, 1.0])
        >>> block = (jnp.eye(3) - jnp.outer(ray, ray)) / 0.1   # no information along the ray
        >>> noise.PerPoint(jnp.stack([block, block])).whiten(jnp.ones((2, 3))).shape
        (6, 1)
    """

    blocks: Array

    @classmethod
    def from_covariance(cls, covariance: Array) -> PerPoint:
        r"""Noise with each point's covariance $C_i$ (``(n, D, D)``, or ``(n,)`` variances of 1-D
        data), positive definite: $B_i = L_i^{-1}$ with $C_i = L_i L_i^\top$, so $B_i^\top B_i = C_i^{-1}$.

        Examples:
            >>> import jax.numpy as jnp
            >>> from gpgrad_jax import noise
            >>> nz = noise.PerPoint.from_covariance(jnp.stack([jnp.diag(jnp.array([0.01, 0.04, 0.09]))] * 2))
            >>> tuple(round(float(v), 6) for v in jnp.diagonal(nz.blocks[0]))
            (10.0, 5.0, 3.333333)
        """
        covariance = _square_matrices("covariance", covariance, batched=True)
        return cls(_inverse_cholesky("covariance", covariance))

    @classmethod
    def from_precision(cls, precision: Array) -> PerPoint:
        r"""Noise with each point's precision $\Lambda_i$ (``(n, D, D)``, or ``(n,)`` for 1-D data),
        positive *semi*-definite — zero along directions a point carries no information about:
        $B_i = \Lambda_i^{1/2}$ (symmetric square root), so $B_i^\top B_i = \Lambda_i$."""
        precision = _square_matrices("precision", precision, batched=True)
        return cls(_symmetric_sqrt("precision", precision))

    @classmethod
    def from_projection(cls, jacobians: Array, pixel_sigma: Array) -> PerPoint:
        r"""Noise of 3-D (or $D$-dim) points observed through image-plane projections.

        ``jacobians`` ``(n, k, D)``: for each point the $k$ rows $\partial u / \partial X$ of its projections
        $u$ (2 rows per camera that sees it, linearised at the point; rows of zeros for a
        camera that does not); ``pixel_sigma``: the standard deviation of a pixel coordinate,
        a scalar or ``(n, k)``. The precision is $\Lambda_i = J_i^\top J_i / \sigma^2$ — rank 2 for a point
        one camera sees (nothing is known along its ray), full rank with two cameras; the
        block is $J_i / \sigma$ padded with zero rows ($k \leq D$) or the triangular factor $R_i$ of
        $J_i / \sigma = Q_i R_i$ ($k > D$).

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from gpgrad_jax import noise
            >>> camera = jnp.array([[500.0, 0, 320, 0], [0, 500.0, 240, 0], [0, 0, 1, 0]])  # pinhole P = K[I|0]
            >>> project = lambda X: (camera @ jnp.append(X, 1.0))[:2] / (camera @ jnp.append(X, 1.0))[2]
            >>> points = jnp.array([[0.1, 0.2, 5.0], [0.3, -0.1, 6.0]])
            >>> jacobians = jax.vmap(jax.jacfwd(project))(points)           # (n, 2, 3)
            >>> nz = noise.PerPoint.from_projection(jacobians, pixel_sigma=1.0)
            >>> tuple(int(r) for r in jnp.linalg.matrix_rank(nz.blocks))   # blind along each ray
            (2, 2)
        """
        jacobians = jnp.asarray(jacobians)
        if jacobians.ndim != 3:
            raise ValueError(f"`jacobians` must have shape (n, k, D), got shape {jacobians.shape}")
        n, k, dim = jacobians.shape
        sigma = jnp.asarray(pixel_sigma, jacobians.dtype)
        if sigma.shape not in ((), (n, k)):
            raise ValueError(f"`pixel_sigma` must be a scalar or have shape {(n, k)}, got shape {sigma.shape}")
        scaled = jacobians / jnp.broadcast_to(sigma, (n, k))[..., None]
        if k <= dim:  # the rows themselves, padded with exact zeros: the rank is exactly theirs
            return cls(jnp.concatenate([scaled, jnp.zeros((n, dim - k, dim), scaled.dtype)], axis=1))
        # k > D rows compressed to D by Householder reflections: Jᵀ Θ = [L, 0], so Lᵀ L = Jᵀ J / σ².
        return cls(jnp.swapaxes(_smallmatrix.triangularize(jnp.swapaxes(scaled, -1, -2))[..., :dim], -1, -2))

    def _blocks3(self, dim):
        return jnp.reshape(self.blocks, (-1, dim, dim))

    def core_shape(self, n, dim):
        return n * dim, 1

    def whiten(self, r):
        n, dim = r.shape
        return jnp.einsum("iab,ib->ia", self._blocks3(dim), r).reshape(n * dim, 1)

    def adjoint_whiten(self, v, dim):
        blocks = self._blocks3(dim)
        return jnp.einsum("iab,ia->ib", blocks, v.reshape(blocks.shape[0], dim))

    def _block_products(self, dim, blocks=None):
        # G[i, a, j, c, b] = B_i[a, b] B_j[c, b] as a broadcast product, summed over b inside
        # the reductions below, so that no (nD)×(nD)×D array is materialised.
        blocks = self._blocks3(dim) if blocks is None else blocks
        return blocks[:, :, None, None, :] * blocks[None, None, :, :, :]

    def core(self, kernel_matrix, dim):
        n = kernel_matrix.shape[0]
        # (S (K ⊗ I) Sᵀ)[(i,a),(j,c)] = K_ij (B_i B_jᵀ)_ac
        core = kernel_matrix[:, None, :, None] * jnp.sum(self._block_products(dim), axis=-1)
        return core.reshape(n * dim, n * dim)

    def core_adjoint(self, v, dim):
        n = v.shape[0] // dim
        v4 = v.reshape(n, dim, n, dim)
        # The barrier keeps XLA from merging this product with the identical one in `core`
        # (forward pass): shared, it would be materialised — 3× the memory of U for D = 3.
        blocks = jax.lax.optimization_barrier(self._blocks3(dim))
        return jnp.sum(v4[..., None] * self._block_products(dim, blocks), axis=(1, 3, 4))

    def core_adjoint_diagonal(self, d, dim):
        blocks = self._blocks3(dim)
        return jnp.diag(jnp.einsum("iab,ia->i", blocks**2, d.reshape(-1, dim)))

    def log_pseudo_determinant(self, n, dim):
        log_pdet, rank = log_pseudo_determinants(self._blocks3(dim))
        return jnp.sum(log_pdet), jnp.sum(rank)

    def covariance(self, n, dim):
        return _block_diagonal(_gram_inverse(self._blocks3(dim)))

    def variance(self, n, dim):
        return jnp.diagonal(_gram_inverse(self._blocks3(dim)), axis1=-2, axis2=-1)

    def observation_blocks(self, n, dim):
        return self._blocks3(dim), 1

    def dense_matrix(self, n, dim):
        return _block_diagonal(self._blocks3(dim))

    def check_shapes(self, n, dim):
        shape = jnp.shape(self.blocks)
        allowed = [(n, dim, dim)] + ([(n,)] if dim == 1 else [])
        if shape not in allowed:
            want = " or ".join(str(s) for s in allowed)
            raise ValueError(
                f"noise.PerPoint: `blocks` must have shape {want} for {n} points of "
                f"dimension D={dim}, got shape {shape}"
            )


@pytree_dataclass
class Dense(Noise):
    """A general precision square root $S$ of shape ``(m, n·D)``.

    ``S`` acts on the point-major flattened data ``(y_11 … y_1D, y_21 …)``;
    ``m`` may be smaller or larger than ``n·D`` (e.g. one row per camera pixel
    coordinate).  The ``(m × m)`` matrix $U$ is factored.
    """

    matrix: Array

    @classmethod
    def from_covariance(cls, covariance: Array) -> Dense:
        r"""Noise of covariance $C$ (``(nD, nD)``, point-major, positive definite):
        $S = L^{-1}$ with $C = L L^\top$, so $S^\top S = C^{-1}$."""
        covariance = _square_matrices("covariance", covariance, batched=False)
        return cls(_inverse_cholesky("covariance", covariance))

    @classmethod
    def from_precision(cls, precision: Array) -> Dense:
        r"""Noise of precision $\Lambda$ (``(nD, nD)``, point-major, positive semi-definite):
        $S = \Lambda^{1/2}$ (symmetric square root), so $S^\top S = \Lambda$."""
        precision = _square_matrices("precision", precision, batched=False)
        return cls(_symmetric_sqrt("precision", precision))

    def core_shape(self, n, dim):
        return self.matrix.shape[0], 1

    def _split(self, dim):
        m, width = self.matrix.shape
        return self.matrix.reshape(m, width // dim, dim)

    def whiten(self, r):
        return (self.matrix @ r.reshape(-1))[:, None]

    def adjoint_whiten(self, v, dim):
        return (self.matrix.T @ v[:, 0]).reshape(-1, dim)

    def core(self, kernel_matrix, dim):
        s3 = self._split(dim)
        return jnp.einsum("lia,ij,pja->lp", s3, kernel_matrix, s3)

    def core_adjoint(self, v, dim):
        s3 = self._split(dim)
        return jnp.einsum("lia,lp,pja->ij", s3, v, s3)

    def core_adjoint_diagonal(self, d, dim):
        s3 = self._split(dim)
        return jnp.einsum("lia,l,lja->ij", s3, d, s3)

    def dense_matrix(self, n, dim):
        return self.matrix

    def log_pseudo_determinant(self, n, dim):
        return log_pseudo_determinants(self.matrix)

    def check_shapes(self, n, dim):
        shape = jnp.shape(self.matrix)
        if len(shape) != 2 or shape[1] != n * dim or shape[0] < 1:
            raise ValueError(
                f"noise.Dense: `matrix` must have shape (m, n*D) = (m, {n * dim}) for {n} "
                f"points of dimension D={dim}, got shape {shape}"
            )


def _rank_mask(singular_values, shape):
    """The singular values that count: above ``max σ · max(rows, cols) · eps``, numpy's
    ``matrix_rank`` tolerance, relative to each matrix's own largest."""
    eps = jnp.finfo(singular_values.dtype).eps
    tolerance = jnp.max(singular_values, axis=-1, keepdims=True) * max(shape[-2:]) * eps
    return singular_values > tolerance


@jax.custom_vjp
def log_pseudo_determinants(matrices: Array) -> tuple[Array, Array]:
    """``(Σ log σ_j, #{σ_j})`` over the nonzero singular values of each of the ``(..., a, b)``
    matrices; a zero matrix gives ``(0, 0)``.

    The rule: ``∂ log pdet B / ∂B = U_r Σ_r⁻¹ V_rᵀ = (B⁺)ᵀ`` at fixed rank — finite where
    autodiff through the SVD is not (repeated singular values, as in ``(I − rrᵀ)/σ``).
    """
    return _log_pdet_forward(matrices)[0]


#: Matrices up to this width (the per-point blocks) take the unrolled Jacobi sweeps of
#: ``gpgrad_jax._smallmatrix``; wider ones (``Dense`` noise) the round-robin sweeps of
#: ``gpgrad_jax._linalg``. Neither calls LAPACK (see ``gpgrad_jax._linalg``).
_UNROLLED_MAX_WIDTH = 8


def _log_pdet_forward(matrices):
    small = matrices.shape[-1] <= _UNROLLED_MAX_WIDTH
    # A V = W = U Σ: the rule's U Σ⁻¹ Vᵀ is W Σ⁻² Vᵀ.
    w, v = (_smallmatrix if small else _linalg).orthogonalize_columns(matrices)
    s = jnp.sqrt(jnp.sum(w**2, axis=-2))
    keep = _rank_mask(s, matrices.shape)
    left, scale, right = w, jnp.where(keep, 1.0 / jnp.where(keep, s * s, 1.0), 0.0), jnp.swapaxes(v, -1, -2)
    log_pdet = jnp.sum(jnp.where(keep, jnp.log(jnp.where(keep, s, 1.0)), 0.0), axis=-1)
    rank = jnp.sum(keep, axis=-1).astype(matrices.dtype)
    return (log_pdet, rank), (left, scale, right)


def _log_pdet_backward(residuals, cotangents):
    u, inverse_s, vh = residuals
    g, _ = cotangents  # the rank is piecewise constant: its derivative is zero
    return (jnp.einsum("...ij,...j,...jk->...ik", u, g[..., None] * inverse_s, vh),)


log_pseudo_determinants.defvjp(_log_pdet_forward, _log_pdet_backward)


# ------------------------------------------------------------ constructors


def _square_matrices(name, value, batched):
    """``value`` as ``(n, D, D)`` (``(n,)`` → ``(n, 1, 1)``) or ``(N, N)`` real matrices, symmetric
    when concrete."""
    matrices = jnp.asarray(value)
    if not jnp.issubdtype(matrices.dtype, jnp.floating):
        matrices = matrices.astype(jnp.result_type(float))
    if batched and matrices.ndim == 1:
        matrices = matrices[:, None, None]
    want = "(n, D, D) or (n,)" if batched else "(N, N)"
    if matrices.ndim != (3 if batched else 2) or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"`{name}` must have shape {want}, got shape {matrices.shape}")
    if not isinstance(matrices, jax.core.Tracer):
        asymmetry = jnp.max(jnp.abs(matrices - jnp.swapaxes(matrices, -1, -2)), initial=0.0)
        if not bool(asymmetry <= 1e3 * jnp.finfo(matrices.dtype).eps * jnp.max(jnp.abs(matrices), initial=0.0)):
            raise ValueError(f"`{name}` must be symmetric, got a difference from its transpose of {float(asymmetry):.3e}")
    return matrices


def _inverse_cholesky(name, covariance):
    inverse = _linalg.cholesky(covariance).inverse
    if not isinstance(inverse, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(inverse))):
        raise ValueError(
            f"`{name}` must be positive definite (a zero variance would be an infinite precision); "
            "for directions without information use from_precision with a zero eigenvalue"
        )
    return inverse


def _symmetric_sqrt(name, precision):
    if not isinstance(precision, jax.core.Tracer):
        eigenvalues, _ = _linalg.symmetric_eigen(precision)
        floor = -1e3 * jnp.finfo(precision.dtype).eps * jnp.max(jnp.abs(eigenvalues), initial=0.0)
        if not bool(jnp.all(eigenvalues >= floor)):
            raise ValueError(
                f"`{name}` must be positive semi-definite, got an eigenvalue of {float(jnp.min(eigenvalues)):.3e}"
            )
    # Eigenvalues at rounding level are zeros (directions without information): their square
    # roots, ~sqrt(eps), would otherwise pass for information, and count in the rank.
    return _linalg.psd_sqrt(precision, max(precision.shape[-2:]) * float(jnp.finfo(precision.dtype).eps))


def _block_diagonal(blocks):
    """``blockdiag(B_1 … B_n)`` of ``(n, D, D)`` blocks, ``(nD, nD)``."""
    n, dim, _ = blocks.shape
    return jnp.einsum("ij,iab->iajb", jnp.eye(n, dtype=blocks.dtype), blocks).reshape(n * dim, n * dim)


def _gram_inverse(matrices):
    """``(BᵀB)⁻¹`` for each ``(..., m, k)`` matrix ``B`` of full column rank, by Cholesky."""
    inverse = _linalg.cholesky(jnp.swapaxes(matrices, -1, -2) @ matrices).inverse
    return jnp.swapaxes(inverse, -1, -2) @ inverse
