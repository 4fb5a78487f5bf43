r"""The public likelihood functions: validate, choose a solver, call its closed-form rule."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from gpgrad_jax import solvers
from gpgrad_jax._arguments import prepare
from gpgrad_jax._diagnostics import check_finite_output
from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise
from gpgrad_jax._solver.base import call

Array = Any


def log_marginal_likelihood(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str | solvers.Solver = "auto",
) -> jax.Array:
    r"""The GP log marginal likelihood: the Gaussian log density of the data, with closed-form gradients.

    For noise whose precision $\Lambda = S^\top S$ is invertible this is the usual
    $\log \mathcal{N}(y \mid \mu,\; K(x) \otimes I_D + \Lambda^{-1})$ — what scikit-learn's and GPflow's
    ``log_marginal_likelihood`` and tinygp's ``log_probability`` return — safe to maximise over
    every parameter, the noise included. It is computed in precision form,

    $$
    \log p = L + \log \operatorname{pdet} S + \frac{m - r}{2} \log 2\pi,
    $$

    with $L$ the precision-form likelihood of [``precision_form_log_likelihood``][gpgrad_jax.precision_form_log_likelihood],
    $\operatorname{pdet} S$ the product of $S$'s nonzero singular values and $r$ their number ($S$ has
    $m$ rows), so that the noise may be rank deficient:

    * $S$ square and invertible: $\operatorname{pdet} S = \lvert\det S\rvert$, $r = m$.
    * $S$ with more rows than columns and full column rank (``noise.Dense``, one row per pixel
      coordinate): the same density, $\Lambda$ being invertible.
    * $S$ rank deficient (a point seen along one camera ray; a zero block for an unobserved
      point — the way to mask missing data): the density of what is observed, the coordinates
      $c = V_r^\top (y - \mu)$ of the data in $S$'s row space ($S = U_r \Sigma_r V_r^\top$),
      $c \sim \mathcal{N}(V_r^\top (f - \mu),\; V_r^\top (K \otimes I_D) V_r + \Sigma_r^{-2})$. For ``PerPoint`` noise the rank is
      counted per block (singular values below ``max σ · D · eps`` of their block count as
      zero), so a block keeps its rank while its scale is learned.

    ``jax.grad`` with respect to any argument (``x``, the kernel's and the noise's parameters,
    ``y``, ``mean``) uses the solver's hand-derived rule: for ``x``,

    $$
    \nabla_x \log p = z \odot (\Delta z) - \operatorname{rowsum}(M \odot \Delta)
    $$

    with $M = S^\top U^{-1} S$, $z = M (y - \mu)$ and
    $\Delta_{ij} = \partial k(x_i, x_j) / \partial x_i$ (``docs/math.md``); for the noise also
    $\partial \log \operatorname{pdet} S / \partial S = (S^+)^\top$ at fixed rank. Works under ``jit``, ``vmap``,
    ``jax.jacrev(jax.grad(f))`` and ``jax.hessian``; pure forward mode (``jax.jvp``) is not
    available through a ``custom_vjp``.

    Args:
        kernel: a [``gpgrad_jax.kernels.Kernel``][gpgrad_jax.kernels.Kernel].
        x: index set, shape ``(n,)`` (scalar index per point) or ``(n, d)``; any order.
        y: data, shape ``(n,)`` or ``(n, D)`` (e.g. ``D = 3`` for a 3-D curve).
        noise: [``Isotropic``][gpgrad_jax.noise.Isotropic],
            [``PerPoint``][gpgrad_jax.noise.PerPoint] or [``Dense``][gpgrad_jax.noise.Dense].
        mean: prior mean ``μ``, shape of ``y`` or a scalar; ``None`` means zero.
        solver: ``"dense"`` (any problem; O(m³) with ``m = nD``), ``"markov"`` (Kalman filter
            and smoother, O(n): scalar indices, a kernel with a state-space form —
            ``CubicSpline``, ``Linear``, ``Constant``, ``Matern12``, ``Matern32``, ``Matern52``,
            ``SHO``, ``Cosine``, their sums, products of the stationary ones, ``c * k`` and kernels
            registered with ``gpgrad_jax.state_space`` — and ``Isotropic``
            or ``PerPoint`` noise), ``"markov-parallel"`` (the same by associative scans,
            O(log n) depth, for GPUs) or ``"auto"``: a Markov solver where it applies and
            ``n ≥ 32``, the parallel one on GPU, else dense.

    Returns:
        The scalar log density.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 8)
        >>> k = kernels.Matern32(1.0, 0.5)
        >>> log_p = gg.log_marginal_likelihood(k, x, jnp.sin(x), noise.Isotropic(0.1))
        >>> cov = k.matrix(x, x) + 0.1**2 * jnp.eye(8)
        >>> bool(jnp.allclose(log_p, jax.scipy.stats.multivariate_normal.logpdf(jnp.sin(x), jnp.zeros(8), cov)))
        True
        >>> grad_x = jax.grad(gg.log_marginal_likelihood, argnums=1)(k, x, jnp.sin(x), noise.Isotropic(0.1))
        >>> grad_x.shape
        (8,)
    """
    problem, _ = prepare(kernel, x, y, noise, mean)
    return _precision_form(solver, problem) + noise_log_density_correction(problem.noise, *problem.r.shape)


def precision_form_log_likelihood(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str | solvers.Solver = "auto",
) -> jax.Array:
    r"""The precision-form likelihood $L$: the log density of the whitened data $w = S (y - \mu)$.

    $$
    L = -\tfrac{1}{2} w^\top U^{-1} w - \tfrac{1}{2} \log \lvert U \rvert - \tfrac{m}{2} \log 2\pi
    \quad\text{with}\quad U = I + S\,(K(x) \otimes I_D)\,S^\top,
    $$

    where $\Lambda = S^\top S$ is the noise precision. When $S$ is square and invertible,
    $L = \log \mathcal{N}(y \mid \mu,\; K \otimes I_D + \Lambda^{-1}) - \log \lvert \det S \rvert$.

    **Not for learning the noise.** The missing $\log \lvert \det S \rvert$ depends on the noise only: for
    ``x``, the kernel and the mean, $L$ and [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] have the same
    gradient, but maximising $L$ over the noise drives its scale up without bound. Use $L$
    where the whitened form is what you want (it is what the solvers compute, and it needs no
    pseudo-determinant of the noise). Same arguments, solvers and closed-form rules as
    [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> k = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)
        >>> x = jnp.linspace(0.1, 2.0, 5)
        >>> y = jnp.stack([jnp.sin(x), jnp.cos(x), x], axis=1)
        >>> L = gg.precision_form_log_likelihood(k, x, y, noise.Isotropic(0.1))
        >>> log_p = gg.log_marginal_likelihood(k, x, y, noise.Isotropic(0.1))
        >>> bool(jnp.allclose(log_p - L, 15 * jnp.log(1 / 0.1)))  # log|det S|, S = I/σ
        True
    """
    return _precision_form(solver, prepare(kernel, x, y, noise, mean)[0])


def _precision_form(solver, problem):
    """``L`` of a checked problem, by the chosen solver's closed-form rule; a bound is refused."""
    chosen, prepared = solvers._resolve(solver, problem)
    if not chosen.exact:
        raise ValueError(
            f"solver={chosen!r} gives a lower bound, not the log marginal likelihood: use "
            "gg.inducing_bound for the bound (and predict / sample_posterior with it for its posterior)"
        )
    value = call(chosen.log_likelihood, prepared)
    check_finite_output(value)
    return value


