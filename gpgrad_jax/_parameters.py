r"""Positive parameters for unconstrained optimisers: ``unconstrain`` and ``constrain``.

An optimiser such as ``optax.adam`` moves a variance by a step that knows nothing of its sign: left
alone, a kernel variance can step below zero, after which the likelihood is NaN (under ``jit``) or
an error (eagerly). The usual remedy is to optimise an unconstrained number ``u`` and use
``v = softplus(u) = log(1 + eᵘ)`` — positive for every ``u``, ``≈ u`` for large ``u``, smooth, and
with a derivative ``σ(u) ∈ (0, 1)`` that never explodes the way ``exp`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise


def _positive_fields(obj) -> tuple[str, ...]:
    if isinstance(obj, Kernel):
        return tuple(obj.positive_fields)
    return tuple(obj.positive_parameters())


def _map_positive(tree: Any, transform) -> Any:
    """``tree`` with ``transform`` applied to every positive parameter of every kernel (its parts
    too) and noise model in it; other leaves unchanged."""

    def visit(obj):
        if not isinstance(obj, (Kernel, Noise)) or not dataclasses.is_dataclass(obj):
            return obj
        positive = _positive_fields(obj)
        changes = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if isinstance(value, (Kernel, Noise)):
                changes[field.name] = visit(value)
            elif field.name in positive:
                changes[field.name] = jax.tree_util.tree_map(transform, value)
        return dataclasses.replace(obj, **changes) if changes else obj

    return jax.tree_util.tree_map(visit, tree, is_leaf=lambda obj: isinstance(obj, (Kernel, Noise)))


def _inverse_softplus(v):
    v = jnp.asarray(v)
    v = v.astype(jnp.result_type(v, float))
    # log(eᵛ − 1) = v + log(1 − e⁻ᵛ): no overflow for large v.
    return v + jnp.log(-jnp.expm1(-v))


def unconstrain(tree: Any) -> Any:
    r"""``tree`` with every positive parameter ``v`` of its kernels and noise models replaced by
    ``u = softplus⁻¹(v) = log(eᵛ − 1)``, a number an optimiser may move anywhere; undo with
    [``constrain``][gpgrad_jax.constrain].

    Positive parameters are those a kernel class lists in ``positive_fields`` (variances,
    lengthscales, periods, the SHO's parameters) and ``Isotropic``'s ``sigma``; every other leaf
    (``PerPoint`` blocks, your own arrays in the tree) is left as it is. ``tree`` may be a kernel,
    a noise model or any pytree holding them (a tuple, a dict, an optax parameter tree).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 20)
        >>> y = jnp.sin(2.0 * x)
        >>> params = gg.unconstrain((kernels.Matern32(1.0, 1.0), noise.Isotropic(0.5)))
        >>> def loss(params):
        ...     kernel, nz = gg.constrain(params)
        ...     return -gg.log_marginal_likelihood(kernel, x, y, nz)
        >>> optimiser = optax.adam(0.5)   # large steps: without the transform a variance goes negative
        >>> state = optimiser.init(params)
        >>> for _ in range(50):
        ...     grads = jax.grad(loss)(params)
        ...     updates, state = optimiser.update(grads, state)
        ...     params = optax.apply_updates(params, updates)
        >>> kernel, nz = gg.constrain(params)
        >>> bool(kernel.variance > 0 and kernel.lengthscale > 0 and nz.sigma > 0 and jnp.isfinite(loss(params)))
        True
    """
    return _map_positive(tree, _inverse_softplus)


def constrain(tree: Any) -> Any:
    r"""The inverse of [``unconstrain``][gpgrad_jax.unconstrain]: every positive parameter's
    unconstrained value ``u`` mapped to ``v = softplus(u) = log(1 + eᵘ) > 0``. Call it inside the
    loss, so that gradients flow to ``u``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels
        >>> k = kernels.Matern32(2.0, 0.5) + kernels.Constant(0.1)
        >>> back = gg.constrain(gg.unconstrain(k))
        >>> round(float(back.k1.variance), 6), round(float(back.k2.variance), 6)
        (2.0, 0.1)
    """
    return _map_positive(tree, jax.nn.softplus)
