r"""The state-space blocks: linear SDEs whose states carry the kernels that have a Markov form.

A kernel is Markov when ``f`` is the first entry of the state of a linear SDE. ``blocks_of`` maps
a kernel to a tuple of *blocks*, one SDE each, stacked block-diagonally (``f`` is the sum of the
blocks' first entries); ``model_blocks`` checks the tuple — what the Markov solvers build from a
kernel, once per call. The blocks:

* ``CurveBlock`` — ``CubicSpline(σ²) + Linear(σ_l²) + Constant(σ_c²)`` as **one** 2-state block
  ``s = (f, f')`` (an integrated Wiener process started at index 0 from
  ``s(0) ~ N(0, diag(σ_c², σ_l²))``): ``A(h) = [[1, h], [0, 1]]``,
  ``Q(h) = σ² [[h³/3, h²/2], [h²/2, h]]``; there is no stationary covariance.
* ``MaternBlock`` — Matérn 3/2 (2 states) or 5/2 (3 states), ``λ = √(2ν)/ℓ``:
  ``A(h) = e^{−λh} Σ_j (F + λI)^j h^j / j!`` (``F + λI`` is nilpotent), ``Q(h) = P∞ − A P∞ Aᵀ``.
* ``Matern12Block`` (Matérn 1/2, 1 state), ``SHOBlock`` (state ``(f, f')``), ``CosineBlock``
  (a rotation, no process noise) and ``ProductBlock`` (the product of two stationary blocks).
* ``ScaledBlock`` (a user's block times a constant) and ``ReadOutBlock`` (a user's block read
  through its own ``H``, rewritten in the basis whose first entry is ``f``).

Each block also gives square roots of its covariances for the square-root form:
``process_noise_factor(h)`` (``L`` with ``L Lᵀ = Q(h)``) and ``initial_factor(t)``, computed to
full *relative* accuracy in every entry, not from ``Q(h)`` itself: for a Matérn block
``P∞ − A P∞ Aᵀ`` cancels, its first entry being ``O((λh)^{2·size−1})`` while ``P∞`` is ``O(1)``
(float32, Matérn 5/2, ``λh = 0.01``: relative error 2e3); for ``λh < 0.8`` the factor comes from
the Taylor series of ``Q = ∫₀ʰ e^{Fτ} L q Lᵀ e^{Fᵀτ} dτ``, scaled so that it stays well
conditioned as ``h → 0``.

Sums merge their curve blocks and stack the rest; ``c * k`` (a product with a
[``Constant``][gpgrad_jax.kernels.Constant]) scales every block (``Block.scaled``); products of
stationary kernels distribute over sums into product blocks. Other kernels (the squared
exponential, products with the curve kernels) have no form: ``NoStateSpaceForm``. Users
register their own through [``gpgrad_jax.state_space``][gpgrad_jax.state_space].

Blocks are small dataclass pytrees of their effective parameters: the solver's rule returns
cotangents for them, and autodiff of ``model_blocks`` carries those to the kernel's leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax import _kernels as kernels
from gpgrad_jax._pytree import pytree_dataclass
from gpgrad_jax._smallmatrix import cholesky, small_matmul, triangularize
from gpgrad_jax._solver.markov.model import pad_points

Array = Any


class NoStateSpaceForm(ValueError):
    """The kernel has no state-space form, so the Markov solvers cannot use it."""


def _matrix(rows, like):
    """A small matrix from nested lists of scalars (numbers or arrays broadcast to ``like``)."""
    entry = lambda v: jnp.broadcast_to(jnp.asarray(v, like.dtype), like.shape)  # noqa: E731
    return jnp.stack([jnp.stack([entry(v) for v in row], -1) for row in rows], -2)


class Block:
    r"""Base of a state-space block: a linear SDE whose state ``s`` (``size`` entries) holds the
    process ``f`` as the linear read-out ``f = H s``.

    The contract a block fulfils (all methods batched over leading axes of ``h`` and ``t``):

    * ``transition(h)`` — ``A(h) = e^{F h}``, ``(..., size, size)``;
    * ``process_noise(h)`` — ``Q(h) = ∫₀ʰ e^{Fτ} L Q_c Lᵀ e^{Fᵀτ} dτ`` (for a stationary block
      ``P∞ − A(h) P∞ A(h)ᵀ``), ``(..., size, size)``;
    * ``stationary_covariance()`` — ``P∞`` (a stationary block: subclass ``StationaryBlock``),
      **or** ``initial(t)``, the prior covariance of the state at the first (smallest) index ``t``;
    * ``observation()`` — ``H``, ``(size,)``; the default ``None`` reads the first entry. If
      given, ``H[0]`` must not be 0 (the block is rewritten in the basis whose first entry is
      ``f``);
    * optional: ``process_noise_factor(h)`` and ``initial_factor(t)``, square roots ``L Lᵀ`` of
      the two covariances for the float32 (square-root) solvers — by default Cholesky factors
      of them, which lose relative accuracy where ``Q(h)`` is formed by cancellation;
      ``slope_entry``, the state entry that holds ``f'`` if the paths are differentiable
      (enables a faster closed form for the index gradient; the generic rule is used otherwise).

    Every method must be a JAX function of the block's fields (its parameters, a pytree): the
    gradient in them and in ``h`` comes from autodiff of these small functions, vmapped over
    the steps — never through the filter.

    A block also owns its special cases, which the built-in blocks override: ``scaled(c)`` (the
    block times a constant), ``may_kink()`` (whether its kernel may have a kink at ``τ = 0``) and
    the closed forms of its parameter cotangents, ``cotangent_from_steps`` (by default autodiff
    of the per-step functions) and ``cotangent_from_marginals`` (where ``marginal_identity``).
    """

    size: ClassVar[int]
    slope_entry: ClassVar[int | None] = None
    #: Whether ``cotangent_from_marginals`` gives the parameter cotangents from the smoothed
    #: marginals alone (no adjoint pass needed for them).
    marginal_identity: ClassVar[bool] = False

    def observation(self):
        return None

    def initial(self, t):
        return jnp.broadcast_to(self.stationary_covariance(), (*jnp.shape(t), self.size, self.size))

    def process_noise_factor(self, h):
        return cholesky(self.process_noise(h), semidefinite=True)

    def initial_factor(self, t):
        return cholesky(self.initial(t), semidefinite=True)

    def scaled(self, scale):
        """The block of ``c · k`` for this block's ``k``: covariances times ``c``."""
        return ScaledBlock(self, scale)

    def may_kink(self) -> bool:
        """Whether the block's kernel may have a kink at ``τ = 0`` (paths not differentiable):
        then tied indices need the mean of the one-sided derivatives. A block without a
        stationary covariance has none here; stationary ones are checked at run time (``kink_slope``)."""
        return False

    def per_step(self, steps, first):
        """``(A(h_k), Q(h_k), P₀(x₁))``: the block's functions on every step and at the first index."""
        return self.transition(steps), self.process_noise(steps), self.initial(first)

    def cotangent_from_steps(self, a_bar, q_bar, steps, first):
        """The block's parameter cotangents from every step's ``(Ā_k, Q̄_k)`` (``(n, k, k)`` each;
        ``Q̄_0`` is the first state's prior's), by one ``jax.vjp`` of ``per_step``, vectorised over
        the steps: the generic rule."""
        _, vjp = jax.vjp(lambda block: block.per_step(steps, first), self)
        (bar,) = vjp((a_bar[1:], q_bar[1:], q_bar[0]))
        return bar

    def cotangent_from_marginals(self, value_term, slope_term, x):
        """The parameter cotangents by an identity of the smoothed marginals, for blocks with
        ``marginal_identity`` (``value_term``, ``slope_term``: ``z·E[s_j] − q tr(Λ Cov(s_j, f))`` per
        point for the value and slope entries)."""
        raise NotImplementedError(f"{type(self).__name__} has no marginal identity")