@functools.partial(jax.jit, static_argnums=(1, 2))
def noise_log_density_correction(noise: Noise, n: int, dim: int) -> jax.Array:
    """``log pdet S + ((m − r)/2) log 2π``: [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] minus ``L``."""
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
    solver: str | solvers.Solver = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""[``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] and its gradient in ``x``, from the closed form, evaluated explicitly.

    The gradient is that of $L$ too (the two differ by a noise-only term):

    $$
    \nabla_x L = z \odot (\Delta z) - \operatorname{rowsum}(M \odot \Delta)
    $$

    with $M = S^\top U^{-1} S$, $z = M (y - \mu)$
    and $\Delta_{ij} = \partial k(x_i, x_j) / \partial x_i$; for $D$-dimensional data each point's $D$
    entries are summed.  The Markov solvers evaluate the same quantity from the smoothed
    marginals, $\partial L / \partial x_i = z_i \cdot \mathrm{E}[f'(x_i) \mid y] - \operatorname{tr}(\Lambda_i \operatorname{Cov}(f'(x_i), f(x_i) \mid y))$.
    Same arguments as [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood]; the gradient has the shape of ``x``.
    This is the rule ``jax.grad`` of [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] uses, exposed for
    callers who want the gradient without a ``grad`` transform.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 1.0, 4)
        >>> value, grad_x = gg.index_gradient(kernels.ExpSquared(1.0, 0.5), x, jnp.sin(x), noise.Isotropic(0.2))
        >>> grad_x.shape
        (4,)
    """
    problem, _ = prepare(kernel, x, y, noise, mean)
    chosen, prepared = solvers._resolve(solver, problem)
    value, grad_x = call(chosen.index_gradient, prepared)
    check_finite_output(value)
    check_finite_output(grad_x)
    return value + noise_log_density_correction(problem.noise, *problem.r.shape), grad_x


def index_hessian(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    mean: Array | None = None,
    *,
    solver: str | solvers.Solver = "auto",
    block_size: int = 32,
) -> jax.Array:
    r"""The Hessian of [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] in ``x``, in O(n²) memory.

    $$
    H_{ij} = \frac{\partial^2 \log p}{\partial x_i \, \partial x_j},
    $$

    one column per Hessian-vector product — forward mode over the closed-form gradient, the
    products of ``block_size`` unit directions at a time (``jax.lax.map``): the memory of
    ``block_size`` gradients plus the ``n × n`` result, where ``jax.hessian`` runs all ``n``
    directions at once (at n = 2000 on the Markov solver: one 15.6 GB allocation). The time is
    ``n`` products: about ``n`` times a gradient.

    **Laplace approximation of the positions.** At a maximiser ``x̂`` of ``log p(y | x) + log p(x)``
    with a Gaussian prior ``x ~ N(x₀, Σ₀)``, the positions' posterior is approximately
    ``N(x̂, (Σ₀⁻¹ − H)⁻¹)`` (see the docs' "Uncertainty of the positions" recipe).

    Args:
        kernel: as in [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].
        x: as there.
        y: as there.
        noise: as there.
        mean: as there.
        solver: as there.
        block_size: directions per batch of Hessian-vector products (memory against speed).

    Returns:
        ``(n, n)`` for ``x`` of shape ``(n,)``, ``(n, d, n, d)`` for ``(n, d)``; symmetrised.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 12)
        >>> k, nz = kernels.Matern32(1.0, 1.0), noise.Isotropic(0.1)
        >>> hessian = gg.index_hessian(k, x, jnp.sin(x), nz, block_size=4)
        >>> f = lambda x_: gg.log_marginal_likelihood(k, x_, jnp.sin(x), nz)
        >>> bool(jnp.allclose(hessian, jax.hessian(f)(x), rtol=1e-4, atol=1e-4 * jnp.abs(hessian).max()))
        True
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.result_type(float))
    return _index_hessian(kernel, x, y, noise, mean, solver, block_size)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _index_hessian(kernel, x, y, noise, mean, solver, block_size):
    def gradient(x_):
        return jax.grad(log_marginal_likelihood, argnums=1)(kernel, x_, y, noise, mean, solver=solver)

    def column(direction):
        return jax.jvp(gradient, (x,), (direction.reshape(x.shape),))[1].reshape(-1)

    size = x.size
    columns = jax.lax.map(column, jnp.eye(size, dtype=x.dtype), batch_size=min(block_size, size))
    hessian = 0.5 * (columns + columns.T)
    return hessian.reshape(*x.shape, *x.shape)


