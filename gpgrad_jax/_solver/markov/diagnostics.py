"""What the Markov solvers can say about a result: not finite, or rounded beyond use in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax._diagnostics import concrete, report_above, warn_once
from gpgrad_jax._errors import NumericalError


def check_finite(results: Any) -> None:
    """Raise [``NumericalError``][gpgrad_jax.NumericalError] if a *concrete* result (a value or a
    cotangent) is not finite — never a silent NaN; under ``jit`` results are tracers and this is
    skipped, as for the dense solver (``checkify`` reports it)."""
    for result in jax.tree_util.tree_leaves(results):
        value = concrete(result)
        if value is None or np.all(np.isfinite(value)):
            continue
        raise NumericalError(
            f"the state-space solver produced a non-finite result in {value.dtype}: the data, the "
            "state covariances or their factors overflowed the working precision (for the CubicSpline "
            "kernel the covariances grow like the cube of the gap between indices times the variance). "
            "Rescale the data, the indices or the kernel variances, use solver='dense' to get a "
            "condition number, or use float64: jax.config.update('jax_enable_x64', True)."
        )


#: The square-root form warns when ``eps · max_k (‖o_k‖ + ‖C_k S⁻_k‖)`` exceeds this: how many noise
#: standard deviations the whitened data and the predicted spread of the curve span, times the
#: working precision. Over 230 float32 problems (camera rays, helices, Matérn series; spans
#: 1–3000, noise 0.001–0.3, 20–3000 points; ``benchmarks/float32.py``) the gradient's relative
#: error was 0.014–6.2× the estimate; every one of the 18 that missed the targets (gradient 1e-3,
#: worst entry 1e-2, value 1e-4) had an estimate of 3.8e-3 or more, and 26 below the targets
#: (2.5e-5 … 7.4e-4) were warned of too. ``benchmarks/float32.py``'s 120 random problems: 13
#: misses, all warned; 19 false alarms.
PRECISION_WARNING_LEVEL = 1e-3


def check_precision(spread: Any, dtype: Any) -> None:
    """One [``ConditioningWarning``][gpgrad_jax.ConditioningWarning] per precision when
    ``eps · max(spread)`` exceeds ``PRECISION_WARNING_LEVEL``: now for concrete values, at run
    time under a trace (a host callback that runs only when the check fails)."""
    eps = float(jnp.finfo(dtype).eps)
    if eps * 1e6 < PRECISION_WARNING_LEVEL:
        return  # float64: the estimate cannot come near the level for finite data
    report_above(eps * spread, PRECISION_WARNING_LEVEL, lambda values: _warn(float(np.max(values)), eps, str(dtype)))


def _warn(estimate: float, eps: float, dtype: str) -> None:
    warn_once(
        f"state-space {dtype}",
        f"{dtype} resolves this state-space problem to about {estimate:.0e} relative: the whitened data "
        "and the predicted spread of the curve span up to "
        f"{estimate / eps:.1e} noise standard deviations, so the gradient may be wrong by that fraction "
        "(the value by less). Use float64, or make the numbers smaller: pass a `mean` close to the "
        "data (its residuals are what the filter carries), or rescale the indices and variances. "
        "(Shown once per solver and precision.)",
        stacklevel=5,
    )
