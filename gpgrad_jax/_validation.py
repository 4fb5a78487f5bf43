"""Eager argument checks for the public functions.

Shapes and dtypes are checked on every call, before anything is traced (so
also under ``jit`` and ``vmap``, where shapes are known).  Values — finiteness,
positivity, non-negative cubic-spline indices — are checked whenever the
argument is concrete; under ``jit`` use :func:`gpgrad_jax.checked` (a
``checkify`` wrapper) to get the same checks at run time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise

Array = Any


def _as_float_array(name: str, value: Any) -> jax.Array:
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(
            f"`{name}` must be a real floating-point array, got {type(value).__name__}"
        ) from err
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating-point array (float32 or float64), "
            f"got dtype {array.dtype}"
        )
    return array


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array when it is known now, else ``None`` (a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except Exception:  # pragma: no cover - exotic array types
        return None


def check_parameter_dtype(name: str, value: Any) -> None:
    """Parameters may be Python numbers or real floating-point arrays."""
    if isinstance(value, bool) or isinstance(value, complex):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating-point value (float32 or float64), got dtype {dtype}"
        )


def check_finite(name: str, value: Any) -> None:
    concrete = _concrete(value)
    if concrete is not None and not np.all(np.isfinite(concrete)):
        bad = int(np.size(concrete) - np.count_nonzero(np.isfinite(concrete)))
        raise ValueError(f"`{name}` must be finite, got {bad} non-finite value(s)")


def check_positive(name: str, value: Any) -> None:
    concrete = _concrete(value)
    if concrete is None:
        return
    if not np.all(np.isfinite(concrete)):
        raise ValueError(f"`{name}` must be finite and > 0, got {concrete}")
    if not np.all(concrete > 0):
        raise ValueError(f"`{name}` must be > 0, got {concrete}")


def check_problem(kernel: Kernel, x: Any, y: Any, noise: Noise, mean: Any):
    """Validate and normalise the arguments of the likelihood functions.

    Returns ``(x, y2, mean2)`` with ``y2`` and ``mean2`` of shape ``(n, D)``.
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"`kernel` must be a gpgrad_jax.kernels.Kernel, got {type(kernel).__name__}"
        )
    if not isinstance(noise, Noise):
        raise TypeError(
            f"`noise` must be one of gpgrad_jax.noise.Isotropic, PerPoint or Dense, "
            f"got {type(noise).__name__}"
        )
    x = _as_float_array("x", x)
    y = _as_float_array("y", y)
    if x.ndim not in (1, 2) or x.shape[0] < 1:
        raise ValueError(
            f"`x` must have shape (n,) or (n, d) with n >= 1, got shape {x.shape}"
        )
    if x.ndim == 2 and x.shape[1] < 1:
        raise ValueError(f"`x` of shape (n, d) needs d >= 1, got shape {x.shape}")
    n = x.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] < 1):
        raise ValueError(
            f"`y` must have shape ({n},) or ({n}, D) to match `x` of shape {x.shape}, "
            f"got shape {y.shape}"
        )
    if mean is None:
        mean = jnp.zeros_like(y)
    else:
        mean = _as_float_array("mean", mean)
        if mean.shape != y.shape:
            raise ValueError(
                f"`mean` must have the shape of `y` {y.shape}, got shape {mean.shape}"
            )
    if kernel.requires_scalar_index() and x.ndim != 1:
        raise ValueError(
            "`kernel` contains a kernel defined on scalar indices only (CubicSpline): "
            f"`x` must have shape (n,), got shape {x.shape}"
        )
    dim = 1 if y.ndim == 1 else y.shape[1]
    noise.check_shapes(n, dim)
    for leaf_name, leaf in _named_leaves("kernel", kernel) + _named_leaves("noise", noise):
        check_parameter_dtype(leaf_name, leaf)
        check_finite(leaf_name, leaf)
    for name, value in kernel.positive_parameters().items():
        check_positive(f"kernel.{name}", value)
    for name, value in noise.positive_parameters().items():
        check_positive(f"noise.{name}", value)
    check_finite("x", x)
    check_finite("y", y)
    check_finite("mean", mean)
    if kernel.requires_scalar_index():
        concrete = _concrete(x)
        if concrete is not None and np.any(concrete < 0):
            raise ValueError(
                "`x` must be >= 0 for the CubicSpline kernel (indices are positions "
                f"along the curve from its start), got min(x) = {concrete.min()}"
            )
    return x, y.reshape(n, dim), mean.reshape(n, dim)


def _named_leaves(prefix: str, tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]
