"""Posterior prediction at new indices: mean, variance or full covariance, and samples."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax import solvers
from gpgrad_jax._arguments import (
    all_hold,
    as_float_array,
    check_finite,
    check_rule,
    index_domain_rules,
    poison,
    prepare,
)
from gpgrad_jax._kernels import Kernel
from gpgrad_jax._linalg import psd_sqrt
from gpgrad_jax._noise import BlockDiagonal, Noise, log_pseudo_determinants
from gpgrad_jax._smallmatrix import solve
from gpgrad_jax._solver.base import Solver, call

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
    solver: str | solvers.Solver = "auto",
    full_covariance: bool = False,
    noise_new: Noise | None = None,
    inducing: Array | None = None,
    jitter: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Posterior mean and variance (or full covariance) of the latent function at ``x_new``.

    In the precision square-root form (no $\Lambda^{-1}$ needed, so rank-deficient
    noise is fine), with $M = S^\top U^{-1} S$, $z = M (y - \mu)$ and
    $K_* = K(x_\mathrm{new}, x)$:

    $$
    \begin{aligned}
    \mathrm{E}[f_*] &= \mu_* + (K_* \otimes I_D)\, z, \\
    \operatorname{Cov}[f_*] &= K(x_\mathrm{new}, x_\mathrm{new}) \otimes I_D - (K_* \otimes I_D)\, M\, (K_* \otimes I_D)^\top.
    \end{aligned}
    $$

    The Markov solvers read the mean and marginal variances from the smoothed state, the new
    indices joining the filter as points with zero precision: O(n + n_new). The full covariance
    uses the dense formula whatever the solver (O((nD)³ + (n_new D)²)); for draws,
    [``sample_posterior``][gpgrad_jax.sample_posterior] needs no covariance on the Markov path (O(n + n_new)).

    Args:
        kernel: as in [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].
        x: the data's indices, as there.
        y: the data, as there.
        noise: the data's noise, as there.
        x_new: new indices, shape ``(n_new,)`` or ``(n_new, d)`` like ``x``.
        mean: the prior mean at ``x``, as there.
        mean_new: prior mean at ``x_new``, shape ``(n_new,)`` or ``(n_new, D)``
            like ``y``, or a scalar; ``None`` means zero.
        solver: as in [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].
        full_covariance: return the full posterior covariance instead of the marginal variances.
            It is built densely whatever the solver — O((nD)³) time, O((nD)²) memory; the
            Markov solvers' marginals and [``sample_posterior``][gpgrad_jax.sample_posterior]'s draws are O(n + n_new).
        noise_new: the noise of *new observations* at ``x_new`` (e.g. ``noise`` itself for
            ``Isotropic`` noise): the variance or covariance is then that of $y_* = f_* + \varepsilon$,
            adding $\Lambda_\mathrm{new}^{-1}$. Its precision must be invertible.
        inducing: inducing inputs $Z$ (``(m,)`` or ``(m, d)``): predict from the optimal
            variational posterior of [``inducing_bound``][gpgrad_jax.inducing_bound] instead of
            the exact posterior, in O(n m² + n_new m²) — mean $K_{*z} (K_{zz} + K_{zx} \Lambda K_{xz})^{-1} K_{zx} \Lambda (y - \mu)$
            and variance $k_{**} - Q_{**} + K_{*z} (K_{zz} + K_{zx} \Lambda K_{xz})^{-1} K_{z*}$ (for
            invertible $\Lambda$; computed in precision form). ``solver`` must then be ``"auto"`` and
            ``full_covariance`` ``False``.
        jitter: with ``inducing``, as in [``inducing_bound``][gpgrad_jax.inducing_bound].

    Returns:
        ``(mean, variance)``, each of shape ``(n_new,)`` for 1-D data or
        ``(n_new, D)`` (per coordinate: anisotropic noise makes them differ); with
        ``full_covariance=True``, ``(mean, covariance)`` with covariance of shape
        ``(n_new, n_new)`` for 1-D data or ``(n_new, D, n_new, D)``.
        A variance that is zero in exact arithmetic (a noise-free observation, a
        ``Constant`` kernel pinned by data) can come out as a rounding error of either sign,
        at most about ``10³ · eps · k(x_new, x_new)``; marginal variances are returned as
        ``max(variance, 0)`` so that ``sqrt`` stays finite.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.1, 1.0, 5)
        >>> y = jnp.stack([x, x**2, jnp.sin(x)], axis=1)
        >>> k = kernels.CubicSpline(1.0) + kernels.Linear(1.0)
        >>> mu, var = gg.predict(k, x, y, noise.Isotropic(0.01), jnp.array([0.5]))
        >>> mu.shape, var.shape
        ((1, 3), (1, 3))
        >>> mu, cov = gg.predict(k, x, y, noise.Isotropic(0.01), jnp.array([0.5, 0.6]), full_covariance=True)
        >>> cov.shape
        (2, 3, 2, 3)
    """
    problem, y_shape = prepare(kernel, x, y, noise, mean)
    x_new, mean_new, out_shape = _prepare_new(problem, y_shape, x_new, mean_new)
    chosen, prepared = _posterior_solver(solver, inducing, jitter, problem, out_shape[0])
    if noise_new is not None:
        noise_new = _check_noise_new(noise_new, out_shape[0], problem.r.shape[1], problem.x.dtype)
    dtype = problem.x.dtype
    if full_covariance:
        _check_memory(problem, out_shape[0], "the full covariance")
        x_new = _pad(x_new, out_shape[0], dtype)  # only the cast: an (n_new·D)² result gains nothing from buckets
        offset, covariance = call(chosen.predict_covariance, prepared, x_new)
        return _finish_covariance(out_shape, mean_new, offset, covariance, noise_new)
    # Padded to a power of two (with copies of a new point): a new n_new reuses the solver's
    # compiled program instead of compiling its own, which costs far more than the padding.
    padded = _pad(x_new, _bucket(out_shape[0]), dtype)
    offset, variance = call(chosen.predict, prepared, padded)
    return _finish_marginals(out_shape, mean_new, offset, variance, noise_new)


