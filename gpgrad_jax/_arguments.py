"""The one argument path of the public functions: check, cast, and hand the solvers a ``Problem``.

Types, shapes and dtypes are checked on every call, before anything is traced (so also under
``jit`` and ``vmap``, where shapes are known). Values — finiteness, positivity, non-negative
indices of the curve kernels — are checked whenever the argument is concrete; under ``jit`` they
become ``checkify`` checks (the same message at run time for a caller who transforms the
function with ``checkify``) and the data are poisoned where a rule fails, so that every result
and cotangent is NaN, never a finite wrong number. The kernel's and the noise's leaves are
walked once for all their checks, and cast once.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from gpgrad_jax._diagnostics import debug_check, known_value
from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise

Array = Any


class Problem(NamedTuple):
    """Validated arguments in one floating dtype: what every solver receives."""

    kernel: Any
    noise: Any
    x: Array  # (n,) or (n, d)
    r: Array  # y − μ, (n, D)


def prepare(kernel: Any, x: Any, y: Any, noise: Any, mean: Any) -> tuple[Problem, tuple[int, ...]]:
    """``(Problem, shape of y)``: the arguments of the likelihood functions checked (types,
    shapes, dtypes; values where concrete) and cast to one floating dtype, ``r = y − μ`` of shape
    ``(n, D)``; under a trace, NaN where a value rule fails (``poison``)."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"`kernel` must be a gpgrad_jax.kernels.Kernel, got {type(kernel).__name__}")
    if not isinstance(noise, Noise):
        raise TypeError(f"`noise` must be a gpgrad_jax.noise.Noise (e.g. noise.Isotropic), got {type(noise).__name__}")
    leaves = _named_leaves("kernel", kernel) + _named_leaves("noise", noise)
    for name, leaf in leaves:
        if isinstance(leaf, Kernel):
            raise TypeError(_unregistered(type(leaf).__name__))
        check_parameter_dtype(name, leaf)
    x = as_float_array("x", x)
    y = as_float_array("y", y)
    if x.ndim not in (1, 2) or x.shape[0] < 1:
        raise ValueError(f"`x` must have shape (n,) or (n, d) with n >= 1, got shape {x.shape}")
    if x.ndim == 2 and x.shape[1] < 1:
        raise ValueError(f"`x` of shape (n, d) needs d >= 1, got shape {x.shape}")
    n = x.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != n or (y.ndim == 2 and y.shape[1] < 1):
        raise ValueError(f"`y` must have shape ({n},) or ({n}, D) to match `x` of shape {x.shape}, got shape {y.shape}")
    if mean is not None:
        mean = as_float_array("mean", mean)
        if mean.shape not in ((), y.shape):
            raise ValueError(f"`mean` must be a scalar or have the shape of `y` {y.shape}, got shape {mean.shape}")
    if kernel.requires_scalar_index() and x.ndim != 1:
        raise ValueError(
            f"`kernel` contains a kernel defined on scalar indices only "
            f"({kernel_names(kernel, 'scalar_index_only')}): `x` must have shape (n,), got shape {x.shape}"
        )
    kernel.check_index_shape(x.shape[1:])
    dim = 1 if y.ndim == 1 else y.shape[1]
    noise.check_shapes(n, dim)
    valid = all_hold([check_rule(*rule) for rule in _value_rules(kernel, x, y, noise, mean, leaves)])
    dtype = jnp.result_type(x, y, *(() if mean is None else (mean,)))
    kernel, noise, x, r = _cast(kernel, noise, x, y, mean, dtype, dim)
    x, r = poison(valid, x, r)
    return Problem(kernel, noise, x, r), y.shape


# Jitted: an eager call then runs one compiled program (one compilation per problem structure)
# instead of an eager operation per leaf, each compiled for every new shape.
@functools.partial(jax.jit, static_argnums=(5, 6))
def _cast(kernel, noise, x, y, mean, dtype, dim):
    cast = lambda leaf: jnp.asarray(leaf, dtype)  # noqa: E731
    n = x.shape[0]
    r = y.astype(dtype).reshape(n, dim)
    if mean is not None:
        r = r - jnp.broadcast_to(mean, y.shape).astype(dtype).reshape(n, dim)
    return jax.tree_util.tree_map(cast, kernel), jax.tree_util.tree_map(cast, noise), x.astype(dtype), r


