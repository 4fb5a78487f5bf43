r"""The dense solver: one Cholesky factorisation of ``U``, the closed-form gradient in O(n²) more.

With residuals ``r = y − μ`` (shape ``(n, D)``, flattened point-major),
``w = S r`` and ``U = I + S (K ⊗ I_D) Sᵀ`` (``m × m``),

    L = −½ wᵀU⁻¹w − ½ log|U| − (m/2) log 2π.

Write ``M = Sᵀ U⁻¹ S``, ``z = M r`` (as ``Z``, shape ``(n, D)``) and
``M̃[i, j] = Σ_a M[(i,a),(j,a)]`` (the trace of each ``D × D`` block).  With
``Δ[i, j] = ∂k(x_i, x_j)/∂x_i`` the gradient in the index set is

    ∇_x L = Σ_a Z ⊙ (Δ Z) − rowsum(M̃ ⊙ Δ)          (per index coordinate),

the data term ``z ⊙ (Δz)`` minus the normalisation term ``rowsum(M ⊙ Δ)``, lifted to
``D``-dimensional data without forming ``Δ ⊗ I_D``.  The other cotangents follow from the
matrix cotangents ``K̄ = ½ (Z Zᵀ − M̃)`` (kernel parameters), ``Ū = ½ (ααᵀ − U⁻¹)`` with
``α = U⁻¹ w`` (noise parameters) and ``r̄ = −z`` (data and mean).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax._diagnostics import concrete, report_above, warn_once
from gpgrad_jax._errors import FactorizationError, NumericalError
from gpgrad_jax._linalg import cho_inverse, cho_inverse_lower, cholesky, symmetrize_lower
from gpgrad_jax._rules import unwrap_primals
from gpgrad_jax._solver.base import Solver

Array = Any


class Factor(NamedTuple):
    """``L`` with the pivots (diagonal) of the lower Cholesky factor of ``U``'s core, its inverse
    ``T = chol(U_c)⁻¹`` — all the rule and the predictions need (``U_c⁻¹ = TᵀT``); ``None`` for a
    value alone — and ``α = U⁻¹w`` (``(p, q)``)."""

    value: Array
    pivots: Array
    inverse: Array | None
    alpha: Array


class IndexTerms(NamedTuple):
    """The gradient in ``x`` and what the other cotangents reuse."""

    grad_x: Array
    u_inv: Array  # U⁻¹'s core; only its lower triangle when ``lower_only``
    lower_only: bool
    z: Array  # Sᵀ U⁻¹ S r, (n, D)
    m_trace: Array  # blocktrace(Sᵀ U⁻¹ S), (n, n)


def _u_core(kernel, noise, x, dim):
    return noise.core(kernel.matrix(x, x), dim) + jnp.eye(noise.core_shape(x.shape[0], dim)[0], dtype=x.dtype)


# Jitted: eager callers compile once per shape instead of dispatching every operation. A value
# alone does not return T: on one matrix the factorisation is then LAPACK's potrf and potrs alone.
@functools.partial(jax.jit, static_argnums=4)
def _factor(kernel, noise, x, r, want_inverse):
    n, dim = r.shape
    p, q = noise.core_shape(n, dim)
    u_core = _u_core(kernel, noise, x, dim)
    chol = cholesky(u_core)
    w = noise.whiten(r)
    alpha = chol.solve(w)
    quadratic = jnp.sum(w * alpha)
    value = -0.5 * quadratic - 0.5 * q * chol.log_det() - 0.5 * p * q * math.log(2.0 * math.pi)
    pivots = jnp.diagonal(chol.low)
    condition = _condition_estimate(jax.lax.stop_gradient(u_core), chol)
    return Factor(value, pivots, chol.inverse if want_inverse else None, alpha), quadratic, condition


#: Power iterations of the condition estimate: the Rayleigh quotients of ``U`` and ``U⁻¹`` after
#: this many steps were within 10 % of the extreme eigenvalues on the calibration problems.
_POWER_STEPS = 8


def _condition_estimate(u, chol):
    """``cond(U) ≈ λ_max(U) · λ_max(U⁻¹)`` by power iteration (``O(m²)`` a step), from a fixed
    start with no sign pattern; what the rounding of the factorisation and of ``U⁻¹`` scales with."""
    m = u.shape[-1]
    start = jnp.cos(1.6180339887 * jnp.arange(1, m + 1, dtype=u.dtype)) + 0.5
    largest, inverse_largest = start, start
    for _ in range(_POWER_STEPS):
        largest = u @ largest
        largest = largest / jnp.linalg.norm(largest)
        inverse_largest = chol.solve(inverse_largest)
        inverse_largest = inverse_largest / jnp.linalg.norm(inverse_largest)
    top = largest @ (u @ largest)
    bottom = inverse_largest @ chol.solve(inverse_largest)
    return jnp.abs(top * bottom)


def factor(kernel, noise, x, r, want_inverse: bool = True) -> Factor:
    """``L``, the Cholesky factor of ``U``'s core and ``α``; concrete results are checked, and the
    precision warned of (eagerly, or by a host callback under ``jit``)."""
    fac, quadratic, condition = _factor(kernel, noise, x, r, want_inverse)
    if not isinstance(fac.pivots, jax.core.Tracer):
        check_factorization(fac.pivots, lambda: _u_core(kernel, noise, x, r.shape[1]))
        check_finite_result(fac.value, quadratic)
    check_precision(condition, r.dtype)
    return fac


# ------------------------------------------------------------------------------ diagnostics


def check_factorization(pivots: Any, u_core: Callable[[], Any]) -> None:
    """Raise [``FactorizationError``][gpgrad_jax.FactorizationError] with advice if a *concrete*
    factor of ``U`` is unusable (``pivots``: the diagonal of its lower Cholesky factor): not finite
    — the factorisation broke down, and so would the result (under ``jit`` the same input gives a
    NaN, or this message through ``checkify``). Whether a usable factor is accurate enough is
    ``check_precision``'s question."""
    if isinstance(pivots, jax.core.Tracer):
        return
    # Only the pivots come to the host: a breakdown anywhere in the factorisation reaches
    # every later pivot, and copying the whole factor would cost O(m²) per eager call.
    dtype = pivots.dtype
    pivots = np.abs(np.asarray(pivots)).astype(np.float64)
    if bool(np.all(np.isfinite(pivots))) and pivots.min() > 0:
        return
    eps = float(np.finfo(dtype).eps)
    u = np.asarray(u_core(), np.float64)  # computed only now, for the message
    if not np.all(np.isfinite(u)):
        cond = "infinite (U has non-finite entries: the kernel overflowed)"
    else:
        eig = np.linalg.eigvalsh(u)
        cond = f"about {eig[-1] / max(eig[0], 1.0):.1e}"
    raise FactorizationError(
        f"U = I + S (K ⊗ I_D) Sᵀ ({u.shape[-1]}×{u.shape[-1]}, {dtype}) could not be Cholesky-factored: its "
        f"condition number is {cond}, beyond what {dtype} resolves (1/eps = {1 / eps:.1e}). "
        "Rescale the indices or the kernel variances (for the CubicSpline kernel cond(U) grows "
        "like max(x)³·variance/noise²), or use float64: jax.config.update('jax_enable_x64', True)."
    )