class StationaryBlock(Block):
    """A block with a stationary state covariance ``P∞`` (``stationary_covariance()``), the prior of
    the first state. Products of stationary blocks are product blocks (``ProductBlock``).

    Blocks written against the earlier contract, whose ``P∞`` method is named ``stationary()``,
    still work: ``stationary_covariance`` falls back to it."""

    def stationary_covariance(self):
        legacy = getattr(self, "stationary", None)
        if legacy is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither stationary_covariance() nor stationary()")
        return legacy()

    def stationary_factor(self):
        """A square root of ``P∞``."""
        return cholesky(self.stationary_covariance(), semidefinite=True)

    def initial_factor(self, t):
        return jnp.broadcast_to(self.stationary_factor(), (*jnp.shape(t), self.size, self.size))

    def may_kink(self) -> bool:
        return True  # unknown: ``kink_slope`` is exactly 0 where the paths are differentiable

    def kink_slope(self):
        """``κ = k'(0⁺) = [A'(0) P∞]₀₀`` (0 where the paths are differentiable)."""
        stationary = self.stationary_covariance()
        zero = jnp.zeros((), stationary.dtype)
        _, derivative = jax.jvp(self.transition, (zero,), (jnp.ones_like(zero),))
        return (derivative @ stationary)[0, 0]


