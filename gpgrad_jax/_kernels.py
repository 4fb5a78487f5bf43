"""Covariance kernels as small pytrees, each with a hand-derived derivative.

Every kernel evaluates ``k(a, b)`` on *single* index points (a scalar, or a
vector of length ``d``) and supplies ``grad_first(a, b) = ∂k(a, b)/∂a`` — the
row of ``Δ`` in the index gradient — in closed form.  The closed form is exact and finite at
``a == b`` (where an autodiff through ``sqrt(‖a − b‖²)`` would give NaN), and
is what the custom VJP of the likelihood uses for the index-set gradient.

Kernels are registered dataclass pytrees: their parameters are leaves, so
``jax.grad`` returns a kernel-shaped cotangent and ``optax`` can update them.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from gpgrad_jax._pytree import pytree_dataclass

Array = Any

_SQRT3 = 3.0**0.5
_SQRT5 = 5.0**0.5


class Kernel(abc.ABC):
    """Abstract base: a positive semi-definite covariance $k(a, b)$.

    Subclasses implement [``evaluate``][gpgrad_jax.kernels.Kernel.evaluate] and [``grad_first``][gpgrad_jax.kernels.Kernel.grad_first] on single
    index points; [``matrix``][gpgrad_jax.kernels.Kernel.matrix] and [``grad_first_matrix``][gpgrad_jax.kernels.Kernel.grad_first_matrix] vectorise them.
    Kernels compose with ``+`` and ``*`` (also ``c * kernel`` for a scalar
    ``c > 0``, which becomes a [``Constant``][gpgrad_jax.kernels.Constant] factor with a learnable
    variance).

    Examples:
        >>> from gpgrad_jax import kernels
        >>> k = 2.0 * kernels.ExpSquared(variance=1.0, lengthscale=0.5) + kernels.Constant(0.1)
        >>> round(float(k.evaluate(0.3, 0.3)), 6)
        2.1
    """

    #: True for kernels defined only on scalar indices (e.g. the cubic spline).
    scalar_index_only: ClassVar[bool] = False
    #: True for kernels defined only on indices ``≥ 0`` (positions from a curve's start).
    nonnegative_index: ClassVar[bool] = False
    #: Names of the fields that must be strictly positive.
    positive_fields: ClassVar[tuple[str, ...]] = ()
    #: True for kernels of ``a − b`` alone, so that ``grad_first(b, a) = −grad_first(a, b)``: the
    #: inducing-point bound then reads the gradient in ``Z`` off the one in ``x``.
    stationary: ClassVar[bool] = False

    def is_stationary(self) -> bool:
        """Whether every part is a function of ``a − b`` alone (``stationary``)."""
        return all(part.stationary for part in self.parts())

    @abc.abstractmethod
    def evaluate(self, a: Array, b: Array) -> Array:
        """$k(a, b)$ for single index points ``a``, ``b`` (shape ``()`` or ``(d,)``)."""

    @abc.abstractmethod
    def grad_first(self, a: Array, b: Array) -> Array:
        r"""$\partial k(a, b) / \partial a$, hand-derived; same shape as ``a``."""

    def parts(self) -> list[Kernel]:
        """The elementary kernels this one is built from (itself unless composite)."""
        return [self]

    def requires_scalar_index(self) -> bool:
        """Whether any part of this kernel accepts scalar indices only."""
        return any(part.scalar_index_only for part in self.parts())

    def positive_parameters(self) -> dict[str, Array]:
        """Parameters that must be strictly positive, by dotted name."""
        return {name: getattr(self, name) for name in self.positive_fields}

    def parameter_shapes(self, index_shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The shapes each parameter may have for single indices of shape ``index_shape``
        (``()`` or ``(d,)``), by field name; fields not named are not checked."""
        return {}

    def check_index_shape(self, index_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if a parameter of any part does not fit indices of shape
        ``index_shape`` (an ARD lengthscale of the wrong length, a vector variance)."""
        for part in self.parts():
            for name, allowed in part.parameter_shapes(index_shape).items():
                shape = jnp.shape(getattr(part, name))
                if shape not in allowed:
                    want = " or ".join(map(str, dict.fromkeys(allowed)))
                    where = f"indices of shape (n, {index_shape[0]})" if index_shape else "scalar indices, `x` of shape (n,)"
                    raise ValueError(
                        f"`kernel`: {type(part).__name__}.{name} must have shape {want} for {where}, "
                        f"got shape {shape}"
                    )

    def matrix(self, x1: Array, x2: Array) -> Array:
        """Gram matrix ``K[i, j] = k(x1[i], x2[j])``, shape ``(n1, n2)``."""
        row = jax.vmap(self.evaluate, in_axes=(None, 0))
        return jax.vmap(row, in_axes=(0, None))(x1, x2)

    def grad_first_matrix(self, x1: Array, x2: Array) -> Array:
        """``Δ[i, j] = ∂k(x1[i], x2[j])/∂x1[i]``, shape ``(n1, n2)`` or ``(n1, n2, d)``."""
        row = jax.vmap(self.grad_first, in_axes=(None, 0))
        return jax.vmap(row, in_axes=(0, None))(x1, x2)

    def __add__(self, other: Kernel) -> Kernel:
        if not isinstance(other, Kernel):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, other: Any) -> Kernel:
        if isinstance(other, Kernel):
            return Product(self, other)
        return self.__rmul__(other)

    def __rmul__(self, other: Any) -> Kernel:
        if _is_scalar(other):
            return Product(Constant(variance=other), self)
        return NotImplemented


def register(cls: type) -> type:
    """Declare a custom kernel as the built-in ones are: a frozen dataclass pytree.

    Its annotated fields are the parameters — leaves that ``jax.grad`` differentiates and
    ``optax`` updates; ``jit`` and ``vmap`` see through it. Implement ``evaluate(a, b)`` and
    its derivative in the first argument, ``grad_first(a, b)``, on single index points
    (shape ``()`` or ``(d,)``), finite at ``a == b``. Check the pair with
    [``gpgrad_jax.testing.check_kernel``][gpgrad_jax.testing.check_kernel].

    Optionally: ``positive_fields`` (names checked ``> 0`` eagerly), ``parameter_shapes``
    (shapes checked eagerly), ``scalar_index_only``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from gpgrad_jax import kernels
        >>> @kernels.register
        ... class Periodic(kernels.Kernel):
        ...     variance: jnp.ndarray
        ...     period: jnp.ndarray
        ...     positive_fields = ("variance", "period")
        ...
        ...     def evaluate(self, a, b):
        ...         return self.variance * jnp.exp(-2.0 * jnp.sin(jnp.pi * (a - b) / self.period) ** 2)
        ...
        ...     def grad_first(self, a, b):
        ...         phase = jnp.pi * (a - b) / self.period
        ...         return -2.0 * jnp.pi / self.period * jnp.sin(2.0 * phase) * self.evaluate(a, b)
        >>> k = Periodic(1.0, 0.5) + kernels.Constant(0.1)
        >>> round(float(k.evaluate(0.2, 0.7)), 6)
        1.1
    """
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        raise TypeError(f"kernels.register takes a subclass of gpgrad_jax.kernels.Kernel, got {cls!r}")
    return pytree_dataclass(cls)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) or (hasattr(value, "shape") and value.shape == ())


# ---------------------------------------------------------------- composition


class _Composite(Kernel):
    """A kernel made of two others, the fields ``k1`` and ``k2`` of its dataclass subclasses."""

    def parts(self):
        return self.k1.parts() + self.k2.parts()

    def positive_parameters(self):
        merged = {f"k1.{name}": v for name, v in self.k1.positive_parameters().items()}
        merged.update({f"k2.{name}": v for name, v in self.k2.positive_parameters().items()})
        return merged


@pytree_dataclass
class Sum(_Composite):
    """$k(a, b) = k_1(a, b) + k_2(a, b)$."""

    k1: Kernel
    k2: Kernel

    def evaluate(self, a, b):
        return self.k1.evaluate(a, b) + self.k2.evaluate(a, b)

    def grad_first(self, a, b):
        return self.k1.grad_first(a, b) + self.k2.grad_first(a, b)


@pytree_dataclass
class Product(_Composite):
    r"""$k(a, b) = k_1(a, b)\, k_2(a, b)$; $\partial k / \partial a = k_1' k_2 + k_1 k_2'$."""

    k1: Kernel
    k2: Kernel

    def evaluate(self, a, b):
        return self.k1.evaluate(a, b) * self.k2.evaluate(a, b)

    def grad_first(self, a, b):
        return self.k1.grad_first(a, b) * self.k2.evaluate(a, b) + self.k1.evaluate(
            a, b
        ) * self.k2.grad_first(a, b)


# ------------------------------------------------------------- curve kernels


@pytree_dataclass
class CubicSpline(Kernel):
    r"""Integrated Wiener process (cubic spline) kernel on scalar indices $\geq 0$.

    $$
    k(a, b) = \sigma^2 \left( \frac{m^3}{3} + \lvert a - b \rvert \frac{m^2}{2} \right)
    \quad\text{with}\quad m = \min(a, b),
    $$

    and $\partial k / \partial a = \sigma^2 m \,(b - m/2)$ (continuous at ``a == b``).

    Examples:
        >>> from gpgrad_jax import kernels
        >>> round(float(kernels.CubicSpline(variance=3.0).evaluate(1.0, 1.0)), 6)
        1.0
    """

    variance: Array = 1.0
    scalar_index_only: ClassVar[bool] = True
    nonnegative_index: ClassVar[bool] = True
    positive_fields: ClassVar[tuple[str, ...]] = ("variance",)

    def parameter_shapes(self, index_shape):
        return {"variance": ((),)}

    def evaluate(self, a, b):
        # m³/3 + |a − b| m²/2 = M m²/2 − m³/6 with m = min, M = max.  Written as
        # one `where` (not `minimum`, whose autodiff splits the derivative ½/½
        # at a tie) so that autodiff through `evaluate` is exact at a == b too.
        lower, upper = jnp.where(a < b, a, b), jnp.where(a < b, b, a)
        return self.variance * (upper * lower**2 / 2.0 - lower**3 / 6.0)

    def grad_first(self, a, b):
        m = jnp.minimum(a, b)
        return self.variance * m * (b - m / 2.0)


@pytree_dataclass
class Linear(Kernel):
    r"""Linear (dot-product) kernel $k(a, b) = \sigma^2\, a \cdot b$; $\partial k / \partial a = \sigma^2 b$."""

    variance: Array = 1.0
    positive_fields: ClassVar[tuple[str, ...]] = ("variance",)

    def parameter_shapes(self, index_shape):
        return {"variance": ((),)}

    def evaluate(self, a, b):
        return self.variance * jnp.sum(a * b)

    def grad_first(self, a, b):
        return self.variance * jnp.broadcast_to(b, jnp.shape(a))


@pytree_dataclass
class Constant(Kernel):
    r"""Constant (offset) kernel $k(a, b) = \sigma^2$; $\partial k / \partial a = 0$."""

    variance: Array = 1.0
    positive_fields: ClassVar[tuple[str, ...]] = ("variance",)
    stationary: ClassVar[bool] = True

    def parameter_shapes(self, index_shape):
        return {"variance": ((),)}

    def evaluate(self, a, b):
        return self.variance * jnp.ones((), jnp.result_type(a, b))

    def grad_first(self, a, b):
        return jnp.zeros(jnp.shape(a), jnp.result_type(a, b, self.variance))


# -------------------------------------------------------- stationary kernels


def _scaled_sq_distance(a, b, lengthscale):
    diff = (a - b) / lengthscale
    return jnp.sum(diff * diff)


def _times_scaled_offset(weight, a, b, lengthscale):
    """``weight · (a − b)/ℓ²``, and exactly 0 where ``weight`` is 0.

    With a tiny lengthscale ``(a − b)/ℓ²`` can overflow while the kernel (hence
    ``weight``) underflows to 0; their product must be 0, not ``0 · inf = NaN``.
    """
    # Exactly 0 where a == b: under jit XLA may fold the two divisions into one by ℓ², which
    # underflows to 0 for a tiny ℓ, and 0/0 would be NaN. The branch taken there is still
    # (a − b)/ℓ² (with 1/ℓ² kept finite), so that its derivative — the kernel's second
    # derivative at a tie, which Hessians in the indices need — is not lost.
    inverse_square = 1.0 / lengthscale / lengthscale
    inverse_square = jnp.where(jnp.isfinite(inverse_square), inverse_square, 0.0)
    offset = jnp.where(a == b, (a - b) * inverse_square, (a - b) / lengthscale / lengthscale)
    return jnp.where(weight == 0, 0.0, weight * jnp.where(weight == 0, 0.0, offset))


def _far_apart(r):
    """``(r == inf, r with inf replaced by 0)``: the kernel is 0 there, not ``inf · 0 = NaN``."""
    far = jnp.isinf(r)
    return far, jnp.where(far, 0.0, r)


def _safe_sqrt(r2):
    # sqrt has an infinite derivative at 0; route the r2 == 0 branch through a
    # constant so that autodiff *through evaluate* stays finite as well.
    positive = r2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


@dataclasses.dataclass(frozen=True)
class _Stationary(Kernel):
    """Fields and distance shared by the stationary kernels: ``r = ‖a − b‖/ℓ``."""

    variance: Array = 1.0
    lengthscale: Array = 1.0
    positive_fields: ClassVar[tuple[str, ...]] = ("variance", "lengthscale")
    stationary: ClassVar[bool] = True

    def parameter_shapes(self, index_shape):
        return {"variance": ((),), "lengthscale": ((), index_shape)}  # scalar, or one per dimension (ARD)

    def _radius(self, a, b):
        """``(far, r)``: ``r`` with ``inf`` (lengthscale underflow) replaced by 0, flagged in ``far``."""
        return _far_apart(_safe_sqrt(_scaled_sq_distance(a, b, self.lengthscale)))


@pytree_dataclass
class ExpSquared(_Stationary):
    r"""Squared exponential kernel $k = \sigma^2 \exp(-r^2/2)$, $r = \lVert a - b \rVert / \ell$.

    $\partial k / \partial a = -k\, (a - b) / \ell^2$.  ``lengthscale`` is a scalar or, for
    $d$-dimensional indices, a length-$d$ vector (ARD).
    """

    def evaluate(self, a, b):
        return self.variance * jnp.exp(-0.5 * _scaled_sq_distance(a, b, self.lengthscale))

    def grad_first(self, a, b):
        return _times_scaled_offset(-self.evaluate(a, b), a, b, self.lengthscale)


@pytree_dataclass
class Matern32(_Stationary):
    r"""Matérn-3/2 kernel $k = \sigma^2 (1 + \sqrt{3}\, r) \exp(-\sqrt{3}\, r)$, $r = \lVert a - b \rVert / \ell$.

    $\partial k / \partial a = -3 \sigma^2 \exp(-\sqrt{3}\, r)\, (a - b) / \ell^2$ — finite (zero) at ``a == b``.
    """

    def evaluate(self, a, b):
        far, r = self._radius(a, b)
        return jnp.where(far, 0.0, self.variance * (1.0 + _SQRT3 * r) * jnp.exp(-_SQRT3 * r))

    def grad_first(self, a, b):
        r = _safe_sqrt(_scaled_sq_distance(a, b, self.lengthscale))
        return _times_scaled_offset(-3.0 * self.variance * jnp.exp(-_SQRT3 * r), a, b, self.lengthscale)


@pytree_dataclass
class Matern52(_Stationary):
    r"""Matérn-5/2 kernel $k = \sigma^2 (1 + \sqrt{5}\, r + 5 r^2 / 3) \exp(-\sqrt{5}\, r)$, $r = \lVert a - b \rVert / \ell$.

    $\partial k / \partial a = -\tfrac{5}{3} \sigma^2 (1 + \sqrt{5}\, r) \exp(-\sqrt{5}\, r)\, (a - b) / \ell^2$.
    """

    def evaluate(self, a, b):
        far, r = self._radius(a, b)
        polynomial = 1.0 + _SQRT5 * r + 5.0 * r**2 / 3.0
        return jnp.where(far, 0.0, self.variance * polynomial * jnp.exp(-_SQRT5 * r))

    def grad_first(self, a, b):
        far, r = self._radius(a, b)
        scale = jnp.where(far, 0.0, -(5.0 / 3.0) * self.variance * (1.0 + _SQRT5 * r) * jnp.exp(-_SQRT5 * r))
        return _times_scaled_offset(scale, a, b, self.lengthscale)


@pytree_dataclass
class Matern12(_Stationary):
    r"""Matérn-1/2 (exponential, Ornstein–Uhlenbeck) kernel $k = \sigma^2 \exp(-r)$, $r = \lVert a - b \rVert / \ell$.

    Its paths are continuous but nowhere differentiable, and $k$ has a kink at $a = b$:
    $\partial k / \partial a = -k\, (a - b) / (\ell^2 r)$ for $a \neq b$ and, by convention,
    **0 at** $a = b$ — the mean of the two one-sided derivatives $\pm\sigma^2/\ell$. The
    likelihood inherits the kink where indices tie; its gradient there is the mean of its
    one-sided derivatives, on every solver (see ``docs/math.md``, "Ties and kinks").

    Examples:
        >>> from gpgrad_jax import kernels
        >>> k = kernels.Matern12(variance=2.0, lengthscale=0.5)
        >>> round(float(k.evaluate(0.0, 0.5)), 6), float(k.grad_first(0.3, 0.3))
        (0.735759, 0.0)
    """

    def evaluate(self, a, b):
        far, r = self._radius(a, b)
        return jnp.where(far, 0.0, self.variance * jnp.exp(-r))

    def grad_first(self, a, b):
        far, r = self._radius(a, b)
        # −k (a − b)/(ℓ² r): the unit direction of a − b in the ℓ-metric, 0 at a == b (the mean).
        weight = jnp.where(far | (r == 0), 0.0, -self.variance * jnp.exp(-r) / jnp.where(r == 0, 1.0, r))
        return _times_scaled_offset(weight, a, b, self.lengthscale)


def _scalar_index(a, b, name):
    if jnp.ndim(a) != 0 or jnp.ndim(b) != 0:
        raise ValueError(f"{name} takes scalar indices (`x` of shape (n,)), got single points of shape {jnp.shape(a)}")
    return a - b


@pytree_dataclass
class Cosine(Kernel):
    r"""Cosine kernel $k(a, b) = \sigma^2 \cos(2\pi (a - b) / p)$ on scalar indices.

    A sinusoid of period $p$ with random phase and amplitude; multiplied by a decaying kernel
    (``Matern32(…) * Cosine(…)``) it becomes the usual quasi-periodic kernel.
    $\partial k / \partial a = -\sigma^2 (2\pi/p) \sin(2\pi (a - b)/p)$.

    Examples:
        >>> from gpgrad_jax import kernels
        >>> float(kernels.Cosine(variance=2.0, period=4.0).evaluate(0.0, 2.0))  # half a period apart
        -2.0
    """

    variance: Array = 1.0
    period: Array = 1.0
    scalar_index_only: ClassVar[bool] = True
    positive_fields: ClassVar[tuple[str, ...]] = ("variance", "period")
    stationary: ClassVar[bool] = True

    def parameter_shapes(self, index_shape):
        return {"variance": ((),), "period": ((),)}

    def frequency(self):
        """$\\omega = 2\\pi / p$."""
        return 2.0 * jnp.pi / self.period

    def evaluate(self, a, b):
        return self.variance * jnp.cos(self.frequency() * _scalar_index(a, b, "Cosine"))

    def grad_first(self, a, b):
        omega = self.frequency()
        return -self.variance * omega * jnp.sin(omega * _scalar_index(a, b, "Cosine"))


def damped_oscillation(damping, squared_frequency, t):
    r"""$e^{-\gamma t}\,(c(t),\ s(t))$ with $c = \cos(\eta t)$, $s = \sin(\eta t)/\eta$ for
    $\eta^2$ (``squared_frequency``) $> 0$, their hyperbolic forms for $\eta^2 < 0$ and the
    common Taylor series near $\eta^2 t^2 = 0$ (the critically damped oscillator): one smooth
    function of $\eta^2$, differentiable through the switch, and never $\infty \cdot 0$ (the
    hyperbolic forms are written as decaying exponentials)."""
    u = squared_frequency * t * t
    near = jnp.abs(u) < 1.0
    u_near = jnp.where(near, u, 0.0)
    cos_series = sin_series = jnp.zeros_like(u)
    for j in reversed(range(12)):  # Σ (−u)^j/(2j)!, Σ (−u)^j/(2j+1)!: 1/24! < 2e-24
        cos_series = 1.0 / math.factorial(2 * j) - u_near * cos_series
        sin_series = 1.0 / math.factorial(2 * j + 1) - u_near * sin_series
    decay = jnp.exp(-damping * t)
    series = decay * cos_series, decay * t * sin_series
    positive = jnp.asarray(squared_frequency) > 0
    # Each branch sees safe inputs where it is not taken (its derivative is multiplied by 0 there).
    eta = jnp.sqrt(jnp.where(near | ~positive, 1.0, squared_frequency))
    trig = decay * jnp.cos(eta * t), decay * jnp.sin(eta * t) / eta
    negative = jnp.where(near | positive, -1.0, squared_frequency)
    beta = jnp.sqrt(-negative)
    # e^{−γt} cosh(βt) = ½ (e^{−(γ−β)t} + e^{−(γ+β)t}); γ − β = ω²/(γ + β) > 0, ω² = γ² + η²,
    # without cancelling when heavily damped (γ ≫ ω).
    slow = jnp.exp(-(damping**2 + negative) / (damping + beta) * t)
    hyper = 0.5 * slow * (1.0 + jnp.exp(-2.0 * beta * t)), -slow * jnp.expm1(-2.0 * beta * t) / (2.0 * beta)
    pick = lambda i: jnp.where(near, series[i], jnp.where(positive, trig[i], hyper[i]))  # noqa: E731
    return pick(0), pick(1)


@pytree_dataclass
class SHO(Kernel):
    r"""Stochastically driven damped simple harmonic oscillator on scalar indices.

    $f'' + (\omega/Q) f' + \omega^2 f = \xi$ with $\xi$ white noise, scaled so that $k(a, a) = \sigma^2$:

    $$
    k(\tau) = \sigma^2 e^{-\gamma |\tau|} \left( c(|\tau|) + \gamma\, s(|\tau|) \right),
    \qquad \gamma = \frac{\omega}{2Q},\quad \eta^2 = \omega^2 - \gamma^2,
    $$

    with $c = \cos \eta\tau$, $s = \sin(\eta \tau)/\eta$ for $Q > 1/2$ (underdamped),
    $\cosh$ and $\sinh$ for $Q < 1/2$, and $c = 1$, $s = \tau$ at $Q = 1/2$ (critically damped:
    $\sigma^2 (1 + \omega\tau) e^{-\omega\tau}$, the Matérn 3/2 kernel). One formula covers all
    three and is smooth in $Q$ through $Q = 1/2$.
    $\partial k / \partial a = -\sigma^2 \omega^2 e^{-\gamma|\tau|} s(\tau)$, $\tau = a - b$
    (smooth: the paths are differentiable).

    Examples:
        >>> from gpgrad_jax import kernels
        >>> k = kernels.SHO(sigma=1.0, omega=2.0, quality=0.5)
        >>> round(float(k.evaluate(0.0, 0.5)), 6)  # (1 + ωτ) e^{−ωτ}
        0.735759
    """

    sigma: Array = 1.0
    omega: Array = 1.0
    quality: Array = 1.0
    scalar_index_only: ClassVar[bool] = True
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma", "omega", "quality")
    stationary: ClassVar[bool] = True

    def parameter_shapes(self, index_shape):
        return {"sigma": ((),), "omega": ((),), "quality": ((),)}

    def damping(self):
        """$\\gamma = \\omega / (2Q)$."""
        return self.omega / (2.0 * self.quality)

    def squared_frequency(self):
        """$\\eta^2 = \\omega^2 - \\gamma^2$ (negative when overdamped)."""
        return self.omega**2 * (1.0 - 0.25 / self.quality**2)

    def _oscillation(self, tau):
        return damped_oscillation(self.damping(), self.squared_frequency(), tau)

    def evaluate(self, a, b):
        cos_part, sin_part = self._oscillation(jnp.abs(_scalar_index(a, b, "SHO")))
        return self.sigma**2 * (cos_part + self.damping() * sin_part)

    def grad_first(self, a, b):
        tau = _scalar_index(a, b, "SHO")
        _, sin_part = self._oscillation(jnp.abs(tau))
        return -self.sigma**2 * self.omega**2 * jnp.sign(tau) * sin_part