def _unregistered(name: str) -> str:
    return (
        f"`kernel`: {name} is not a registered pytree, so JAX cannot see its parameters. "
        f"Declare it as the built-in kernels are: decorate `class {name}(kernels.Kernel)` "
        "with `@gpgrad_jax.kernels.register` and list its parameters as annotated fields "
        "(see the README's 'Custom kernels')"
    )


def check_registered(kernel: Kernel) -> None:
    """Raise ``TypeError`` if a part of ``kernel`` is not a pytree (its parameters would be
    invisible to ``jax.grad``, ``jit`` and ``optax``)."""
    for leaf in jax.tree_util.tree_leaves(kernel):
        if isinstance(leaf, Kernel):
            raise TypeError(_unregistered(type(leaf).__name__))


def _named_leaves(prefix: str, tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


# ------------------------------------------------------------------------ types and dtypes


def as_float_array(name: str, value: Any) -> jax.Array:
    """``value`` as a real floating-point array; integers (frame numbers, time stamps) are
    promoted to the default floating dtype as ``jax.numpy`` does, booleans and complex refused."""
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(f"`{name}` must be a real floating-point array, got {type(value).__name__}") from err
    if jnp.issubdtype(array.dtype, jnp.integer):
        return array.astype(jnp.result_type(float))
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a real floating-point or integer array, got dtype {array.dtype}")
    _check_precision(name, array.dtype)
    return array


def _check_precision(name: str, dtype: Any) -> None:
    if jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"`{name}` has dtype {dtype}: gpgrad_jax computes in float32 or float64 (XLA has no "
            f"Cholesky factorisation or triangular solve in {dtype}, and its 2-3 significant digits "
            f"could not resolve U); cast it, e.g. `{name}.astype(jnp.float32)`"
        )


def check_parameter_dtype(name: str, value: Any) -> None:
    """Parameters may be Python numbers or real floating-point arrays."""
    if isinstance(value, bool) or isinstance(value, complex):
        raise TypeError(f"`{name}` must be a real number, got {value!r}")
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a real floating-point value (float32 or float64), got dtype {dtype}")
    if dtype is not None:
        _check_precision(name, dtype)


# ------------------------------------------------------------------------------- values


def kernel_names(kernel: Kernel, flag: str) -> str:
    """The names of ``kernel``'s parts whose class sets ``flag``, e.g. ``"CubicSpline"``."""
    return ", ".join(sorted({type(part).__name__ for part in kernel.parts() if getattr(part, flag)}))


def _value_rules(kernel, x, y, noise, mean, leaves=None):
    """(name, array, predicate, requirement) for every value constraint of a problem."""
    leaves = _named_leaves("kernel", kernel) + _named_leaves("noise", noise) if leaves is None else leaves
    rules = [(name, leaf, isfinite, "finite") for name, leaf in leaves]
    for name, value in kernel.positive_parameters().items():
        rules.append((f"kernel.{name}", value, lambda a: a > 0, "> 0"))
    for name, value in noise.positive_parameters().items():
        rules.append((f"noise.{name}", value, lambda a: a > 0, "> 0"))
    for name, value in (("x", x), ("y", y), ("mean", mean)):
        if value is not None:
            rules.append((name, value, isfinite, "finite"))
    rules.extend(index_domain_rules(kernel, "x", x))
    return rules


def index_domain_rules(kernel, name, indices):
    """The rules on where ``kernel`` is defined, for the indices ``name`` (``x``, ``x_new``, ``inducing``)."""
    anchored = kernel_names(kernel, "nonnegative_index")
    if not anchored:
        return []
    requirement = f">= 0 for the {anchored} kernel (indices are positions along the curve from its start)"
    return [(name, indices, lambda a: a >= 0, requirement)]


def isfinite(a):
    return np.isfinite(a) if isinstance(a, np.ndarray) else jnp.isfinite(a)


def _describe(values: np.ndarray, ok: np.ndarray) -> str:
    if values.size <= 6:
        return f"{values.tolist()}"
    bad = values[~np.broadcast_to(ok, values.shape)]
    return f"{bad.size} offending value(s) of {values.size}, e.g. {bad[:3].tolist()}"


