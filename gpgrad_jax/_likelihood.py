r"""The log marginal likelihood with its closed-form gradient as a ``custom_vjp``.

With residuals ``r = y − μ`` (shape ``(n, D)``, flattened point-major),
``w = S r`` and ``U = I + S (K ⊗ I_D) Sᵀ`` (``m × m``),

    L = −½ wᵀU⁻¹w − ½ log|U| − (m/2) log 2π.

Write ``M = Sᵀ U⁻¹ S``, ``z = M r`` (as ``Z``, shape ``(n, D)``) and
``M̃[i, j] = Σ_a M[(i,a),(j,a)]`` (the trace of each ``D × D`` block).  With
``Δ[i, j] = ∂k(x_i, x_j)/∂x_i`` the gradient in the index set is

    ∇_x L = Σ_a Z ⊙ (Δ Z) − rowsum(M̃ ⊙ Δ)          (per index coordinate),

the seed's data term ``z ⊙ (Δz)`` minus its normalisation term
``rowsum(M ⊙ Δ)``, lifted to ``D``-dimensional data without forming ``Δ ⊗ I_D``.
The other cotangents follow from the matrix cotangents
``K̄ = ½ (Z Zᵀ − M̃)`` (kernel parameters), ``Ū = ½ (ααᵀ − U⁻¹)`` with
``α = U⁻¹ w`` (noise parameters) and ``r̄ = −z`` (data and mean).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._linalg import cho_inverse, cho_inverse_lower, symmetrize_lower
from gpgrad_jax._noise import Noise
from gpgrad_jax._validation import check_factorization, check_finite_result, check_problem

Array = Any


# ------------------------------------------------------------ shared pieces


def _factor(kernel: Kernel, noise: Noise, x: Array, r: Array):
    """Value of ``L`` with the Cholesky factor of ``U``'s core and ``α = U⁻¹w``."""
    n, dim = r.shape
    p, q = noise.core_shape(n, dim)
    kernel_matrix = kernel.matrix(x, x)
    u_core = noise.core(kernel_matrix, dim) + jnp.eye(p, dtype=r.dtype)
    chol = jnp.linalg.cholesky(u_core)
    check_factorization(chol, u_core)
    w = noise.whiten(r)
    alpha = cho_solve((chol, True), w)
    quadratic = jnp.sum(w * alpha)
    value = (
        -0.5 * quadratic
        - q * jnp.sum(jnp.log(jnp.diagonal(chol)))
        - 0.5 * p * q * math.log(2.0 * math.pi)
    )
    check_finite_result(value, quadratic)
    return value, chol, alpha


def _index_terms(kernel: Kernel, noise: Noise, x: Array, chol: Array, alpha: Array, dim: int):
    """The seed's gradient in ``x``, and the pieces the other cotangents reuse.

    Returns ``(grad_x, u_inv, lower_only, z, m_trace)`` — ``u_inv`` is ``U⁻¹``'s core,
    only its lower triangle when ``lower_only``; O(n²·d) after ``U⁻¹`` is formed.
    """
    q = alpha.shape[1]
    z = noise.unwhiten(alpha, dim)  # Sᵀ U⁻¹ S r, shape (n, D)
    lower_only = chol.shape[0] > x.shape[0]
    if lower_only:
        # U is larger than K: form one triangle of U⁻¹ and complete the (n × n) block trace.
        u_inv = cho_inverse_lower(chol)
        m_trace = noise.core_adjoint_from_lower(q * u_inv, dim)  # blocktrace(Sᵀ U⁻¹ S), (n, n)
    else:
        u_inv = cho_inverse(chol)
        m_trace = noise.core_adjoint(q * u_inv, dim)
    delta = kernel.grad_first_matrix(x, x)  # (n, n) or (n, n, d)
    data_term = jnp.einsum("ia,ij...,ja->i...", z, delta, z)
    normalisation_term = jnp.einsum("ij,ij...->i...", m_trace, delta)
    return data_term - normalisation_term, u_inv, lower_only, z, m_trace


# --------------------------------------------------------- custom_vjp core


@jax.custom_vjp
def _log_marginal_likelihood(kernel, noise, x, r):
    return _factor(kernel, noise, x, r)[0]


def _lml_fwd(kernel, noise, x, r):
    value, chol, alpha = _factor(kernel, noise, x, r)
    return value, (kernel, noise, x, r, chol, alpha)