def check_finite_result(value: Any, quadratic: Any) -> None:
    """Raise [``NumericalError``][gpgrad_jax.NumericalError] if a *concrete* likelihood value overflowed."""
    value = concrete(value)
    if value is None or np.all(np.isfinite(value)):
        return
    raise NumericalError(
        f"the log marginal likelihood overflowed {value.dtype} (wᵀU⁻¹w = "
        f"{float(np.asarray(quadratic, np.float64)):.3e}, w = S(y − μ)): rescale `y` and `mean` "
        "or the noise, or use float64: jax.config.update('jax_enable_x64', True)."
    )


#: The warning fires when ``eps · cond(U)`` exceeds this; ``cond(U)`` from a few power iterations
#: on ``U`` and on ``U⁻¹``. Over 120 random float32 problems (curve, Matérn 1/2 and 3/2,
#: squared-exponential kernels; 20–200 points, D = 1 or 3, isotropic and rank-2 noise; spans
#: 1–300, noise 0.003–0.3; ``benchmarks/float32.py --only dense``) the gradient's relative error was
#: at most 0.23 times ``eps · cond(U)``; all 33 that missed the targets (gradient 1e-3, worst entry
#: 1e-2, value 1e-4) were warned of (the smallest ``eps · cond(U)`` of a miss: 1.9e-2), and 18 that
#: did not; 12 the factorisation could not take at all (NaN under ``jit``, ``FactorizationError``
#: eagerly).
PRECISION_WARNING_LEVEL = 3e-3


