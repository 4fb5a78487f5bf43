"""Eager argument checks for the public functions.

Shapes and dtypes are checked on every call, before anything is traced (so
also under ``jit`` and ``vmap``, where shapes are known).  Values — finiteness,
positivity, non-negative cubic-spline indices — are checked whenever the
argument is concrete; under ``jit`` they become ``checkify.debug_check`` calls: the same errors at
run time for a caller who transforms the function with ``checkify``, nothing otherwise.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.experimental import checkify

from gpgrad_jax._kernels import Kernel
from gpgrad_jax._noise import Noise

Array = Any


class NumericalError(FloatingPointError):
    """A valid problem whose result the working precision cannot represent (e.g. overflow)."""


class FactorizationError(NumericalError):
    r"""$U = I + S (K \otimes I_D) S^\top$ could not be Cholesky-factored in the working precision."""


def check_finite_result(value: Any, quadratic: Any) -> None:
    """Raise [``NumericalError``][gpgrad_jax.NumericalError] if a *concrete* likelihood value overflowed."""
    concrete = _concrete(value)
    if concrete is None or np.all(np.isfinite(concrete)):
        return
    raise NumericalError(
        f"the log marginal likelihood overflowed {concrete.dtype} (wᵀU⁻¹w = "
        f"{float(np.asarray(quadratic, np.float64)):.3e}, w = S(y − μ)): rescale `y` and `mean` "
        "or the noise, or use float64: jax.config.update('jax_enable_x64', True)."
    )


def check_finite_value(value: Any) -> None:
    """Raise [``NumericalError``][gpgrad_jax.NumericalError] if a *concrete* state-space result (value or cotangent)
    is not finite."""
    concrete = _concrete(value)
    if concrete is None or np.all(np.isfinite(concrete)):
        return
    raise NumericalError(
        f"the state-space solver produced a non-finite result in {concrete.dtype}: the data, the "
        "state covariances or their factors overflowed the working precision (for the CubicSpline "
        "kernel the covariances grow like the cube of the gap between indices times the variance). "
        "Rescale the data, the indices or the kernel variances, use solver='dense' to get a "
        "condition number, or use float64: jax.config.update('jax_enable_x64', True)."
    )


class ConditioningWarning(UserWarning):
    """``U`` is ill-conditioned for the working precision: the result may have lost accuracy."""


_WARNED_CONDITIONING: set[str] = set()


def check_factorization(pivots: Any, u_core: Callable[[], Any]) -> None:
    """Raise [``FactorizationError``][gpgrad_jax.FactorizationError] with advice if a *concrete*
    factor of ``U`` is unusable (``pivots``: the diagonal of its lower Cholesky factor): not finite
    — the factorisation broke down, and so would the result (under ``jit`` the same input gives a
    NaN, or this message through ``checkify``). Whether a usable factor is accurate enough is
    ``check_precision``'s question."""
    if isinstance(pivots, jax.core.Tracer):
        return
    # Only the pivots come to the host: a breakdown anywhere in the factorisation reaches
    # every later pivot, and copying the whole factor would cost O(m²) per eager call.
    dtype = pivots.dtype
    pivots = np.abs(np.asarray(pivots)).astype(np.float64)
    if bool(np.all(np.isfinite(pivots))) and pivots.min() > 0:
        return
    eps = float(np.finfo(dtype).eps)
    u = np.asarray(u_core(), np.float64)  # computed only now, for the message
    if not np.all(np.isfinite(u)):
        cond = "infinite (U has non-finite entries: the kernel overflowed)"
    else:
        eig = np.linalg.eigvalsh(u)
        cond = f"about {eig[-1] / max(eig[0], 1.0):.1e}"
    raise FactorizationError(
        f"U = I + S (K ⊗ I_D) Sᵀ ({u.shape[-1]}×{u.shape[-1]}, {dtype}) could not be Cholesky-factored: its "
        f"condition number is {cond}, beyond what {dtype} resolves (1/eps = {1 / eps:.1e}). "
        "Rescale the indices or the kernel variances (for the CubicSpline kernel cond(U) grows "
        "like max(x)³·variance/noise²), or use float64: jax.config.update('jax_enable_x64', True)."
    )