def _posterior_solver(solver, inducing, jitter, problem, n_new):
    """``(solver, prepared)`` for ``predict`` and ``sample_posterior``: the inducing-point
    posterior with ``inducing``, else ``solver=`` as the likelihood functions take it."""
    if inducing is None:
        return solvers._resolve(solver, problem, n_new)
    if not (isinstance(solver, str) and solver == "auto"):
        raise ValueError(
            f"`solver`: with `inducing` the variational posterior of the inducing-point bound is used "
            f"(the same as solver=gg.solvers.Inducing(inducing)); leave solver='auto', got {solver!r}"
        )
    chosen = solvers.Inducing(inducing, jitter)
    return chosen, chosen.prepare(problem)


#: The dense posterior covariance at ``x_new`` and what is formed with it (its symmetric root for
#: draws: eigenvectors, the root, temporaries) take about this many arrays of ``(n_new D)²``.
_COVARIANCE_COPIES = 5


# The steps around the solver call, each one compiled program per shape: done eagerly, their
# dozen small operations would each compile for every new n_new.


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad(x_new, size, dtype):
    x_new = x_new.astype(dtype)
    return jnp.concatenate([x_new, jnp.broadcast_to(x_new[-1:], (size - x_new.shape[0], *x_new.shape[1:]))])


def _mean_new(mean_new, offset, out_shape):
    n_new = out_shape[0]
    offset = offset[:n_new]
    if mean_new is not None:
        offset = offset + jnp.broadcast_to(mean_new, out_shape).reshape(offset.shape).astype(offset.dtype)
    return offset.reshape(out_shape)


@functools.partial(jax.jit, static_argnums=0)
def _finish_marginals(out_shape, mean_new, offset, variance, noise_new):
    n_new, dim = out_shape[0], offset.shape[1]
    variance = jnp.maximum(variance[:n_new], 0.0)
    if noise_new is not None:
        variance = variance + noise_new.variance(n_new, dim)
    return _mean_new(mean_new, offset, out_shape), variance.reshape(out_shape)


@functools.partial(jax.jit, static_argnums=0)
def _finish_covariance(out_shape, mean_new, offset, covariance, noise_new):
    n_new, dim = out_shape[0], offset.shape[1]
    if noise_new is not None:
        covariance = covariance + noise_new.covariance(n_new, dim).reshape(n_new, dim, n_new, dim)
    if len(out_shape) == 1:
        covariance = covariance.reshape(n_new, n_new)
    return _mean_new(mean_new, offset, out_shape), covariance