def _lml_bwd(residuals, g):
    kernel, noise, x, r, chol, alpha = residuals
    dim = r.shape[1]
    q = alpha.shape[1]
    grad_x, u_inv, lower_only, z, m_trace = _index_terms(kernel, noise, x, chol, alpha, dim)
    if lower_only:
        u_inv = symmetrize_lower(u_inv)  # only if noise cotangents are used (else XLA drops it)

    # Kernel parameters: contract K̄ = ½(ZZᵀ − M̃) with ∂K/∂θ (x held fixed).
    kernel_matrix, kernel_vjp = jax.vjp(lambda k: k.matrix(x, x), kernel)
    (kernel_bar,) = kernel_vjp(0.5 * g * (z @ z.T - m_trace))

    # Noise parameters: through w = S r (w̄ = −α) and U_c = I + core(K) (Ū).
    u_bar = 0.5 * g * (alpha @ alpha.T - q * u_inv)
    _, noise_vjp = jax.vjp(lambda s: (s.whiten(r), s.core(kernel_matrix, dim)), noise)
    (noise_bar,) = noise_vjp((-g * alpha, u_bar))

    return kernel_bar, noise_bar, g * grad_x, -g * z


_log_marginal_likelihood.defvjp(_lml_fwd, _lml_bwd)


# ------------------------------------------------------------ public API


def _prepare(kernel, x, y, noise, mean):
    x, y, mean = check_problem(kernel, x, y, noise, mean)
    dtype = jnp.result_type(x, y, mean)
    cast = lambda leaf: jnp.asarray(leaf, dtype)  # noqa: E731
    kernel = jax.tree_util.tree_map(cast, kernel)
    noise = jax.tree_util.tree_map(cast, noise)
    return kernel, noise, x.astype(dtype), (y - mean).astype(dtype)


def log_marginal_likelihood(
    kernel: Kernel, x: Array, y: Array, noise: Noise, mean: Array | None = None
) -> jax.Array:
    r"""GP log marginal likelihood of ``y`` at index set ``x``, with closed-form gradients.

    ``L = −½ wᵀU⁻¹w − ½ log|U| − (m/2) log 2π`` with ``w = S (y − μ)`` and
    ``U = I + S (K(x) ⊗ I_D) Sᵀ``, where ``Λ = SᵀS`` is the noise precision.
    When ``S`` is square and invertible this is
    ``log N(y | μ, K ⊗ I_D + Λ⁻¹) − log|det S|``.

    ``jax.grad`` with respect to any argument (``x``, the kernel's and the
    noise's parameters, ``y``, ``mean``) uses the hand-derived rule
    ``∇_x L = z ⊙ (Δz) − rowsum(M ⊙ Δ)`` (see ``shared/MATH.md``), costing
    O(m³) for ``U⁻¹`` and O(n²) more.  Works under ``jit``, ``vmap`` and
    reverse-over-reverse (``jax.jacrev(jax.grad(f))``); forward mode (hence
    ``jax.hessian``) is not available through a ``custom_vjp``.

    Args:
        kernel: a :class:`gpgrad_jax.kernels.Kernel`.
        x: index set, shape ``(n,)`` (scalar index per point) or ``(n, d)``.
        y: data, shape ``(n,)`` or ``(n, D)`` (e.g. ``D = 3`` for a 3-D curve).
        noise: :class:`~gpgrad_jax.noise.Isotropic`,
            :class:`~gpgrad_jax.noise.PerPoint` or :class:`~gpgrad_jax.noise.Dense`.
        mean: prior mean ``μ``, shape of ``y``; ``None`` means zero.

    Returns:
        The scalar ``L``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> k = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)
        >>> x = jnp.linspace(0.1, 2.0, 5)
        >>> y = jnp.stack([jnp.sin(x), jnp.cos(x), x], axis=1)
        >>> grad_x = jax.grad(gg.log_marginal_likelihood, argnums=1)(k, x, y, noise.Isotropic(0.1))
        >>> grad_x.shape
        (5,)
    """
    kernel, noise, x, r = _prepare(kernel, x, y, noise, mean)
    return _log_marginal_likelihood(kernel, noise, x, r)


def index_gradient(
    kernel: Kernel, x: Array, y: Array, noise: Noise, mean: Array | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""The value ``L`` and ``∇_x L`` from the seed's formulas, evaluated explicitly.

    ``∇_x L = z ⊙ (Δz) − rowsum(M ⊙ Δ)`` with ``M = SᵀU⁻¹S``, ``z = M (y − μ)``
    and ``Δ[i, j] = ∂k(x_i, x_j)/∂x_i``; for ``D``-dimensional data each
    point's ``D`` entries are summed.  Same arguments as
    :func:`log_marginal_likelihood`; the gradient has the shape of ``x``.
    This is the rule ``jax.grad`` of :func:`log_marginal_likelihood` uses, exposed
    for callers who want the gradient without a ``grad`` transform.

    Example:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 1.0, 4)
        >>> value, grad_x = gg.index_gradient(kernels.ExpSquared(1.0, 0.5), x, jnp.sin(x), noise.Isotropic(0.2))
        >>> grad_x.shape
        (4,)
    """
    kernel, noise, x, r = _prepare(kernel, x, y, noise, mean)
    value, chol, alpha = _factor(kernel, noise, x, r)
    grad_x = _index_terms(kernel, noise, x, chol, alpha, r.shape[1])[0]
    return value, grad_x
