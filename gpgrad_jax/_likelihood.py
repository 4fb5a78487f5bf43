r"""The public likelihood functions: validate, choose a solver, call its closed-form rule."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise
from gpgrad_jax._solvers import call_solver, resolve
from gpgrad_jax._validation import check_finite_output, check_problem

Array = Any


def prepare(kernel, x, y, noise, mean):
    """Validated ``(kernel, noise, x, r)`` in one floating dtype, ``r = y − μ`` of shape ``(n, D)``."""
    x, y, mean = check_problem(kernel, x, y, noise, mean)
    dtype = jnp.result_type(x, y, mean)
    cast = lambda leaf: jnp.asarray(leaf, dtype)  # noqa: E731
    kernel = jax.tree_util.tree_map(cast, kernel)
    noise = jax.tree_util.tree_map(cast, noise)
    return kernel, noise, x.astype(dtype), (y - mean).astype(dtype)


def log_marginal_likelihood(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str = "auto",
) -> jax.Array:
    r"""GP log marginal likelihood of ``y`` at index set ``x`` in precision form, with closed-form gradients.

    ``L = −½ wᵀU⁻¹w − ½ log|U| − (m/2) log 2π`` with ``w = S (y − μ)`` and
    ``U = I + S (K(x) ⊗ I_D) Sᵀ``, where ``Λ = SᵀS`` is the noise precision.
    ``L`` is the density of the whitened data ``w``: when ``S`` is square and invertible it is
    ``log N(y | μ, K ⊗ I_D + Λ⁻¹) − log|det S|``.

    **Which to use.** The missing ``log|det S|`` depends on the noise only: for ``x``, the
    kernel and the mean, ``L`` and :func:`log_probability` have the same gradient. To learn
    the noise, or to compare models with different noise, use :func:`log_probability` —
    maximising ``L`` over the noise drives its scale up without bound.

    ``jax.grad`` with respect to any argument (``x``, the kernel's and the noise's
    parameters, ``y``, ``mean``) uses the solver's hand-derived rule,
    ``∇_x L = z ⊙ (Δz) − rowsum(M ⊙ Δ)`` with ``M = SᵀU⁻¹S``, ``z = M (y − μ)`` and
    ``Δ[i, j] = ∂k(x_i, x_j)/∂x_i`` (see ``docs/math.md``).  Works under ``jit``, ``vmap``,
    ``jax.jacrev(jax.grad(f))`` and ``jax.hessian``; pure forward mode (``jax.jvp``) is not
    available through a ``custom_vjp``.

    Args:
        kernel: a :class:`gpgrad_jax.kernels.Kernel`.
        x: index set, shape ``(n,)`` (scalar index per point) or ``(n, d)``; any order.
        y: data, shape ``(n,)`` or ``(n, D)`` (e.g. ``D = 3`` for a 3-D curve).
        noise: :class:`~gpgrad_jax.noise.Isotropic`,
            :class:`~gpgrad_jax.noise.PerPoint` or :class:`~gpgrad_jax.noise.Dense`.
        mean: prior mean ``μ``, shape of ``y``; ``None`` means zero.
        solver: ``"dense"`` (any problem; O(m³) with ``m = nD``), ``"markov"`` (Kalman filter
            and smoother, O(n): scalar indices, a kernel with a state-space form —
            ``CubicSpline``, ``Linear``, ``Constant``, ``Matern32``, ``Matern52``, their sums
            and ``c * k`` — and ``Isotropic`` or ``PerPoint`` noise), ``"markov-parallel"``
            (the same by associative scans, O(log n) depth, for GPUs) or ``"auto"``: a Markov
            solver where it applies and ``n ≥ 32``, the parallel one on GPU, else dense.

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
        >>> dense = gg.log_marginal_likelihood(k, x, y, noise.Isotropic(0.1), solver="dense")
        >>> markov = gg.log_marginal_likelihood(k, x, y, noise.Isotropic(0.1), solver="markov")
        >>> bool(jnp.allclose(dense, markov, rtol=1e-4))
        True
    """
    return _precision_form(solver, *prepare(kernel, x, y, noise, mean))


def _precision_form(solver, kernel, noise, x, r):
    """``L`` on prepared arguments, by the chosen solver's closed-form rule."""
    value = call_solver(resolve(solver, kernel, noise, x).log_marginal_likelihood, kernel, noise, x, r)
    check_finite_output(value)
    return value


