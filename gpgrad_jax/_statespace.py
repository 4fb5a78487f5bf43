r"""State-space (Markov) forms of the kernels that have one, kept apart from the kernel classes.

A kernel is Markov when ``f`` is the first entry of the state of a linear SDE whose state
also holds ``f'``.  For such kernels the Kalman filter and smoother of ``gpgrad_jax._markov``
give the likelihood and its gradient in O(n).  ``state_space`` maps a kernel to a tuple
of *components*, one state block each, stacked block-diagonally (``f`` is the sum of the
blocks' first entries):

* ``Polynomial`` — ``CubicSpline(σ²) + Linear(σ_l²) + Constant(σ_c²)`` as **one**
  2-state block ``s = (f, f')`` (an integrated Wiener process started at index 0 from
  ``s(0) ~ N(0, diag(σ_c², σ_l²))``): ``A(h) = [[1, h], [0, 1]]``,
  ``Q(h) = σ² [[h³/3, h²/2], [h²/2, h]]``; there is no stationary covariance.
* ``Matern`` — Matérn 3/2 (2 states) or 5/2 (3 states), ``λ = √(2ν)/ℓ``:
  ``A(h) = e^{−λh} Σ_j (F + λI)^j h^j / j!`` (``F + λI`` is nilpotent), ``Q(h) = P∞ − A P∞ Aᵀ``.

Each component also gives square roots of its covariances for the square-root solvers:
``process_noise_factor(h)`` (``L`` with ``L Lᵀ = Q(h)``) and ``initial_factor(t)``. They are
computed to full *relative* accuracy in every entry, not from ``Q(h)`` itself: for a Matérn
block ``P∞ − A P∞ Aᵀ`` cancels, its first entry being ``O((λh)^{2·size−1})`` while ``P∞`` is
``O(1)`` (float32, Matérn 5/2, ``λh = 0.01``: relative error 2e3); for ``λh < 0.8`` the factor
comes from the Taylor series of ``Q = ∫₀ʰ e^{Fτ} L q Lᵀ e^{Fᵀτ} dτ``, scaled so that it stays
well conditioned as ``h → 0``.

Sums merge their polynomial parts and stack the rest; ``c * k`` (a product with a
[``Constant``][gpgrad_jax.kernels.Constant]) scales every variance.  Other kernels (the squared
exponential, products of two non-constant kernels, kernels written by users) have no
registered form and ``state_space`` raises ``NoStateSpaceForm``; register one with
``state_space.register(MyKernel)``.

Components are small dataclass pytrees of their effective parameters, so the solver's
cotangents for them map back to the kernel's leaves with one ``jax.vjp`` of
``state_space``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from gpgrad_jax import _kernels as kernels
from gpgrad_jax._pytree import pytree_dataclass
from gpgrad_jax._smallmatrix import cholesky, small_matmul, triangularize

Array = Any


class NoStateSpaceForm(ValueError):
    """The kernel has no state-space form, so the Markov solvers cannot use it."""


def _matrix(rows, like):
    """A small matrix from nested lists of scalars (numbers or arrays broadcast to ``like``)."""
    entry = lambda v: jnp.broadcast_to(jnp.asarray(v, like.dtype), like.shape)  # noqa: E731
    return jnp.stack([jnp.stack([entry(v) for v in row], -1) for row in rows], -2)


@pytree_dataclass
class Polynomial:
    """``CubicSpline(cubic) + Linear(linear) + Constant(constant)`` as one 2-state block."""

    cubic: Array
    linear: Array
    constant: Array

    size: ClassVar[int] = 2

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


def _safe_sqrt(v):
    """``√v`` for ``v ≥ 0``, with a zero (not infinite) derivative at ``v = 0``."""
    positive = v > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, v, 1.0)), 0.0)


def unit_cubic_noise(h):
    """``[[h³/3, h²/2], [h²/2, h]]``: the process noise of a unit-variance integrated Wiener process."""
    h2 = h * h
    return _matrix([[h2 * h / 3.0, h2 / 2.0], [h2 / 2.0, h]], h)


@pytree_dataclass(static=("order",))
class Matern:
    """A Matérn-``order/2`` block (``order`` 3 or 5) with variance and lengthscale."""

    variance: Array
    lengthscale: Array
    order: int

    @property
    def size(self):
        return (self.order + 1) // 2

    def rate(self):
        """``λ = √order / ℓ``."""
        return jnp.sqrt(jnp.asarray(float(self.order), jnp.result_type(self.lengthscale))) / self.lengthscale

    def stationary(self):
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
        stationary = self.stationary()
        return stationary - small_matmul(small_matmul(a, stationary), jnp.swapaxes(a, -1, -2))

    def initial(self, t):
        return jnp.broadcast_to(self.stationary(), (*jnp.shape(t), self.size, self.size))

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

    def initial_factor(self, t):
        factor = jnp.asarray(_UNIT_MATERN[self.order].stationary_factor, jnp.result_type(self.variance))
        return jnp.broadcast_to(self._scale() * factor, (*jnp.shape(t), self.size, self.size))


#: Below this ``λh`` the Matérn process-noise factor comes from the Taylor series (18 terms in
#: float32, 24 in float64), above it from ``P∞ − A P∞ Aᵀ``; at the switch both are accurate to
#: a few units of rounding (scaled entries, measured against 50-digit arithmetic).
_SERIES_LIMIT = 0.8


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
        self.scaled_terms = {np.dtype("float32"): 18, np.dtype("float64"): 24}

    def series_factor(self, t):
        """``√t · diag(t^{size−1−a}) · chol(Q̃(t))`` for small ``t``: exact at ``t = 0`` (zero), and
        accurate entry by entry because ``Q̃`` is well conditioned for all such ``t``."""
        dtype = t.dtype
        terms = self.scaled_terms.get(np.dtype(dtype), 20)
        coefficients = jnp.asarray(self.scaled[:terms], dtype)
        scaled = jnp.zeros((*t.shape, self.size, self.size), dtype)
        for j in reversed(range(terms)):  # Horner in t
            scaled = scaled * t[..., None, None] + coefficients[j]
        rows = jnp.stack([t ** (self.size - 1 - a) for a in range(self.size)], axis=-1)[..., :, None]
        return _safe_sqrt(t)[..., None, None] * rows * cholesky(scaled)

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


@functools.singledispatch
def state_space(kernel: kernels.Kernel) -> tuple:
    """The state-space components of ``kernel`` (see the module docstring).

    Raises ``NoStateSpaceForm`` naming the kernel when it has none.

    Examples:
        >>> from gpgrad_jax import kernels
        >>> from gpgrad_jax._statespace import state_space
        >>> [type(c).__name__ for c in state_space(kernels.CubicSpline(1.0) + kernels.Matern32(1.0, 0.5))]
        ['Polynomial', 'Matern']
    """
    raise NoStateSpaceForm(
        f"kernel {type(kernel).__name__} has no state-space form, so solver='markov' cannot use it; "
        "Markov kernels are CubicSpline, Linear, Constant, Matern32, Matern52, their sums and "
        "their products with a Constant. Use solver='dense' (or 'auto', which falls back to it)."
    )


def _polynomial(variance, part):
    variance = jnp.asarray(variance)
    parts = [jnp.zeros_like(variance)] * 3
    parts[part] = variance
    return (Polynomial(*parts),)


@state_space.register
def _(kernel: kernels.CubicSpline):
    return _polynomial(kernel.variance, 0)


@state_space.register
def _(kernel: kernels.Linear):
    return _polynomial(kernel.variance, 1)


@state_space.register
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


@state_space.register
def _(kernel: kernels.Matern32):
    return (Matern(jnp.asarray(kernel.variance), _matern_lengthscale(kernel), 3),)


@state_space.register
def _(kernel: kernels.Matern52):
    return (Matern(jnp.asarray(kernel.variance), _matern_lengthscale(kernel), 5),)


@state_space.register
def _(kernel: kernels.Sum):
    merged = [c for c in state_space(kernel.k1) + state_space(kernel.k2) if not isinstance(c, Polynomial)]
    polynomials = [c for c in state_space(kernel.k1) + state_space(kernel.k2) if isinstance(c, Polynomial)]
    if polynomials:
        total = Polynomial(*(sum(parts) for parts in zip(*(p.parts() for p in polynomials))))
        merged.insert(0, total)
    return tuple(merged)


@state_space.register
def _(kernel: kernels.Product):
    for scale, other in ((kernel.k1, kernel.k2), (kernel.k2, kernel.k1)):
        if isinstance(scale, kernels.Constant):
            return tuple(_scaled(c, scale.variance) for c in state_space(other))
    raise NoStateSpaceForm(
        f"kernel Product({type(kernel.k1).__name__}, {type(kernel.k2).__name__}) has no state-space "
        "form: only products with a Constant (c * k) are Markov here. Use solver='dense'."
    )


def _scaled(component, scale):
    if isinstance(component, Polynomial):
        return Polynomial(*(scale * v for v in component.parts()))
    return dataclasses.replace(component, variance=scale * component.variance)