@pytree_dataclass
class CurveBlock(Block):
    """``CubicSpline(cubic) + Linear(linear) + Constant(constant)`` as one 2-state block."""

    cubic: Array
    linear: Array
    constant: Array

    size: ClassVar[int] = 2
    slope_entry: ClassVar[int | None] = 1

    def parts(self):
        return (self.cubic, self.linear, self.constant)

    def transition(self, h):
        return _matrix([[1.0, h], [0.0, 1.0]], h)

    def process_noise(self, h):
        return self.cubic * unit_cubic_noise(h)

    def initial(self, t):
        """Prior covariance of ``(f(t), f'(t))``: ``A(t) diag(σ_c², σ_l²) A(t)ᵀ + Q(t)``."""
        constant = self.constant * _matrix([[1.0, 0.0], [0.0, 0.0]], t)
        linear = self.linear * _matrix([[t * t, t], [t, 1.0]], t)
        return constant + linear + self.process_noise(t)

    def process_noise_factor(self, h):
        """``σ √h [[h/√3, 0], [√3/2, ½]]``, the exact Cholesky factor of ``Q(h)``."""
        scale = _safe_sqrt(self.cubic * h)
        return scale[..., None, None] * _matrix([[h / math.sqrt(3.0), 0.0], [math.sqrt(3.0) / 2.0, 0.5]], h)

    def initial_factor(self, t):
        """A factor of ``initial``: ``[A(t) diag(σ_c, σ_l), L_Q(t)]`` triangularised."""
        sigma_c, sigma_l = _safe_sqrt(self.constant), _safe_sqrt(self.linear)
        prior = _matrix([[sigma_c, t * sigma_l], [0.0, sigma_l]], t)
        return triangularize(jnp.concatenate([prior, self.process_noise_factor(t)], axis=-1))[..., :2]

    def scaled(self, scale):
        return CurveBlock(*(scale * v for v in self.parts()))

    def cotangent_from_steps(self, a_bar, q_bar, steps, first):
        """In closed form: ``A`` does not depend on the parameters, and they enter ``Q(h_k)`` and
        the first state's prior linearly — ``σ̄² = Σ_k ⟨Q̄_k, Q̃(h_k)⟩`` (with ``h_0 = x₁``, the prior
        holding ``Q̃(x₁)``), and the linear and constant variances read ``Q̄_0``."""
        all_steps = pad_points(steps, 1, 0).at[0].set(first)
        cubic_bar = jnp.sum(q_bar * unit_cubic_noise(all_steps))
        prior = q_bar[0]
        linear_bar = first * first * prior[0, 0] + 2.0 * first * prior[0, 1] + prior[1, 1]
        return CurveBlock(cubic_bar, linear_bar, prior[0, 0])


def _safe_sqrt(v):
    """``√v`` for ``v ≥ 0``, with a zero (not infinite) derivative at ``v = 0``."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


def unit_cubic_noise(h):
    """``[[h³/3, h²/2], [h²/2, h]]``: the process noise of a unit-variance integrated Wiener process."""
    h2 = h * h
    return _matrix([[h2 * h / 3.0, h2 / 2.0], [h2 / 2.0, h]], h)


@pytree_dataclass(static=("order",))
class MaternBlock(StationaryBlock):
    """A Matérn-``order/2`` block (``order`` 3 or 5) with variance and lengthscale."""

    variance: Array
    lengthscale: Array
    order: int

    slope_entry: ClassVar[int | None] = 1
    marginal_identity: ClassVar[bool] = True

    @property
    def size(self):
        return (self.order + 1) // 2

    def rate(self):
        """``λ = √order / ℓ``."""
        return jnp.sqrt(jnp.asarray(float(self.order), jnp.result_type(self.lengthscale))) / self.lengthscale

    def stationary_covariance(self):
        """``P∞``, the stationary covariance of the state."""
        lam = self.rate()
        if self.order == 3:
            unit = _matrix([[1.0, 0.0], [0.0, lam**2]], lam)
        else:
            third = lam**2 / 3.0
            unit = _matrix([[1.0, 0.0, -third], [0.0, third, 0.0], [-third, 0.0, lam**4]], lam)
        return self.variance * unit

    def transition(self, h):
        # exp(F h) = e^{−λh} (I + N h + N² h²/2) with N = F + λI, nilpotent: (F + λI)^size = 0.
        lam = self.rate()
        if self.order == 3:
            nilpotent = _matrix([[lam, 1.0], [-(lam**2), -lam]], lam)
        else:
            nilpotent = _matrix([[lam, 1.0, 0.0], [0.0, lam, 1.0], [-(lam**3), -3.0 * lam**2, -2.0 * lam]], lam)
        h = h[..., None, None]
        total = jnp.eye(self.size, dtype=lam.dtype) + nilpotent * h
        if self.order == 5:
            total = total + small_matmul(nilpotent, nilpotent) * (h * h / 2.0)
        return jnp.exp(-lam * h) * total

    def process_noise(self, h):
        a = self.transition(h)
        stationary = self.stationary_covariance()
        return stationary - small_matmul(small_matmul(a, stationary), jnp.swapaxes(a, -1, -2))

    def initial(self, t):
        return jnp.broadcast_to(self.stationary_covariance(), (*jnp.shape(t), self.size, self.size))

    def _scale(self):
        """``σ Λ`` as a column of row scales, ``Λ = diag(1, λ, λ², …)``: ``s = Λ ŝ`` maps the
        unit-rate state ``ŝ`` (``λ = 1``, ``σ = 1``) to this one."""
        lam = self.rate()
        return jnp.sqrt(self.variance) * jnp.stack([lam**i for i in range(self.size)])[:, None]

    def process_noise_factor(self, h):
        """``L`` with ``L Lᵀ = Q(h) = σ² Λ Q̂(λh) Λ``, each entry to full relative accuracy."""
        t = self.rate() * h
        unit = _UNIT_MATERN[self.order]
        small = unit.series_factor(jnp.minimum(t, _SERIES_LIMIT))
        large = unit.direct_factor(jnp.maximum(t, _SERIES_LIMIT))
        factor = jnp.where((t < _SERIES_LIMIT)[..., None, None], small, large)
        return self._scale() * factor

    def stationary_factor(self):
        factor = jnp.asarray(_UNIT_MATERN[self.order].stationary_factor, jnp.result_type(self.variance))
        return self._scale() * factor

    def scaled(self, scale):
        return dataclasses.replace(self, variance=scale * self.variance)

    def may_kink(self) -> bool:
        return False

    def cotangent_from_marginals(self, value_term, slope_term, x):
        """``∂L/∂v = (1/2v) Σ_i [z_i·E f_c(x_i) − tr(Λ_i Cov(f_c(x_i), f(x_i)|y))]`` and
        ``∂L/∂ℓ = −(1/ℓ) Σ_i (x_i − x̄) [z_i·E f'_c(x_i) − tr(Λ_i Cov(f'_c(x_i), f(x_i)|y))]``: the
        variance scales the block's covariance, the lengthscale its time (``docs/math.md``)."""
        variance_bar = jnp.sum(value_term) / (2.0 * self.variance)
        lengthscale_bar = -jnp.sum((x - jnp.mean(x)) * slope_term) / self.lengthscale
        return MaternBlock(variance_bar, lengthscale_bar, self.order)


