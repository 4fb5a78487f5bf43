"""Posterior prediction of the latent curve at new indices."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._likelihood import prepare
from gpgrad_jax._noise import Noise
from gpgrad_jax._solvers import call_solver, resolve
from gpgrad_jax._validation import _as_float_array, check_finite

Array = Any


def predict(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    x_new: Array,
    mean: Array | None = None,
    mean_new: Array | None = None,
    *,
    solver: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""Posterior mean and marginal variance of the latent function at ``x_new``.

    In the precision square-root form (no ``Λ⁻¹`` needed, so rank-deficient
    noise is fine), with ``M = SᵀU⁻¹S``, ``z = M (y − μ)`` and
    ``K_* = K(x_new, x)``:

        E[f_*]   = μ_* + (K_* ⊗ I_D) z
        Var[f_*] = diag(K(x_new, x_new) ⊗ I_D − (K_* ⊗ I_D) M (K_* ⊗ I_D)ᵀ)

    The Markov solvers read the same moments from the smoothed state, the new indices
    joining the filter as points with zero precision: O(n + n_new).

    Args:
        kernel: as in :func:`gpgrad_jax.log_marginal_likelihood`.
        x: the data's indices, as there.
        y: the data, as there.
        noise: the data's noise, as there.
        x_new: new indices, shape ``(n_new,)`` or ``(n_new, d)`` like ``x``.
        mean: the prior mean at ``x``, as there.
        mean_new: prior mean at ``x_new``, shape ``(n_new,)`` or ``(n_new, D)``
            like ``y``; ``None`` means zero.
        solver: as in :func:`gpgrad_jax.log_marginal_likelihood`.

    Returns:
        ``(mean, variance)``, each of shape ``(n_new,)`` for 1-D data or
        ``(n_new, D)`` (per coordinate: anisotropic noise makes them differ).
        A variance that is zero in exact arithmetic (a noise-free observation, a
        ``Constant`` kernel pinned by data) can come out as a rounding error of either sign,
        at most about ``10³ · eps · k(x_new, x_new)``; it is returned as ``max(variance, 0)``
        so that ``sqrt`` stays finite.

    Example:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.1, 1.0, 5)
        >>> y = jnp.stack([x, x**2, jnp.sin(x)], axis=1)
        >>> k = kernels.CubicSpline(1.0) + kernels.Linear(1.0)
        >>> mu, var = gg.predict(k, x, y, noise.Isotropic(0.01), jnp.array([0.5]))
        >>> mu.shape, var.shape
        ((1, 3), (1, 3))
    """
    y_shape = _as_float_array("y", y).shape
    kernel, noise, x, r = prepare(kernel, x, y, noise, mean)
    x_new = _as_float_array("x_new", x_new).astype(x.dtype)
    if x_new.ndim != x.ndim or x_new.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"`x_new` must have shape (n_new,) + {x.shape[1:]} like `x`, got shape {x_new.shape}"
        )
    check_finite("x_new", x_new)
    _, dim = r.shape
    n_new = x_new.shape[0]
    expected = (n_new, *tuple(y_shape[1:]))
    if mean_new is None:
        mean_new = jnp.zeros((n_new, dim), x.dtype)
    else:
        mean_new = _as_float_array("mean_new", mean_new)
        if mean_new.shape == ():  # a constant mean
            mean_new = jnp.broadcast_to(mean_new, expected)
        if mean_new.shape != expected:
            raise ValueError(f"`mean_new` must be a scalar or have shape {expected}, got shape {mean_new.shape}")
        check_finite("mean_new", mean_new)
        mean_new = mean_new.reshape(n_new, dim).astype(x.dtype)

    offset, variance = call_solver(resolve(solver, kernel, noise, x).predict, kernel, noise, x, r, x_new)
    out_shape = (n_new, *tuple(y_shape[1:]))
    return (mean_new + offset).reshape(out_shape), jnp.maximum(variance, 0.0).reshape(out_shape)