def inducing_bound(
    kernel: Kernel,
    x: Array,
    y: Array,
    noise: Noise,
    inducing: Array,
    mean: Array | None = None,
    *,
    jitter: float | None = None,
    points_per_block: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Titsias' collapsed lower bound on the log marginal likelihood, with ``m`` inducing inputs.

    With $Q = K_{xz} (K_{zz} + \varepsilon I)^{-1} K_{zx}$ and the noise precision
    $\Lambda = \operatorname{blockdiag}(\Lambda_i)$, $\Lambda_i = B_i^\top B_i$,

    $$
    F = \log \mathcal{N}\bigl(y \mid \mu,\; Q \otimes I_D + \Lambda^{-1}\bigr)
      - \tfrac12 \sum_i \operatorname{tr}(\Lambda_i)\,\bigl(k(x_i, x_i) - Q_{ii}\bigr)
      \;\le\; \log p(y),
    $$

    computed in precision form (rank-deficient and zero blocks are fine, as in
    [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood], whose noise-only term it
    adds): a lower bound on the log density for every ``inducing``, equal to it when the inducing
    inputs are the data's indices (up to the jitter). Maximise it over ``x``, ``inducing``, the
    kernel and the noise together. O(n m² p²) time and O(n m) memory (``p = 1`` for
    ``Isotropic`` noise, ``D`` for ``PerPoint``); no ``n × n`` array is formed.

    ``jax.grad`` in any argument uses a hand-derived rule: with $G = \partial F / \partial K_{zx}$
    and $\bar G_{zz} = \partial F / \partial K_{zz}$,

    $$
    \frac{\partial F}{\partial x_i} = \sum_j G_{ji}\, \frac{\partial k(x_i, z_j)}{\partial x_i} + \ldots,
    \qquad
    \frac{\partial F}{\partial z_j} = \sum_i G_{ji}\, \frac{\partial k(z_j, x_i)}{\partial z_j}
      + 2 \sum_l (\bar G_{zz})_{jl}\, \frac{\partial k(z_j, z_l)}{\partial z_j},
    $$

    row sums against the kernel's ``grad_first`` (``docs/math.md``, section 5). Works under
    ``jit``, ``vmap`` and reverse-over-reverse (``jax.hessian``), in float32 and float64.

    Args:
        kernel: any [``Kernel``][gpgrad_jax.kernels.Kernel] (built-in or ``@kernels.register``-ed).
        x: index set, ``(n,)`` or ``(n, d)`` (latent positions of a GPLVM); any order, ties allowed.
        y: data, ``(n,)`` or ``(n, D)``.
        noise: [``Isotropic``][gpgrad_jax.noise.Isotropic] or [``PerPoint``][gpgrad_jax.noise.PerPoint].
        inducing: the inducing inputs $Z$, ``(m,)`` or ``(m, d)`` like ``x``. ``m > n`` works but
            costs more than the exact likelihood (a warning says so).
        mean: prior mean, as in [``log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].
        jitter: $\varepsilon$ relative to the mean of $k(z_j, z_j)$ (a Python number; default
            1e-8 in float64 — GPy's, which is absolute — and 1e-4 in float32). The jitter is part
            of the model, inducing values observed with that small noise, so $F$ stays a lower
            bound and its gradient includes the jitter's dependence on the kernel; but it lowers
            the bound where inducing inputs crowd together (``default_jitter`` in
            ``gpgrad_jax/_solver/inducing.py`` has numbers): in float32, spread them out.
        points_per_block: points per block of the backward pass (``None``: its per-pair arrays
            hold about 10⁵ entries, in cache); a memory knob, the result is the same.
        mesh: one problem over many devices and hosts — a ``jax.sharding.Mesh`` whose axis
            ``axis`` the points are split along, the sums over points reduced across it
            ([``solvers.Inducing``][gpgrad_jax.solvers.Inducing] has the details; the docs'
            "Scaling out" page the recipes). The result is the one-device bound.
        axis: the mesh axis of the points (a name or a tuple of names; ``None`` for a mesh of
            one axis).

    Returns:
        The scalar bound.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 5.0, 200)
        >>> k, nz = kernels.ExpSquared(1.0, 1.0), noise.Isotropic(0.1)
        >>> F = gg.inducing_bound(k, x, jnp.sin(x), nz, jnp.linspace(0.0, 5.0, 12))
        >>> bool(F <= gg.log_marginal_likelihood(k, x, jnp.sin(x), nz))
        True
        >>> grad_x, grad_z = jax.grad(gg.inducing_bound, argnums=(1, 4))(k, x, jnp.sin(x), nz, jnp.linspace(0.0, 5.0, 12))
        >>> grad_x.shape, grad_z.shape
        ((200,), (12,))
    """
    problem, _ = prepare(kernel, x, y, noise, mean)
    bound = solvers.Inducing(inducing, jitter, points_per_block, mesh, axis)
    value = call(bound.log_likelihood, bound.prepare(problem))
    check_finite_output(value)
    return value + noise_log_density_correction(problem.noise, *problem.r.shape)