#: Below this ``λh`` the Matérn process-noise factor comes from the Taylor series (18 terms in
#: float32, 24 in float64), above it from ``P∞ − A P∞ Aᵀ``; at the switch both are accurate to
#: a few units of rounding (scaled entries, measured against 50-digit arithmetic).
_SERIES_LIMIT = 0.8


#: Taylor terms of the scaled process noise ``Q̃(t)`` per dtype (measured: a few units of rounding).
_SERIES_TERMS = {np.dtype("float32"): 18, np.dtype("float64"): 24}


def _scaled_series_factor(scaled, t):
    """``√t · diag(t^{size−1−a}) · chol(Σ_j scaled[j] tʲ)``: the factor of ``Q̂(t)`` from the
    Taylor coefficients of its scaled form (``terms, size, size``), by Horner in ``t``."""
    size = scaled.shape[-1]
    series = jnp.zeros((*t.shape, size, size), t.dtype)
    for j in reversed(range(scaled.shape[0])):
        series = series * t[..., None, None] + scaled[j]
    rows = jnp.stack([t ** (size - 1 - a) for a in range(size)], axis=-1)[..., :, None]
    return _safe_sqrt(t)[..., None, None] * rows * cholesky(series)


class _UnitMatern:
    """The Matérn SDE with ``λ = 1``, ``σ = 1``: ``F₀`` (companion matrix of ``(D + 1)^size``),
    ``P̂∞`` and the spectral density ``q̂`` of the white noise driving the last state."""

    def __init__(self, order):
        self.size = size = (order + 1) // 2
        self.drift = np.zeros((size, size))
        self.drift[np.arange(size - 1), np.arange(1, size)] = 1.0
        self.drift[-1] = -np.array([math.comb(size, j) for j in range(size)], float)
        self.diffusion = {3: 4.0, 5: 16.0 / 3.0}[order]
        self.stationary = {
            3: np.eye(2),
            5: np.array([[1.0, 0.0, -1.0 / 3.0], [0.0, 1.0 / 3.0, 0.0], [-1.0 / 3.0, 0.0, 1.0]]),
        }[order]
        self.stationary_factor = np.linalg.cholesky(self.stationary)
        # Taylor coefficients of Q̂(t) = Σ_m C_m t^m: with g_j = F₀^j e_last,
        # C_m = q̂ Σ_{j+l=m−1} g_j g_lᵀ / (j! l! m). Entry (a, b) starts at t^{r_ab},
        # r_ab = 2·size − 1 − a − b; the scaled Q̃_ab(t) = Q̂_ab(t) / t^{r_ab} keeps terms from there.
        terms = 24
        powers = [np.linalg.matrix_power(self.drift, j)[:, -1] for j in range(2 * size + terms)]
        coefficients = np.zeros((2 * size + terms, size, size))
        for m in range(1, 2 * size + terms):
            for j in range(m):
                coefficients[m] += np.outer(powers[j], powers[m - 1 - j]) / (
                    math.factorial(j) * math.factorial(m - 1 - j) * m
                )
        coefficients *= self.diffusion
        a, b = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        start = 2 * size - 1 - a - b
        self.scaled = np.stack([coefficients[start + j, a, b] for j in range(terms)])  # (terms, size, size)

    def series_factor(self, t):
        """``√t · diag(t^{size−1−a}) · chol(Q̃(t))`` for small ``t``: exact at ``t = 0`` (zero), and
        accurate entry by entry because ``Q̃`` is well conditioned for all such ``t``."""
        terms = _SERIES_TERMS.get(np.dtype(t.dtype), 20)
        return _scaled_series_factor(jnp.asarray(self.scaled[:terms], t.dtype), t)

    def direct_factor(self, t):
        """``chol(P̂∞ − Â P̂∞ Âᵀ)`` with ``Â = e^{F₀t}``, for larger ``t``."""
        dtype = t.dtype
        nilpotent = jnp.asarray(self.drift + np.eye(self.size), dtype)
        power = jnp.eye(self.size, dtype=dtype)
        total = jnp.zeros((*t.shape, self.size, self.size), dtype)
        for j in range(self.size):
            total = total + power * (t**j / math.factorial(j))[..., None, None]
            power = power @ nilpotent
        a = jnp.exp(-t)[..., None, None] * total
        stationary = jnp.asarray(self.stationary, dtype)
        noise = stationary - small_matmul(small_matmul(a, stationary), jnp.swapaxes(a, -1, -2))
        return cholesky(noise, semidefinite=True)