#: Each solver warns when ``eps`` times its rounding estimate exceeds its level.
#:
#: * ``"state-space"`` (the square-root filter): the estimate is ``max_k (‖o_k‖ + ‖C_k S⁻_k‖)``, how
#:   many noise standard deviations the whitened data and the predicted spread of the curve span.
#:   Over 230 float32 problems (camera rays, helices, Matérn series; spans 1–3000, noise
#:   0.001–0.3, 20–3000 points; ``benchmarks/float32.py``) the gradient's relative error was
#:   0.014–6.2× ``eps`` times the estimate; every one of the 18 that missed the targets (gradient
#:   1e-3, worst entry 1e-2, value 1e-4) had ``eps`` times it at 3.8e-3 or more, and 26 below the
#:   targets (2.5e-5 … 7.4e-4) were warned of too.
#: * ``"dense"``: the estimate is ``cond(U)``, from a few power iterations on ``U`` and on ``U⁻¹``.
#:   Over 120 random float32 problems (curve, Matérn 1/2 and 3/2, squared-exponential kernels;
#:   20–200 points, D = 1 or 3, isotropic and rank-2 noise; spans 1–300, noise 0.003–0.3;
#:   ``benchmarks/float32.py --only dense``) the gradient's relative error was at most 0.23 times
#:   ``eps · cond(U)``; all 33 that missed the targets were warned of (the smallest ``eps · cond(U)``
#:   of a miss: 1.9e-2), and 18 that did not; 12 the factorisation could not take at all (NaN under
#:   ``jit``, ``FactorizationError`` eagerly).
PRECISION_WARNING_LEVELS = {"state-space": 1e-3, "dense": 3e-3}


def check_precision(solver: str, estimate: Any, dtype: Any) -> None:
    """One [``ConditioningWarning``][gpgrad_jax.ConditioningWarning] per solver and precision when
    ``eps · max(estimate)`` exceeds the solver's level (``PRECISION_WARNING_LEVELS``): now for
    concrete values, at run time under a trace — a host callback that runs only when the check
    fails (under ``vmap``, once per call and device)."""
    eps = float(jnp.finfo(dtype).eps)
    if solver == "state-space" and eps * 1e6 < PRECISION_WARNING_LEVELS[solver]:
        return  # float64: the filter's estimate cannot come near the level for finite data
    if not isinstance(estimate, jax.core.Tracer):
        _warn_precision(np.asarray(estimate), eps, str(dtype), solver)
        return
    _report_precision(jax.lax.stop_gradient(jnp.max(estimate)), eps, str(dtype), solver)


def _report_precision(largest: Any, eps: float, dtype: str, solver: str) -> None:
    """At run time, warn if ``eps · largest`` exceeds the level. Under ``vmap`` the whole batch
    goes to one host callback per device (``partitioned``): the default batching of a callback
    would slice the batch into single problems and gather them to one device — collectives in a
    batch sharded over devices, whose problems must not communicate."""
    level = PRECISION_WARNING_LEVELS[solver]

    def warn(values):
        _warn_precision(np.asarray(values), eps, dtype, solver)

    @custom_vmap
    def report_all(values):
        jax.debug.callback(warn, values, partitioned=True)
        return values

    @report_all.def_vmap
    def _report_all_batched(axis_size, in_batched, values):
        report_all(values)  # nested vmap: still one callback with every problem
        return values, in_batched[0]

    @custom_vmap
    def report(value):
        jax.lax.cond(eps * value > level, lambda: report_all(value), lambda: value)
        return value

    @report.def_vmap
    def _report_batched(axis_size, in_batched, values):
        report_all(values)
        return values, in_batched[0]

    report(largest)


def _warn_precision(values: np.ndarray, eps: float, dtype: str, solver: str) -> None:
    estimate = eps * float(np.max(values, initial=0.0))
    key = f"{solver} {dtype}"
    if not estimate > PRECISION_WARNING_LEVELS[solver] or key in _WARNED_CONDITIONING:
        return
    _WARNED_CONDITIONING.add(key)
    wider = "" if dtype == "float64" else "float64, "
    if solver == "dense":
        cause = (
            f"U = I + S (K ⊗ I_D) Sᵀ has a condition number of about {estimate / eps:.1e}: eps · cond(U) = "
            f"{estimate:.0e}, and on random problems the gradient's relative error was up to a quarter of that "
            f"(the value's less). Use {wider}a state-space solver where the kernel has a state-space form "
            "(solver='markov'), or rescale the indices and the kernel variances (for the CubicSpline kernel "
            "cond(U) grows like max(x)³·variance/noise²)."
        )
    else:
        cause = (
            "the whitened data and the predicted spread of the curve span up to "
            f"{estimate / eps:.1e} noise standard deviations, so the gradient may be wrong by that fraction "
            f"(the value by less). Use {wider}or make the numbers smaller: pass a `mean` close to the "
            "data (its residuals are what the filter carries), or rescale the indices and variances."
        )
    warnings.warn(
        f"{dtype} resolves this {solver} problem to about {estimate:.0e} relative: {cause} "
        "(Shown once per solver and precision.)",
        ConditioningWarning,
        stacklevel=3,
    )


