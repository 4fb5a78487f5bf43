"""Run-time diagnostics shared by the solvers: warnings raised once, eagerly or from a compiled
program, and results that are not finite.

Each solver knows its own failure modes and words them (``gpgrad_jax._solver``); this module
only delivers them: a concrete value is judged now, a traced one by a host callback that runs
only when the check fails — or, for a result that is not finite, by a ``checkify`` check that
costs nothing unless the caller transforms the function with ``checkify``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental import checkify

from gpgrad_jax._errors import ConditioningWarning

#: The keys of the warnings already shown in this process (each at most once).
WARNED: set[str] = set()


def warn_once(key: str, message: str, category=ConditioningWarning, stacklevel: int = 3) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key in WARNED:
        return
    WARNED.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


def concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array when it is known now, else ``None`` (a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # pragma: no cover - exotic array types
        return None


def known_value(tracer):
    """The value behind a tracer when it is known now (eager ``jax.grad``: the primal), else ``None``."""
    try:
        return tracer.to_concrete_value()
    except Exception:  # pragma: no cover - a JAX without the method, or a tracer type that refuses
        return None


def report_above(estimate: Any, level: float, warn: Callable[[np.ndarray], None]) -> None:
    """Call ``warn(values)`` when ``max(estimate)`` exceeds ``level``: now for a concrete value, at
    run time under a trace — a host callback that runs only when the check fails. Under ``vmap``
    the whole batch goes to one host callback per device (``partitioned``): the default batching
    of a callback would slice the batch into single problems and gather them to one device —
    collectives in a batch sharded over devices, whose problems must not communicate."""
    if not isinstance(estimate, jax.core.Tracer):
        values = np.asarray(estimate)
        if float(np.max(values, initial=-np.inf)) > level:
            warn(values)
        return

    def host(values):
        values = np.asarray(values)
        if float(np.max(values, initial=-np.inf)) > level:
            warn(values)

    @custom_vmap
    def report_all(values):
        jax.debug.callback(host, values, partitioned=True)
        return values

    @report_all.def_vmap
    def _report_all_batched(axis_size, in_batched, values):
        report_all(values)  # nested vmap: still one callback with every problem
        return values, in_batched[0]

    @custom_vmap
    def report(value):
        jax.lax.cond(value > level, lambda: report_all(value), lambda: value)
        return value

    @report.def_vmap
    def _report_batched(axis_size, in_batched, values):
        report_all(values)
        return values, in_batched[0]

    report(jax.lax.stop_gradient(jnp.max(estimate)))


def debug_check(predicate: Callable[[], Any], message: str) -> None:
    """``checkify.debug_check(predicate(), message)``, left out where it cannot be expressed: under
    ``vmap`` over an axis sharded on an explicit mesh axis, its batching rule (an ``argsort``
    over the batch) is refused by JAX's sharding-in-types."""
    try:
        checkify.debug_check(predicate(), message)
    except Exception as err:
        if type(err).__name__ != "ShardingTypeError":
            raise


def check_finite_output(value: Any) -> None:
    """Under a trace, a non-finite result becomes the ``checkify`` error the eager call raises
    as [``NumericalError``][gpgrad_jax.NumericalError] (a no-op when the caller does not use ``checkify``)."""
    if isinstance(value, jax.core.Tracer):
        known = known_value(value)
        if known is not None and np.all(np.isfinite(np.asarray(known))):
            return  # eager differentiation: the value is known, and finite
        debug_check(
            lambda: jnp.all(jnp.isfinite(value)),
            f"the result is not finite in {value.dtype}: U = I + S (K ⊗ I_D) Sᵀ could not be factored, "
            "or the state-space covariances or the value overflowed. Rescale the indices or the "
            "kernel variances, or use float64; the same call outside jit raises with details.",
        )