_UNIT_MATERN = {3: _UnitMatern(3), 5: _UnitMatern(5)}


# ------------------------------------------------------- stationary components


@pytree_dataclass
class Matern12Block(StationaryBlock):
    """Matérn 1/2: ``f' = −λ f + w``, ``λ = 1/ℓ``; ``A = e^{−λh}``, ``Q = σ²(1 − e^{−2λh})``."""

    variance: Array
    lengthscale: Array

    size: ClassVar[int] = 1

    def transition(self, h):
        return jnp.exp(-h / self.lengthscale)[..., None, None]

    def process_noise(self, h):
        return -self.variance * jnp.expm1(-2.0 * h / self.lengthscale)[..., None, None]

    def process_noise_factor(self, h):
        return jnp.sqrt(self.process_noise(h))

    def stationary_covariance(self):
        return jnp.reshape(self.variance, (1, 1))

    def stationary_factor(self):
        return jnp.reshape(jnp.sqrt(self.variance), (1, 1))

    def scaled(self, scale):
        return dataclasses.replace(self, variance=scale * self.variance)


@pytree_dataclass
class CosineBlock(StationaryBlock):
    """The cosine kernel's 2-state rotation: ``A(h)`` rotates by ``ωh``, ``Q = 0``, ``P∞ = σ² I``."""

    variance: Array
    period: Array

    size: ClassVar[int] = 2

    def transition(self, h):
        angle = 2.0 * jnp.pi / self.period * h
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        return _matrix([[cos, sin], [-sin, cos]], h)

    def process_noise(self, h):
        return jnp.zeros((*jnp.shape(h), 2, 2), jnp.result_type(h, self.variance))

    process_noise_factor = process_noise

    def stationary_covariance(self):
        return self.variance * jnp.eye(2, dtype=jnp.result_type(self.variance))

    def stationary_factor(self):
        return jnp.sqrt(self.variance) * jnp.eye(2, dtype=jnp.result_type(self.variance))

    def scaled(self, scale):
        return dataclasses.replace(self, variance=scale * self.variance)

    def may_kink(self) -> bool:
        return False


@pytree_dataclass
class SHOBlock(StationaryBlock):
    """The SHO: state ``(f, f')``, ``F = [[0, 1], [−ω², −ω/Q]]``, ``P∞ = σ² diag(1, ω²)``,
    ``A(h) = e^{−γh} [[c + γs, s], [−ω²s, c − γs]]`` (``gpgrad_jax._kernels.damped_oscillation``)."""

    sigma: Array
    omega: Array
    quality: Array

    size: ClassVar[int] = 2
    slope_entry: ClassVar[int | None] = 1

    def _unit_transition(self, t):
        """``A`` of the oscillator with ``ω = 1`` at ``t = ωh``."""
        damping = 0.5 / self.quality
        cos, sin = kernels.damped_oscillation(damping, 1.0 - damping**2, t)
        return _matrix([[cos + damping * sin, sin], [-sin, cos - damping * sin]], t)

    def _scale(self):
        """``σ diag(1, ω)`` as a column: ``s = diag(σ, σω) ŝ`` maps the unit oscillator to this one."""
        return self.sigma * jnp.stack([jnp.ones_like(self.omega), self.omega])[:, None]

    def transition(self, h):
        unit = self._unit_transition(self.omega * h)
        scale = jnp.stack([jnp.ones_like(self.omega), self.omega])
        return unit * scale[:, None] / scale[None, :]

    def stationary_covariance(self):
        return self.sigma**2 * jnp.diag(jnp.stack([jnp.ones_like(self.omega), self.omega**2]))

    def stationary_factor(self):
        return jnp.abs(self.sigma) * jnp.diag(jnp.stack([jnp.ones_like(self.omega), self.omega]))

    def process_noise(self, h):
        a = self.transition(h)
        stationary = self.stationary_covariance()
        return stationary - small_matmul(small_matmul(a, stationary), jnp.swapaxes(a, -1, -2))

    def process_noise_factor(self, h):
        """Each entry to full relative accuracy: the scaled Taylor series of the unit
        oscillator's ``Q̂(t)`` for ``t·max(1, 1/Q) < 0.8``, ``chol(I − Â Âᵀ)`` beyond."""
        t = self.omega * h
        reach = t * jnp.maximum(1.0, 1.0 / self.quality)
        drift = _matrix([[0.0, 1.0], [-1.0, -1.0 / self.quality]], self.quality)
        near = reach < _SERIES_LIMIT
        small = _companion_series_factor(drift, 2.0 / self.quality, jnp.where(near, t, 0.0))
        a = self._unit_transition(jnp.where(near, 1.0, t))
        large = cholesky(jnp.eye(2, dtype=a.dtype) - small_matmul(a, jnp.swapaxes(a, -1, -2)), semidefinite=True)
        return self._scale() * jnp.where(near[..., None, None], small, large)

    def scaled(self, scale):
        return dataclasses.replace(self, sigma=jnp.sqrt(scale) * self.sigma)

    def may_kink(self) -> bool:
        return False