def _as_float_array(name: str, value: Any) -> jax.Array:
    """``value`` as a real floating-point array; integers (frame numbers, time stamps) are
    promoted to the default floating dtype as ``jax.numpy`` does, booleans and complex refused."""
    try:
        array = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(
            f"`{name}` must be a real floating-point array, got {type(value).__name__}"
        ) from err
    if jnp.issubdtype(array.dtype, jnp.integer):
        return array.astype(jnp.result_type(float))
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a real floating-point or integer array, got dtype {array.dtype}"
        )
    _check_precision(name, array.dtype)
    return array


def _check_precision(name: str, dtype: Any) -> None:
    if jnp.finfo(dtype).bits < 32:
        raise TypeError(
            f"`{name}` has dtype {dtype}: gpgrad_jax computes in float32 or float64 (XLA has no "
            f"Cholesky factorisation or triangular solve in {dtype}, and its 2-3 significant digits "
            f"could not resolve U); cast it, e.g. `{name}.astype(jnp.float32)`"
        )


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
    if dtype is not None:
        _check_precision(name, dtype)


def _describe(values: np.ndarray, ok: np.ndarray) -> str:
    if values.size <= 6:
        return f"{values.tolist()}"
    bad = values[~np.broadcast_to(ok, values.shape)]
    return f"{bad.size} offending value(s) of {values.size}, e.g. {bad[:3].tolist()}"


def _value_rules(kernel: Kernel, x: Any, y: Any, noise: Noise, mean: Any):
    """(name, array, predicate, requirement) for every value constraint of a problem."""
    rules = []
    for name, leaf in _named_leaves("kernel", kernel) + _named_leaves("noise", noise):
        rules.append((name, leaf, _isfinite, "finite"))
    for name, value in kernel.positive_parameters().items():
        rules.append((f"kernel.{name}", value, lambda a: a > 0, "> 0"))
    for name, value in noise.positive_parameters().items():
        rules.append((f"noise.{name}", value, lambda a: a > 0, "> 0"))
    for name, value in (("x", x), ("y", y), ("mean", mean)):
        if value is not None:
            rules.append((name, value, _isfinite, "finite"))
    anchored = _kernel_names(kernel, "nonnegative_index")
    if anchored:
        requirement = f">= 0 for the {anchored} kernel (indices are positions along the curve from its start)"
        rules.append(("x", x, lambda a: a >= 0, requirement))
    return rules


def _kernel_names(kernel: Kernel, flag: str) -> str:
    """The names of ``kernel``'s parts whose class sets ``flag``, e.g. ``"CubicSpline"``."""
    return ", ".join(sorted({type(part).__name__ for part in kernel.parts() if getattr(part, flag)}))


def check_values(kernel: Kernel, x: Any, y: Any, noise: Noise, mean: Any):
    """Raise ``ValueError`` for every concrete argument that breaks a value rule; return whether
    the traced ones hold (a traced boolean), or ``None`` when every rule was checked now.

    Host data (numpy arrays, Python numbers and lists, JAX arrays on one CPU device) are
    checked in place by numpy: no compilation per new shape, no dispatch. Anything else is
    reduced on its device and only the verdict comes to the host (the values only when a rule
    fails, for the message): no copy of a large or sharded array per call.
    """
    return _all_hold([_check_rule(*rule) for rule in _value_rules(kernel, x, y, noise, mean)])


def _all_hold(verdicts):
    """The conjunction of the traced verdicts of ``_check_rule`` (``None``: all were checked now)."""
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


def check_finite(name: str, value: Any):
    """Raise ``ValueError`` if a concrete ``value`` has a NaN or an infinity; a traced verdict
    (see ``poison``) when it is not concrete."""
    return _check_rule(name, value, _isfinite, "finite")


def _isfinite(a):
    return np.isfinite(a) if isinstance(a, np.ndarray) else jnp.isfinite(a)


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


def _known_value(tracer):
    """The value behind a tracer when it is known now (eager ``jax.grad``: the primal), else ``None``."""
    try:
        return tracer.to_concrete_value()
    except Exception:  # pragma: no cover - a JAX without the method, or a tracer type that refuses
        return None