def check_precision(condition: Any, dtype: Any) -> None:
    """One [``ConditioningWarning``][gpgrad_jax.ConditioningWarning] per precision when
    ``eps · cond(U)`` exceeds ``PRECISION_WARNING_LEVEL`` (eagerly, or at run time under a trace)."""
    eps = float(jnp.finfo(dtype).eps)
    report_above(eps * condition, PRECISION_WARNING_LEVEL, lambda values: _warn(values, str(dtype)))


def _warn(values: np.ndarray, dtype: str) -> None:
    estimate = float(np.max(values))
    wider = "" if dtype == "float64" else "float64, "
    warn_once(
        f"dense {dtype}",
        f"{dtype} resolves this dense problem to about {estimate:.0e} relative: U = I + S (K ⊗ I_D) Sᵀ "
        f"has a condition number of about {estimate / float(np.finfo(dtype).eps):.1e}: eps · cond(U) = "
        f"{estimate:.0e}, and on random problems the gradient's relative error was up to a quarter of that "
        f"(the value's less). Use {wider}a state-space solver where the kernel has a state-space form "
        "(solver='markov'), or rescale the indices and the kernel variances (for the CubicSpline kernel "
        "cond(U) grows like max(x)³·variance/noise²). (Shown once per solver and precision.)",
        stacklevel=5,
    )


def index_terms(kernel, noise, x, fac: Factor, dim: int) -> IndexTerms:
    """``∇ₓL = z ⊙ (Δz) − rowsum(M̃ ⊙ Δ)``; O(n²·d) after ``U⁻¹`` is formed."""
    q = fac.alpha.shape[1]
    z = noise.adjoint_whiten(fac.alpha, dim)  # Sᵀ U⁻¹ S r, shape (n, D)
    lower_only = fac.inverse.shape[0] > x.shape[0]
    if lower_only:
        # U is larger than K: form one triangle of U⁻¹ and complete the (n × n) block trace.
        u_inv = cho_inverse_lower(fac.inverse)
        m_trace = noise.core_adjoint_from_lower(q * u_inv, dim)
    else:
        u_inv = cho_inverse(fac.inverse)
        m_trace = noise.core_adjoint(q * u_inv, dim)
    delta = kernel.grad_first_matrix(x, x)  # (n, n) or (n, n, d)
    data_term = jnp.einsum("ia,ij...,ja->i...", z, delta, z)
    normalisation_term = jnp.einsum("ij,ij...->i...", m_trace, delta)
    return IndexTerms(data_term - normalisation_term, u_inv, lower_only, z, m_trace)


@jax.custom_vjp
def _log_marginal_likelihood(kernel, noise, x, r):
    return factor(kernel, noise, x, r, want_inverse=False).value


def _lml_fwd(kernel, noise, x, r):
    # symbolic_zeros: the kernel's and the noise's cotangents are computed only when asked for
    # (eager calls get no dead-code elimination).
    (kernel, kernel_wanted), (noise, noise_wanted), (x, _), (r, _) = map(unwrap_primals, (kernel, noise, x, r))
    fac = factor(kernel, noise, x, r)
    return fac.value, (kernel_wanted, noise_wanted, kernel, noise, x, r, fac)


def _lml_bwd(residuals, g):
    kernel_wanted, noise_wanted, kernel, noise, x, r, fac = residuals
    return _backward(kernel_wanted, noise_wanted, kernel, noise, x, r, fac, g)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backward(kernel_wanted, noise_wanted, kernel, noise, x, r, fac, g):
    dim = r.shape[1]
    q = fac.alpha.shape[1]
    terms = index_terms(kernel, noise, x, fac, dim)

    kernel_bar = noise_bar = None
    if kernel_wanted or noise_wanted:
        kernel_matrix, kernel_vjp = jax.vjp(lambda k: k.matrix(x, x), kernel)
    if kernel_wanted:
        # Kernel parameters: contract K̄ = ½(ZZᵀ − M̃) with ∂K/∂θ (x held fixed).
        (kernel_bar,) = kernel_vjp(0.5 * g * (terms.z @ terms.z.T - terms.m_trace))
    if noise_wanted:
        # Noise parameters: through w = S r (w̄ = −α) and U_c = I + core(K) (Ū).
        u_inv = symmetrize_lower(terms.u_inv) if terms.lower_only else terms.u_inv
        u_bar = 0.5 * g * (fac.alpha @ fac.alpha.T - q * u_inv)
        _, noise_vjp = jax.vjp(lambda s: (s.whiten(r), s.core(kernel_matrix, dim)), noise)
        (noise_bar,) = noise_vjp((-g * fac.alpha, u_bar))

    return kernel_bar, noise_bar, g * terms.grad_x, -g * terms.z