def sample_posterior(
    key: jax.Array,
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    x_new: Array,
    num_samples: int = 1,
    mean: Array | None = None,
    mean_new: Array | None = None,
    *,
    solver: str | solvers.Solver = "auto",
    noise_new: Noise | None = None,
    inducing: Array | None = None,
    jitter: float | None = None,
) -> jax.Array:
    r"""Draws from the posterior of the latent function at ``x_new`` (of new observations, with
    ``noise_new``).

    * The Markov solvers draw by pathwise conditioning in O(n + n_new) time and memory: a prior
      draw $s$ of the state-space model at the data and the new indices together, simulated
      whitened observations $\tilde o = C s + e$, and $s + \mathrm{E}[s \mid o - \tilde o]$ — exactly a posterior draw,
      the posterior mean being linear in the observations (all draws share one filter and
      smoother pass). The noise of new observations is drawn point by point, $\varepsilon_i = B_i^{-1} \xi_i$
      (``Dense`` noise of new observations: from its dense covariance).
    * The dense solver draws $\mathrm{E}[f_*] + C^{1/2} \xi$ with $C^{1/2}$ the symmetric square root of the
      full posterior covariance of [``predict``][gpgrad_jax.predict] (eigenvalues below zero, rounding, are
      clipped): exact for a positive semi-definite covariance, whatever its rank; O((nD)³ + (n_new D)³).
    * With ``inducing``, draws of the variational posterior of
      [``inducing_bound``][gpgrad_jax.inducing_bound] in O(n m² + n_new m): the inducing values
      $u \sim q(u)$, shared by all new points, then $\mathrm{E}[f_* \mid u]$ plus the residual
      $f_* - \mathrm{E}[f_* \mid u]$ (variance $k_{**} - Q_{**}$) drawn point by point. Each draw's
      marginals are exactly [``predict``][gpgrad_jax.predict]'s; across new points the draws are
      correlated through $u$ only — the residual's own correlations, $K_{**} - Q_{**}$ off the
      diagonal, would need an ``n_new × n_new`` factorisation (small when the inducing inputs
      are dense where the new points are).

    $\xi$ is standard normal from ``key``. Draws are differentiable in the kernel's and the
    noise's parameters and the data (a reparameterisation); in the indices only away from ties,
    where the Markov solvers' process-noise factors behave like $\sqrt{h}$.

    Args:
        key: a ``jax.random`` key.
        kernel: as in [``predict``][gpgrad_jax.predict].
        x: as there.
        y: as there.
        noise: as there.
        x_new: as there.
        num_samples: how many draws.
        mean: as in [``predict``][gpgrad_jax.predict].
        mean_new: as there.
        solver: as there.
        noise_new: as there: draws of new observations instead of the latent function.
        inducing: as in [``predict``][gpgrad_jax.predict]: draws of the inducing-point posterior.
        jitter: as there.

    Returns:
        Shape ``(num_samples, n_new)`` for 1-D data or ``(num_samples, n_new, D)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 2.0, 6)
        >>> draws = gg.sample_posterior(jax.random.key(0), kernels.Matern32(1.0, 0.5), x, jnp.sin(x),
        ...                             noise.Isotropic(0.1), jnp.linspace(0.0, 2.0, 50), num_samples=3)
        >>> draws.shape
        (3, 50)
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}")
    problem, y_shape = prepare(kernel, x, y, noise, mean)
    x_new, mean_new, out_shape = _prepare_new(problem, y_shape, x_new, mean_new)
    n_new = out_shape[0]
    chosen, prepared = _posterior_solver(solver, inducing, jitter, problem, n_new)
    if noise_new is not None:
        noise_new = _check_noise_new(noise_new, n_new, problem.r.shape[1], problem.x.dtype)
    latent_key, noise_key = jax.random.split(key)
    if type(chosen).sample is Solver.sample:  # draws from the dense covariance: O((n_new D)²)
        _check_memory(problem, n_new, f"draws with solver {chosen.name!r}")
        new = _pad(x_new, n_new, problem.x.dtype)  # only the cast
    else:  # the solver's own draws, O(n_new): as in predict, one compiled program per bucket
        new = _pad(x_new, _bucket(n_new), problem.x.dtype)
    draws = call(chosen.sample, latent_key, prepared, new, num_samples)
    return _finish_draws(out_shape, noise_key, mean_new, draws, noise_new)


@functools.partial(jax.jit, static_argnums=0)
def _finish_draws(out_shape, key, mean_new, draws, noise_new):
    n_new = out_shape[0]
    draws = draws[:, :n_new]
    num_samples, _, dim = draws.shape
    if noise_new is not None:
        draws = draws + _noise_draws(key, noise_new, num_samples, n_new, dim)
    if mean_new is not None:
        draws = draws + jnp.broadcast_to(mean_new, out_shape).reshape(n_new, dim).astype(draws.dtype)
    return draws.reshape(num_samples, *out_shape)


def _noise_draws(key, noise_new, num_samples, n_new, dim):
    """Draws of the noise of new observations, ``(num_samples, n_new, D)``: ``ε_i = B_i⁻¹ ξ_i`` per
    point (``Cov ε_i = (B_iᵀB_i)⁻¹``), or from the dense covariance of ``Dense`` noise."""
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(noise_new))
    if isinstance(noise_new, BlockDiagonal):
        blocks, q = noise_new.observation_blocks(n_new, dim)
        standard = jax.random.normal(key, (num_samples, n_new, blocks.shape[-1], q), dtype)
        return solve(blocks, standard).reshape(num_samples, n_new, dim)
    root = psd_sqrt(noise_new.covariance(n_new, dim))
    standard = jax.random.normal(key, (num_samples, n_new * dim), dtype)
    return (standard @ root).reshape(num_samples, n_new, dim)


def _available_bytes() -> int | None:
    """Free memory of the default device (its allocator's limit less what is in use), or of the
    host (``MemAvailable``) for a CPU; ``None`` where neither says."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # pragma: no cover - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_memory(problem, n_new: int, what: str) -> None:
    """Raise ``ValueError`` before a dense posterior covariance at ``n_new`` new points is formed
    that cannot fit in memory: the process would otherwise die allocating it."""
    dim = problem.r.shape[1]
    size, size_new = problem.x.shape[0] * dim, n_new * dim
    itemsize = np.dtype(problem.x.dtype).itemsize
    needed = (_COVARIANCE_COPIES * size_new**2 + 3 * size**2 + 2 * size * size_new) * itemsize
    available = _available_bytes()
    if available is not None and needed > available:
        raise ValueError(
            f"{what} at {size_new} new rows (n_new · D) need the dense posterior covariance, about "
            f"{needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB free. Use a kernel with a "
            "state-space form (solver='markov': O(n + n_new) predictions and draws), the inducing-point "
            "posterior (inducing=...), or fewer new points per call."
        )


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


def _prepare_new(problem, y_shape, x_new, mean_new):
    """``(x_new, mean_new, output shape)``: the new indices and their prior mean checked against a
    checked problem (``y_shape``: the data's shape as given), the output ``(n_new,)`` or ``(n_new, D)``."""
    kernel, x = problem.kernel, problem.x
    x_new = as_float_array("x_new", x_new)
    if x_new.ndim != x.ndim or x_new.shape[1:] != x.shape[1:] or x_new.shape[0] < 1:
        raise ValueError(
            f"`x_new` must have shape (n_new,) + {x.shape[1:]} like `x` with n_new >= 1, got shape {x_new.shape}"
        )
    verdicts = [check_finite("x_new", x_new)] + [check_rule(*rule) for rule in index_domain_rules(kernel, "x_new", x_new)]
    (x_new,) = poison(all_hold(verdicts), x_new)
    out_shape = (x_new.shape[0], *tuple(y_shape[1:]))
    if mean_new is not None:
        mean_new = as_float_array("mean_new", mean_new)
        if mean_new.shape not in ((), out_shape):
            raise ValueError(f"`mean_new` must be a scalar or have shape {out_shape}, got shape {mean_new.shape}")
        (mean_new,) = poison(check_finite("mean_new", mean_new), mean_new)
    return x_new, mean_new, out_shape


def _check_noise_new(noise_new, n_new, dim, dtype):
    """``noise_new`` in ``dtype``, checked to fit ``x_new`` and to have an invertible precision."""
    if not isinstance(noise_new, Noise):
        raise TypeError(f"`noise_new` must be a gpgrad_jax.noise.Noise, got {type(noise_new).__name__}")
    noise_new.check_shapes(n_new, dim)
    verdicts = [check_rule(f"noise_new.{name}", value, lambda a: a > 0, "> 0") for name, value in noise_new.positive_parameters().items()]
    valid = all_hold(verdicts)
    noise_new = jax.tree_util.tree_map(lambda leaf: poison(valid, jnp.asarray(leaf, dtype))[0], noise_new)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(noise_new)):
        return noise_new  # values unknown under a trace
    if isinstance(noise_new, BlockDiagonal):
        matrices = noise_new.observation_blocks(n_new, dim)[0]
    else:
        matrices = noise_new.dense_matrix(n_new, dim)
    _, ranks = log_pseudo_determinants(matrices)
    if not bool(jnp.all(ranks == matrices.shape[-1])) or not bool(jnp.all(jnp.isfinite(matrices))):
        raise ValueError(
            "`noise_new` must have an invertible precision: a new observation with no information "
            "along some direction has infinite variance there (pass noise_new=None for the latent "
            "function's variance)"
        )
    return noise_new