def _check_rule(name, value, predicate, requirement):
    """Raise ``ValueError`` now if a concrete ``value`` breaks the rule; for a traced one return
    its verdict (a traced boolean), having registered the message with ``checkify``."""
    if isinstance(value, jax.core.Tracer):
        known = _known_value(value)
        if known is None:
            # The same message at run time when the caller runs under checkify (a no-op otherwise).
            verdict = jnp.all(predicate(value))
            _debug_check(lambda: verdict, f"`{name}` must be {requirement}")
            return verdict
        value = known  # eager differentiation: check now, as an eager call does
    host = _on_host(value)
    if host is not None:
        ok = np.asarray(predicate(host))
        if np.all(ok):
            return
        raise ValueError(f"`{name}` must be {requirement}, got {_describe(host, ok)}")
    with jax.ensure_compile_time_eval():  # concrete inside a jit trace too: evaluate now
        array = jnp.asarray(value)
        if bool(jnp.all(predicate(array))):
            return
        ok = np.asarray(predicate(array))
    raise ValueError(f"`{name}` must be {requirement}, got {_describe(np.asarray(array), ok)}")


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


def check_problem(kernel: Kernel, x: Any, y: Any, noise: Noise, mean: Any):
    """Validate and normalise the arguments of the likelihood functions.

    Returns ``(x, y2, mean2, valid)`` with ``y2`` and ``mean2`` of shape ``(n, D)`` and ``valid``
    the traced verdict of the value rules that could not be checked now (``None`` if all were):
    pass it to ``poison``.
    """
    if not isinstance(kernel, Kernel):
        raise TypeError(
            f"`kernel` must be a gpgrad_jax.kernels.Kernel, got {type(kernel).__name__}"
        )
    check_registered(kernel)
    if not isinstance(noise, Noise):
        raise TypeError(
            f"`noise` must be a gpgrad_jax.noise.Noise (e.g. noise.Isotropic), got {type(noise).__name__}"
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
        if mean.shape == ():  # a constant mean, as a Python number or a 0-d array
            mean = jnp.broadcast_to(mean, y.shape)
        if mean.shape != y.shape:
            raise ValueError(
                f"`mean` must be a scalar or have the shape of `y` {y.shape}, got shape {mean.shape}"
            )
    if kernel.requires_scalar_index() and x.ndim != 1:
        raise ValueError(
            f"`kernel` contains a kernel defined on scalar indices only "
            f"({_kernel_names(kernel, 'scalar_index_only')}): `x` must have shape (n,), got shape {x.shape}"
        )
    kernel.check_index_shape(x.shape[1:])
    dim = 1 if y.ndim == 1 else y.shape[1]
    noise.check_shapes(n, dim)
    for leaf_name, leaf in _named_leaves("kernel", kernel) + _named_leaves("noise", noise):
        check_parameter_dtype(leaf_name, leaf)
    valid = check_values(kernel, x, y, noise, mean)
    return x, y.reshape(n, dim), mean.reshape(n, dim), valid


def check_registered(kernel: Kernel) -> None:
    """Raise ``TypeError`` if a part of ``kernel`` is not a pytree (its parameters would be
    invisible to ``jax.grad``, ``jit`` and ``optax``)."""
    for leaf in jax.tree_util.tree_leaves(kernel):
        if isinstance(leaf, Kernel):
            name = type(leaf).__name__
            raise TypeError(
                f"`kernel`: {name} is not a registered pytree, so JAX cannot see its parameters. "
                f"Declare it as the built-in kernels are: decorate `class {name}(kernels.Kernel)` "
                "with `@gpgrad_jax.kernels.register` and list its parameters as annotated fields "
                "(see the README's 'Custom kernels')"
            )


def _named_leaves(prefix: str, tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def check_finite_output(value: Any) -> None:
    """Under a trace, a non-finite result becomes the ``checkify`` error the eager call raises
    as [``NumericalError``][gpgrad_jax.NumericalError] (a no-op when the caller does not use ``checkify``)."""
    if isinstance(value, jax.core.Tracer):
        known = _known_value(value)
        if known is not None and np.all(np.isfinite(np.asarray(known))):
            return  # eager differentiation: the value is known, and finite
        _debug_check(
            lambda: jnp.all(jnp.isfinite(value)),
            f"the result is not finite in {value.dtype}: U = I + S (K ⊗ I_D) Sᵀ could not be factored, "
            "or the state-space covariances or the value overflowed. Rescale the indices or the "
            "kernel variances, or use float64; the same call outside jit raises with details.",
        )


def _debug_check(predicate: Callable[[], Any], message: str) -> None:
    """``checkify.debug_check(predicate(), message)``, left out where it cannot be expressed: under
    ``vmap`` over an axis sharded on an explicit mesh axis, its batching rule (an ``argsort``
    over the batch) is refused by JAX's sharding-in-types."""
    try:
        checkify.debug_check(predicate(), message)
    except Exception as err:
        if type(err).__name__ != "ShardingTypeError":
            raise