def _companion_series_factor(drift, diffusion, t):
    """``_UnitMatern.series_factor`` for a companion-form drift given as a (traced) array: the
    Taylor coefficients of ``Q̂(t)`` are formed in JAX, so they follow the parameters."""
    size = drift.shape[-1]
    dtype = drift.dtype
    terms = _SERIES_TERMS.get(np.dtype(dtype), 24)
    last = jnp.zeros(size, dtype).at[-1].set(1.0)
    powers = [last]
    for _ in range(2 * size + terms):
        powers.append(drift @ powers[-1])
    a, b = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    start = 2 * size - 1 - a - b

    def coefficient(m):  # C_m = q̂ Σ_{j+l=m−1} g_j g_lᵀ / (j! l! m)
        total = sum(jnp.outer(powers[j], powers[m - 1 - j]) / float(math.factorial(j) * math.factorial(m - 1 - j)) for j in range(m))
        return diffusion * total / m

    table = jnp.stack([coefficient(m) for m in range(1, 2 * size + terms)])  # C_1 … C_{2·size+terms−1}
    return _scaled_series_factor(jnp.stack([table[start + j - 1, a, b] for j in range(terms)]), t)


def _kron(a, b):
    """``a ⊗ b`` for batches of small matrices (``..., i, j`` and ``..., k, l``)."""
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    shape = out.shape
    return out.reshape(*shape[:-4], shape[-4] * shape[-3], shape[-2] * shape[-1])


@pytree_dataclass
class ProductBlock(StationaryBlock):
    """The product ``k₁ k₂`` of two stationary blocks: state ``s₁ ⊗ s₂``, ``A = A₁ ⊗ A₂``,
    ``P∞ = P₁ ⊗ P₂``, ``H = H₁ ⊗ H₂`` (the first entry when both read their first), and
    ``Q = P∞ − A P∞ Aᵀ = Q₁ ⊗ (A₂P₂A₂ᵀ) + P₁ ⊗ Q₂`` — a sum of two positive semi-definite
    terms, so its factor ``tria([L₁ ⊗ A₂S₂, S₁ ⊗ L₂])`` is as accurate as the blocks' own."""

    first: Any
    second: Any

    @property
    def size(self):
        return self.first.size * self.second.size

    def observation(self):
        """``H₁ ⊗ H₂`` when a factor reads other than its first entry (``None``: both do)."""
        reads = [block.observation() for block in (self.first, self.second)]
        if all(read is None for read in reads):
            return None
        first, second = (
            jnp.eye(block.size)[0] if read is None else jnp.asarray(read) for block, read in zip((self.first, self.second), reads)
        )
        return (first[:, None] * second[None, :]).reshape(-1)

    def transition(self, h):
        return _kron(self.first.transition(h), self.second.transition(h))

    def stationary_covariance(self):
        return _kron(self.first.stationary_covariance(), self.second.stationary_covariance())

    def stationary_factor(self):
        return _kron(self.first.stationary_factor(), self.second.stationary_factor())

    def _kept(self, h):
        """``A₂ P₂ A₂ᵀ``: the part of the second block's variance that survives a step."""
        a2 = self.second.transition(h)
        return small_matmul(small_matmul(a2, self.second.stationary_covariance()), jnp.swapaxes(a2, -1, -2))

    def process_noise(self, h):
        p1 = jnp.broadcast_to(self.first.stationary_covariance(), (*jnp.shape(h), self.first.size, self.first.size))
        return _kron(self.first.process_noise(h), self._kept(h)) + _kron(p1, self.second.process_noise(h))

    def process_noise_factor(self, h):
        batch = jnp.shape(h)
        s1 = jnp.broadcast_to(self.first.stationary_factor(), (*batch, self.first.size, self.first.size))
        s2 = jnp.broadcast_to(self.second.stationary_factor(), (*batch, self.second.size, self.second.size))
        kept = small_matmul(self.second.transition(h), s2)
        joint = jnp.concatenate([_kron(self.first.process_noise_factor(h), kept), _kron(s1, self.second.process_noise_factor(h))], axis=-1)
        return triangularize(joint)[..., : self.size]

    def scaled(self, scale):
        return dataclasses.replace(self, first=self.first.scaled(scale))

    def may_kink(self) -> bool:
        return self.first.may_kink() or self.second.may_kink()

    def cotangent_from_steps(self, a_bar, q_bar, steps, first):
        """By the product rule on the factors, in closed form: ``A = A₁ ⊗ A₂``,
        ``Q = Q₁ ⊗ K₂ + P₁ ⊗ Q₂`` (``K₂ = A₂P₂A₂ᵀ``), prior ``P₁ ⊗ P₂``; then one ``jax.vjp`` per
        factor (of its own small functions, not of the products')."""
        k1, k2 = self.first.size, self.second.size
        (a1, q1, p1), vjp1 = jax.vjp(_factor_steps, self.first, steps)
        (a2, q2, p2), vjp2 = jax.vjp(_factor_steps, self.second, steps)
        step_a, step_q, prior = a_bar[1:], q_bar[1:], q_bar[0]
        kept = small_matmul(small_matmul(a2, p2), _t(a2))
        a1_bar = _contract(step_a, a2, k1, k2, True)
        a2_bar = _contract(step_a, a1, k1, k2, False)
        q1_bar = _contract(step_q, kept, k1, k2, True)
        kept_bar = _contract(step_q, q1, k1, k2, False)
        q2_bar = _contract(step_q, jnp.broadcast_to(p1, q1.shape), k1, k2, False)
        p1_bar = jnp.sum(_contract(step_q, q2, k1, k2, True), axis=0) + _contract(prior, p2, k1, k2, True)
        # K₂ = A₂ P₂ A₂ᵀ with P₂ symmetric.
        a2_bar = a2_bar + small_matmul(small_matmul(kept_bar + _t(kept_bar), a2), p2)
        p2_bar = jnp.sum(small_matmul(small_matmul(_t(a2), kept_bar), a2), axis=0) + _contract(prior, p1, k1, k2, False)
        first_bar, _ = vjp1((a1_bar, q1_bar, p1_bar))
        second_bar, _ = vjp2((a2_bar, q2_bar, p2_bar))
        return ProductBlock(first_bar, second_bar)