_log_marginal_likelihood.defvjp(_lml_fwd, _lml_bwd, symbolic_zeros=True)


@dataclasses.dataclass(frozen=True)
class Dense(Solver):
    """The dense solver: one Cholesky factorisation of ``U``, the closed-form gradient in O(m²)
    more. Any kernel, any noise, any index dimension; O(m³) time, O(m²) memory (``m = nD``)."""

    name = "dense"

    def log_likelihood(self, problem):
        return _log_marginal_likelihood(*problem)

    def plain_log_likelihood(self, problem):
        return factor(*problem, want_inverse=False).value

    def index_gradient(self, problem):
        fac = factor(*problem)
        return fac.value, _grad_x(problem.kernel, problem.noise, problem.x, fac, problem.r.shape[1])

    def predict(self, problem, x_new):
        return _predict(*problem, x_new, factor(*problem))

    def predict_covariance(self, problem, x_new):
        return _predict_covariance(*problem, x_new, factor(*problem))

    def rounding_estimate(self, problem):
        condition = _factor(*problem, False)[2]
        return jnp.finfo(problem.r.dtype).eps * condition, PRECISION_WARNING_LEVEL


@functools.partial(jax.jit, static_argnums=4)
def _grad_x(kernel, noise, x, fac, dim):
    return index_terms(kernel, noise, x, fac, dim).grad_x


def _whitened_cross(kernel, noise, x, r, x_new, fac):
    """``(K_* z, chol(U)⁻¹ S (K_* ⊗ I)ᵀ)``: the mean offset ``(n_new, D)`` and the solved cross
    covariance ``(p, n_new, D, q)``, whose Gram products are ``(K_* ⊗ I) M (K_* ⊗ I)ᵀ``."""
    n, dim = r.shape
    n_new = x_new.shape[0]
    p, q = noise.core_shape(n, dim)
    z = noise.adjoint_whiten(fac.alpha, dim)
    cross = kernel.matrix(x_new, x)  # (n_new, n)
    # Column (j, a) of S (K_* ⊗ I)ᵀ is S applied to K_*[j]ᵀ ⊗ e_a: whiten it.
    unit = jnp.eye(dim, dtype=x.dtype)
    columns = jax.vmap(
        lambda k_row: jax.vmap(lambda e: noise.whiten(k_row[:, None] * e[None, :]))(unit)
    )(cross)  # (n_new, D, p, q)
    solved = (fac.inverse @ jnp.moveaxis(columns, 2, 0).reshape(p, -1)).reshape(p, n_new, dim, q)
    return cross @ z, solved


@jax.jit
def _predict(kernel, noise, x, r, x_new, fac):
    """Posterior mean offset ``(K_* ⊗ I) z`` and per-coordinate variance, each ``(n_new, D)``.

    ``Var[f_*] = diag(K(x_new, x_new) ⊗ I_D − (K_* ⊗ I_D) M (K_* ⊗ I_D)ᵀ)`` with the second
    term as the squared norm of ``chol(U)⁻¹ S (K_* ⊗ I)ᵀ``.
    """
    offset, solved = _whitened_cross(kernel, noise, x, r, x_new, fac)
    prior_var = jax.vmap(kernel.evaluate)(x_new, x_new)[:, None]
    return offset, prior_var - jnp.sum(solved**2, axis=(0, 3))


@jax.jit
def _predict_covariance(kernel, noise, x, r, x_new, fac):
    """Posterior mean offset and ``Cov[f_*] = K(x_new, x_new) ⊗ I_D − (K_* ⊗ I_D) M (K_* ⊗ I_D)ᵀ``
    as ``(n_new, D, n_new, D)``."""
    offset, solved = _whitened_cross(kernel, noise, x, r, x_new, fac)
    dim = r.shape[1]
    prior = kernel.matrix(x_new, x_new)[:, None, :, None] * jnp.eye(dim, dtype=x.dtype)[None, :, None, :]
    return offset, prior - jnp.einsum("pjaq,pkbq->jakb", solved, solved)