def _on_host(value):
    """``value`` as a numpy array in the dtype JAX would give it, where reading it costs no
    transfer (numpy arrays, Python numbers and lists, a JAX array on one CPU device); ``None``
    elsewhere. Checking these with JAX compiled two tiny programs per argument and new shape
    and dispatched them on every eager call."""
    if isinstance(value, jax.Array):
        devices = value.devices()
        if len(devices) != 1 or next(iter(devices)).platform != "cpu":
            return None
        return np.asarray(value)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    if array.dtype == object:
        return None
    # As jnp.asarray converts: 1e300 is not finite in float32.
    with np.errstate(over="ignore"):
        return array.astype(jax.dtypes.canonicalize_dtype(array.dtype), copy=False)


def check_rule(name, value, predicate, requirement):
    """Raise ``ValueError`` now if a concrete ``value`` breaks the rule; for a traced one return
    its verdict (a traced boolean), having registered the message with ``checkify``.

    Host data (numpy arrays, Python numbers and lists, JAX arrays on one CPU device) are checked
    in place by numpy: no compilation per new shape, no dispatch. Anything else is reduced on its
    device and only the verdict comes to the host (the values only when the rule fails, for the
    message): no copy of a large or sharded array per call.
    """
    if isinstance(value, jax.core.Tracer):
        known = known_value(value)
        if known is None:
            # The same message at run time when the caller runs under checkify (a no-op otherwise).
            verdict = jnp.all(predicate(value))
            debug_check(lambda: verdict, f"`{name}` must be {requirement}")
            return verdict
        value = known  # eager differentiation: check now, as an eager call does
    host = _on_host(value)
    if host is not None:
        ok = np.asarray(predicate(host))
        if np.all(ok):
            return None
        raise ValueError(f"`{name}` must be {requirement}, got {_describe(host, ok)}")
    with jax.ensure_compile_time_eval():  # concrete inside a jit trace too: evaluate now
        array = jnp.asarray(value)
        if bool(jnp.all(predicate(array))):
            return None
        ok = np.asarray(predicate(array))
    raise ValueError(f"`{name}` must be {requirement}, got {_describe(np.asarray(array), ok)}")


def check_finite(name: str, value: Any):
    """``check_rule`` for finiteness."""
    return check_rule(name, value, isfinite, "finite")


def all_hold(verdicts):
    """The conjunction of the traced verdicts of ``check_rule`` (``None``: all were checked now)."""
    traced = [v for v in verdicts if v is not None]
    return None if not traced else functools.reduce(jnp.logical_and, traced)


def poison(valid, *arrays):
    """``arrays`` unchanged where ``valid`` (a traced verdict of the value rules) holds, NaN
    everywhere otherwise — and so every result and cotangent computed from them: under ``jit``
    an input outside the domain (a negative index of the curve kernel, a zero variance) gives
    NaN, never a finite wrong number (with ``checkify``, the eager call's message). ``None``: the
    rules were checked eagerly."""
    if valid is None:
        return arrays
    return tuple(a + jnp.where(valid, 0.0, jnp.nan).astype(a.dtype) for a in arrays)


def value_checks(kernel: Kernel, x: Any, y: Any, noise: Noise, mean: Any = None) -> None:
    """The value checks as ``checkify.check`` calls, on their own.

    The public functions make these checks themselves (eagerly, or under ``jit`` for a caller
    who transforms the function with ``checkify``); call this to check a problem's values before
    other code of yours runs, or without computing anything.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jax.experimental import checkify
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> k, nz = kernels.CubicSpline(1.0), noise.Isotropic(0.1)
        >>> def loss(x, y):
        ...     gg.value_checks(k, x, y, nz)
        ...     return -gg.log_marginal_likelihood(k, x, y, nz)
        >>> checked = jax.jit(checkify.checkify(loss))
        >>> error, _ = checked(jnp.array([-1.0, 0.5]), jnp.zeros(2))
        >>> "`x` must be >= 0 for the CubicSpline kernel" in error.get()
        True
    """
    for name, value, predicate, requirement in _value_rules(kernel, x, y, noise, mean):
        checkify.check(jnp.all(predicate(jnp.asarray(value))), f"`{name}` must be {requirement}")