def _t(a):
    return jnp.swapaxes(a, -1, -2)


def _factor_steps(block, steps):
    return block.transition(steps), block.process_noise(steps), block.stationary_covariance()


def _contract(bar, other, k1, k2, keep_first):
    """For ``M = X ⊗ Y`` with cotangent ``bar`` (``…, k1·k2, k1·k2``): ``X̄ = Σ bar ⊙ Y`` over
    ``Y``'s indices (``keep_first``) or ``Ȳ = Σ bar ⊙ X`` over ``X``'s — broadcast products and
    sums, not dots (see ``small_matmul``)."""
    split = bar.reshape(*bar.shape[:-2], k1, k2, k1, k2)
    if keep_first:
        return jnp.sum(split * other[..., None, :, None, :], axis=(-3, -1))
    return jnp.sum(split * other[..., :, None, :, None], axis=(-4, -2))


@pytree_dataclass
class ScaledBlock(Block):
    """A registered block times a constant ``c`` (covariances ``c·``, factors ``√c·``)."""

    block: Any
    scale: Array

    @property
    def size(self):
        return self.block.size

    @property
    def slope_entry(self):
        return self.block.slope_entry

    def observation(self):
        return self.block.observation()

    def transition(self, h):
        return self.block.transition(h)

    def process_noise(self, h):
        return self.scale * self.block.process_noise(h)

    def initial(self, t):
        return self.scale * self.block.initial(t)

    def process_noise_factor(self, h):
        return jnp.sqrt(self.scale) * self.block.process_noise_factor(h)

    def initial_factor(self, t):
        return jnp.sqrt(self.scale) * self.block.initial_factor(t)

    def stationary_covariance(self):
        return self.scale * self.block.stationary_covariance()

    def scaled(self, scale):
        return ScaledBlock(self.block, scale * self.scale)

    def may_kink(self) -> bool:
        return self.block.may_kink()

    def kink_slope(self):
        return self.scale * self.block.kink_slope()


@functools.singledispatch
def blocks_of(kernel: kernels.Kernel) -> tuple:
    """The state-space blocks of ``kernel`` (see the module docstring), as registered; raises
    ``NoStateSpaceForm`` naming the kernel when it has none. ``model_blocks`` checks them.

    Examples:
        >>> from gpgrad_jax import kernels
        >>> [type(b).__name__ for b in blocks_of(kernels.CubicSpline(1.0) + kernels.Matern32(1.0, 0.5))]
        ['CurveBlock', 'MaternBlock']
    """
    raise NoStateSpaceForm(
        f"kernel {type(kernel).__name__} has no state-space form, so solver='markov' cannot use it; "
        "Markov kernels are CubicSpline, Linear, Constant, Matern12, Matern32, Matern52, SHO, Cosine, "
        "their sums, products of the stationary ones and c * k (register your own with "
        "gpgrad_jax.state_space.register). Use solver='dense' (or 'auto', which falls back to it)."
    )


def _polynomial(variance, part):
    variance = jnp.asarray(variance)
    parts = [jnp.zeros_like(variance)] * 3
    parts[part] = variance
    return (CurveBlock(*parts),)


@blocks_of.register
def _(kernel: kernels.CubicSpline):
    return _polynomial(kernel.variance, 0)


@blocks_of.register
def _(kernel: kernels.Linear):
    return _polynomial(kernel.variance, 1)


@blocks_of.register
def _(kernel: kernels.Constant):
    return _polynomial(kernel.variance, 2)