def log_probability(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str = "auto",
) -> jax.Array:
    r"""The Gaussian log density of the observed data: safe for learning the noise.

    ``log p = L + log pdet S + ((m − r)/2) log 2π``, where ``L`` is
    :func:`log_marginal_likelihood`, ``pdet S`` the product of ``S``'s nonzero singular
    values and ``r`` their number (``S`` has ``m`` rows).

    * ``S`` square and invertible: ``log N(y | μ, K ⊗ I_D + Λ⁻¹)``, the usual GP log
      likelihood (``pdet = |det S|``, ``r = m``).
    * ``S`` with more rows than columns and full column rank (``noise.Dense``, one row per
      pixel coordinate): the same density, ``Λ = SᵀS`` being invertible.
    * ``S`` rank deficient (a point seen along one camera ray, a zero block for an unseen
      point): the density of what is observed — the coordinates ``c = V_rᵀ(y − μ)`` of the data
      in ``S``'s row space (``S = U_r Σ_r V_rᵀ``), ``c ~ N(V_rᵀ(f − μ), V_rᵀ (K ⊗ I_D) V_r +
      Σ_r⁻²)``. For ``PerPoint`` noise the rank is counted per block (singular values below
      ``max σ · D · eps`` of their block count as zero), so a block keeps its rank while its
      scale is learned.

    Gradients: the solver's closed-form rule for ``L``, plus ``∂ log pdet S/∂S = (S⁺)ᵀ`` (at
    fixed rank) for the noise. Use this to learn the noise; for ``x``, the kernel and the mean
    it has the same gradient as ``L``.

    Same arguments as :func:`log_marginal_likelihood`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 8)
        >>> k = kernels.Matern32(1.0, 0.5)
        >>> log_p = gg.log_probability(k, x, jnp.sin(x), noise.Isotropic(0.1))
        >>> cov = k.matrix(x, x) + 0.1**2 * jnp.eye(8)
        >>> bool(jnp.allclose(log_p, jax.scipy.stats.multivariate_normal.logpdf(jnp.sin(x), jnp.zeros(8), cov)))
        True
    """
    kernel, noise, x, r = prepare(kernel, x, y, noise, mean)
    return _precision_form(solver, kernel, noise, x, r) + noise_log_density_correction(noise, *r.shape)


def noise_log_density_correction(noise: Noise, n: int, dim: int) -> jax.Array:
    """``log pdet S + ((m − r)/2) log 2π``: :func:`log_probability` minus ``L``."""
    log_pdet, rank = noise.log_pseudo_determinant(n, dim)
    p, q = noise.core_shape(n, dim)
    return log_pdet + 0.5 * (p * q - rank) * math.log(2.0 * math.pi)


def index_gradient(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""The value ``L`` and ``∇_x L`` from the closed form, evaluated explicitly.

    ``∇_x L = z ⊙ (Δz) − rowsum(M ⊙ Δ)`` with ``M = SᵀU⁻¹S``, ``z = M (y − μ)``
    and ``Δ[i, j] = ∂k(x_i, x_j)/∂x_i``; for ``D``-dimensional data each point's ``D``
    entries are summed.  The Markov solvers evaluate the same quantity from the smoothed
    marginals, ``∂L/∂x_i = z_i · E[f'(x_i)|y] − tr(Λ_i Cov(f'(x_i), f(x_i)|y))``.
    Same arguments as :func:`log_marginal_likelihood`; the gradient has the shape of ``x``.
    This is the rule ``jax.grad`` of :func:`log_marginal_likelihood` uses, exposed for
    callers who want the gradient without a ``grad`` transform.

    Example:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 1.0, 4)
        >>> value, grad_x = gg.index_gradient(kernels.ExpSquared(1.0, 0.5), x, jnp.sin(x), noise.Isotropic(0.2))
        >>> grad_x.shape
        (4,)
    """
    kernel, noise, x, r = prepare(kernel, x, y, noise, mean)
    value, grad_x = call_solver(resolve(solver, kernel, noise, x).index_gradient, kernel, noise, x, r)
    check_finite_output(value)
    check_finite_output(grad_x)
    return value, grad_x
