r"""The two forms of the Kalman recursions and the two ways to run them, as one static object.

A ``Scheme`` says which form — covariances (``covariance``) or their square roots
(``square_root``) — and whether the recursions are sequential ``lax.scan``\ s or associative
scans of O(log n) depth (``parallel``); every function of the Markov solver takes it, a static
argument of ``jit``. Which form a dtype gets by default: ``default_scheme`` — float32 uses square
roots (the covariance form loses the gradient there: ``benchmarks/float32.py``, 2.6e-2 against
2.2e-5 on the camera-ray curve), float64 the covariance form (exact in float64 and 2–20× faster on
CPUs: ``benchmarks/state_space.py``, ``docs/performance.md``).

**Derivatives of the square-root form.** A factor of the process noise is not differentiable at
a tie (``L(h) ∝ √h``), so the square-root form's derivatives — of the value, of the rule's
cotangents and of the posterior — are those of the covariance form (``covariance_derivatives``):
the same mathematical function, differentiable everywhere; first derivatives always come from
the square-root rule itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._solver.markov import covariance, square_root


class Scheme(NamedTuple):
    """The form and the scan of the Markov recursions (static); ``native``: the sequential
    recursions as native passes (``native.py``) on the CPU; ``segments``:
    the points split over a mesh, the sequential recursions run per segment
    (``segments.Segments``)."""

    square_root: bool
    parallel: bool
    native: bool = False
    segments: Any = None

    def in_covariances(self) -> Scheme:
        return self._replace(square_root=False)


def default_square_root(dtype) -> bool:
    """The form a dtype gets: square roots below float64."""
    return jnp.finfo(dtype).bits < 64


def filter_pass(model, layout, scheme: Scheme):
    """The filter: predicted (covariance form) or filtered (square-root form) moments and the
    per-point likelihood terms."""
    if scheme.square_root:
        if scheme.parallel:
            return square_root.filter_parallel(model, layout)
        return square_root.filter_sequential(model, layout, scheme.segments, scheme.native)
    if scheme.parallel:
        return covariance.filter_parallel(model)
    if scheme.segments is not None:
        return covariance.filter_segmented(model, scheme.segments)
    return covariance.filter_sequential(model, scheme.native)


def smooth(filtered, model, layout, scheme: Scheme, want_adjoints: bool):
    """The smoothed marginals (and, where asked, the adjoints ``ν_k``, ``N_k``)."""
    if scheme.square_root:
        return square_root.smooth(filtered, model, layout, scheme.parallel, want_adjoints, scheme.segments, scheme.native)
    return covariance.smooth(filtered, model, scheme.parallel, scheme.native, scheme.segments)


def filtered_moments(filtered, smoothed, scheme: Scheme):
    """``(m_k|k, P_k|k)`` at every point, from either form."""
    if scheme.square_root:
        return filtered.mean, _mm(filtered.factor, _t(filtered.factor))
    return smoothed.filtered_mean, smoothed.filtered_cov


def _zero_tangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


def covariance_derivatives(function=None, *, static: int = 1, with_state: bool = False, in_covariances=None):
    """``function(scheme, *options, *args)`` (its first ``static`` arguments static, the scheme
    first) whose derivatives, for a square-root scheme, are those of the covariance form:
    ``in_covariances(scheme, *options, *args)`` — by default ``function`` with
    ``scheme.in_covariances()``. With ``with_state``, ``function`` returns ``(outputs, state)``
    and the state's tangent is zero: its consumers define their own derivatives."""
    if function is None:
        return functools.partial(covariance_derivatives, static=static, with_state=with_state, in_covariances=in_covariances)
    if in_covariances is None:

        def in_covariances(scheme, *rest):
            return function(scheme.in_covariances(), *rest)

    @functools.partial(jax.custom_jvp, nondiff_argnums=tuple(range(static)))
    def in_roots(*args):
        return function(*args)

    @in_roots.defjvp
    def _jvp(*args):
        options, (primals, tangents) = args[:static], args[static:]
        result = function(*options, *primals)
        covariances = functools.partial(in_covariances, *options)
        if with_state:
            _, state = result
            _, outputs_dot = jax.jvp(lambda *a: covariances(*a)[0], primals, tangents)
            return result, (outputs_dot, jax.tree_util.tree_map(_zero_tangent, state))
        _, result_dot = jax.jvp(covariances, primals, tangents)
        return result, result_dot

    @functools.wraps(function)
    def dispatch(scheme, *args):
        return (in_roots if scheme.square_root else function)(scheme, *args)

    return dispatch