def _matern_lengthscale(kernel):
    lengthscale = jnp.asarray(kernel.lengthscale)
    if lengthscale.size != 1:
        raise NoStateSpaceForm(
            f"kernel {type(kernel).__name__} with a lengthscale of shape {lengthscale.shape} has no "
            "state-space form: the Markov solvers take scalar indices and a scalar lengthscale"
        )
    return lengthscale.reshape(())


@blocks_of.register
def _(kernel: kernels.Matern12):
    return (Matern12Block(jnp.asarray(kernel.variance), _matern_lengthscale(kernel)),)


@blocks_of.register
def _(kernel: kernels.SHO):
    return (SHOBlock(jnp.asarray(kernel.sigma), jnp.asarray(kernel.omega), jnp.asarray(kernel.quality)),)


@blocks_of.register
def _(kernel: kernels.Cosine):
    return (CosineBlock(jnp.asarray(kernel.variance), jnp.asarray(kernel.period)),)


@blocks_of.register
def _(kernel: kernels.Matern32):
    return (MaternBlock(jnp.asarray(kernel.variance), _matern_lengthscale(kernel), 3),)


@blocks_of.register
def _(kernel: kernels.Matern52):
    return (MaternBlock(jnp.asarray(kernel.variance), _matern_lengthscale(kernel), 5),)


@blocks_of.register
def _(kernel: kernels.Sum):
    blocks = blocks_of(kernel.k1) + blocks_of(kernel.k2)
    merged = [b for b in blocks if not isinstance(b, CurveBlock)]
    curves = [b for b in blocks if isinstance(b, CurveBlock)]  # one curve block: they share (f, f')
    if curves:
        merged.insert(0, CurveBlock(*(sum(parts) for parts in zip(*(c.parts() for c in curves)))))
    return tuple(merged)


@blocks_of.register
def _(kernel: kernels.Product):
    for scale, other in ((kernel.k1, kernel.k2), (kernel.k2, kernel.k1)):
        if isinstance(scale, kernels.Constant):
            return tuple(block.scaled(scale.variance) for block in blocks_of(other))
    # (Σ_a k_a)(Σ_b k_b) = Σ_ab k_a k_b: one product block per pair.
    firsts, seconds = blocks_of(kernel.k1), blocks_of(kernel.k2)
    for block in firsts + seconds:
        if not isinstance(block, StationaryBlock):
            raise NoStateSpaceForm(
                f"kernel Product({type(kernel.k1).__name__}, {type(kernel.k2).__name__}) has no "
                f"state-space form here: its factor with the {type(block).__name__} is not "
                "stationary (the curve kernels CubicSpline and Linear, or a Constant inside a sum); "
                "products of stationary kernels (Matern12/32/52, SHO, Cosine, their sums and products) "
                "are Markov. Use solver='dense'."
            )
    return tuple(ProductBlock(a, b) for a in firsts for b in seconds)


@pytree_dataclass
class ReadOutBlock(Block):
    """A block with a read-out ``H ≠ e₀``, in the basis ``s̃ = T s`` whose first entry is ``f``
    (``T`` the identity with ``H`` as its first row, ``H[0] ≠ 0``): ``Ã = T A T⁻¹``,
    ``Q̃ = T Q Tᵀ``, initial covariance ``T P Tᵀ``."""

    block: Any

    @property
    def size(self):
        return self.block.size

    def _basis(self):
        read = jnp.asarray(self.block.observation())
        eye = jnp.eye(self.size, dtype=read.dtype)
        forward = eye.at[0].set(read)
        inverse = eye.at[0].set(jnp.concatenate([jnp.ones(1, read.dtype), -read[1:]]) / read[0])
        return forward, inverse

    def transition(self, h):
        forward, inverse = self._basis()
        return forward @ self.block.transition(h) @ inverse

    def _congruence(self, m):
        forward, _ = self._basis()
        return forward @ m @ forward.T

    def process_noise(self, h):
        return self._congruence(self.block.process_noise(h))

    def initial(self, t):
        return self._congruence(self.block.initial(t))

    def process_noise_factor(self, h):
        return self._basis()[0] @ self.block.process_noise_factor(h)

    def initial_factor(self, t):
        return self._basis()[0] @ self.block.initial_factor(t)

    def stationary_covariance(self):
        return self._congruence(self.block.stationary_covariance())

    def may_kink(self) -> bool:
        return self.block.may_kink()

    def kink_slope(self):
        return StationaryBlock.kink_slope(self)  # in this basis: f is the first entry


def model_blocks(kernel) -> tuple:
    """``blocks_of(kernel)``, checked, with every block reading ``f`` as its first entry: what the
    Markov solvers build from a kernel, once per call."""
    blocks = blocks_of(kernel)
    if not isinstance(blocks, tuple) or not blocks:
        raise TypeError(
            f"the state-space form of {type(kernel).__name__} must be a non-empty tuple of blocks, got {blocks!r}"
        )
    out = []
    for block in blocks:
        if not isinstance(block, Block):
            raise TypeError(
                f"the state-space form of {type(kernel).__name__} holds a {type(block).__name__}; its "
                "blocks must subclass gpgrad_jax.state_space.Block"
            )
        out.append(block if block.observation() is None else ReadOutBlock(block))
    return tuple(out)
