r"""The native recursions: the sequential passes of both forms in C++ (``csrc/``) — the covariance
form's filter and smoother, the square-root form's filter and smoother (its backward information
filter) — one ``jax.ffi`` custom call per pass over all points.

XLA:CPU runs a ``lax.scan`` step through its loop machinery, hundreds of nanoseconds per step
whatever the arithmetic; a C++ loop costs the arithmetic. The library built by ``pip install``
(``gpgrad_jax/_native*.so``, a plain shared library: no Python API, loaded with ``ctypes``)
registers its handlers for the CPU on first use. Where it is missing — no C++ compiler at install
time — the solvers run the JAX scans, after a one-time warning; on other platforms
(``lax.platform_dependent``) the JAX scans always run.

The calls are single-threaded and take leading batch axes (``vmap`` of the pass broadcasts every
operand to the batch) as a loop. Each call carries a sharding rule (``sdy.sharding_rule``, or
GSPMD's ``num_batch_dims``): its batch axes may be sharded over devices, each device running its
own problems, while a problem's own axes (points, states) stay whole — without the rule XLA's
partitioner would gather a sharded batch onto every device. Their derivatives, where anything differentiates them (second order, the plain-autodiff
baseline), are those of the JAX scans (``covariance.py``): the JAX scans are the reference.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.interpreters import batching, mlir

from gpgrad_jax._diagnostics import warn_once

_PACKAGE = pathlib.Path(__file__).resolve().parents[2]

#: Handler symbols of ``csrc/covariance.cc`` and ``csrc/square_root.cc`` by pass, per dtype suffix.
_SYMBOLS = {
    "covariance_filter": "GpgradCovarianceFilter",
    "covariance_smooth": "GpgradCovarianceSmooth",
    "square_root_filter": "GpgradSquareRootFilter",
    "square_root_smooth": "GpgradSquareRootSmooth",
}
_SUFFIX = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.float64): "F64"}

MISSING = (
    "gpgrad_jax's native part (the Markov solvers' C++ recursions) is not built: the Markov "
    "solvers run their JAX scans, slower on the CPU (see the performance page). Reinstall with a "
    "C++ compiler present (pip install -e . from the source tree) to build it."
)


@functools.cache
def available() -> bool:
    """Whether the native library was built; registers its handlers the first time."""
    paths = sorted(_PACKAGE.glob("_native*.so")) + sorted(_PACKAGE.glob("_native*.pyd"))
    if not paths:
        return False
    library = ctypes.CDLL(str(paths[0]))
    for stem, symbol in _SYMBOLS.items():
        for suffix in _SUFFIX.values():
            jax.ffi.register_ffi_target(
                _target(stem, suffix), jax.ffi.pycapsule(getattr(library, symbol + suffix)), platform="cpu"
            )
            jax.ffi.register_ffi_target_as_batch_partitionable(_target(stem, suffix))
    return True


def _target(stem: str, suffix: str) -> str:
    return f"gpgrad_jax_{stem}_{suffix.lower()}"


def applies(dtype) -> bool:
    """Whether the native recursions can run ``dtype`` (float32, float64) and are built; warns
    once where they are not built."""
    if jnp.dtype(dtype) not in _SUFFIX:
        return False
    if not available():
        if jax.default_backend() == "cpu":  # elsewhere the JAX scans run anyway
            warn_once("native missing", MISSING, UserWarning)
        return False
    return True


def with_reference(call, reference):
    """``call`` (a native pass) on the CPU and ``reference`` (its JAX scan) on other platforms,
    with the reference's derivatives at any order: the scan is the reference."""

    @jax.custom_jvp
    def run(*args):
        return jax.lax.platform_dependent(*args, cpu=call, default=reference)

    run.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
    return run


_pass_p = Primitive("gpgrad_jax_native_pass")
_pass_p.multiple_results = True


def _native_pass(target: str, results, *operands):
    """Bind one native pass: ``results`` are ``jax.ShapeDtypeStruct``s whose shapes hold the same
    leading batch axes as every operand's."""
    results = tuple((tuple(r.shape), jnp.dtype(r.dtype).name) for r in results)
    # The unbatched rank of the first operand: what ``vmap`` adds in front of it is the batch.
    return tuple(_pass_p.bind(*operands, target=target, results=results, rank=np.ndim(operands[0])))


def _abstract_eval(*avals, target, results, rank):
    del avals, target, rank
    return [jax.core.ShapedArray(shape, jnp.dtype(dtype)) for shape, dtype in results]


def _batch(args, dims, *, target, results, rank):
    """A ``vmap``ped pass is the same pass with one more leading batch axis on every operand."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    args = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims)
    ]
    results = tuple(((size, *shape), dtype) for shape, dtype in results)
    outs = _pass_p.bind(*args, target=target, results=results, rank=rank)
    return outs, [0] * len(outs)


def _factor(index: int) -> str:
    # Shardy's factor names: i … z, then z_1, z_2, …
    return "ijklmnopqrstuvwxyz"[index] if index < 18 else f"z_{index - 17}"


def _sharding_rule(batch: tuple[int, ...], shapes) -> str:
    """Shardy's rule for a pass: the leading ``batch`` axes are factors shared by every operand
    and result; every other axis is its own factor that must stay whole (``need_replication``)."""
    sizes = [*batch]
    own = []

    def mapping(shape):
        names = [_factor(i) for i in range(len(batch))]
        for size in shape[len(batch) :]:
            own.append(len(sizes))
            names.append(_factor(len(sizes)))
            sizes.append(size)
        return "[" + ", ".join(names) + "]"

    operands, outputs = shapes
    left = ", ".join(mapping(s) for s in operands)
    right = ", ".join(mapping(s) for s in outputs)
    factors = ", ".join(f"{_factor(i)}={size}" for i, size in enumerate(sizes))
    replicated = f" need_replication={{{', '.join(_factor(i) for i in own)}}}" if own else ""
    return f"#sdy.op_sharding_rule<({left})->({right}) {{{factors}}}{replicated}, custom>"


def _lower(ctx, *operands, target, results, rank):
    batch = tuple(ctx.avals_in[0].shape[: ctx.avals_in[0].ndim - rank])
    # XLA partitions a custom call over its leading ``num_batch_dims`` axes (as it does jaxlib's
    # LAPACK calls); Shardy's rule carries the batch sharding through propagation.
    attributes = {"mhlo.frontend_attributes": ir.DictAttr.get({"num_batch_dims": ir.StringAttr.get(str(len(batch)))})}
    if jax.config.jax_use_shardy_partitioner:
        shapes = ([a.shape for a in ctx.avals_in], [a.shape for a in ctx.avals_out])
        attributes["sdy.sharding_rule"] = ir.Attribute.parse(_sharding_rule(batch, shapes))
    return jax.ffi.ffi_lowering(target, extra_attributes=attributes)(ctx, *operands)


_pass_p.def_abstract_eval(_abstract_eval)
_pass_p.def_impl(lambda *args, **params: jax.jit(functools.partial(_pass_p.bind, **params))(*args))
batching.primitive_batchers[_pass_p] = _batch
mlir.register_lowering(_pass_p, _lower, platform="cpu")


def filter_call(a, noise, c, o):
    """``(m⁻, P⁻, log terms)`` of the covariance filter (see ``covariance.filter_sequential``)."""
    n, big, q = a.shape[-3], a.shape[-1], o.shape[-1]
    batch = a.shape[:-3]
    out = (
        jax.ShapeDtypeStruct((*batch, n, big, q), a.dtype),
        jax.ShapeDtypeStruct((*batch, n, big, big), a.dtype),
        jax.ShapeDtypeStruct((*batch, n), a.dtype),
    )
    return _native_pass(_target("covariance_filter", _SUFFIX[jnp.dtype(a.dtype)]), out, a, noise, c, o)


def smooth_call(a, c, o, pred_mean, pred_cov):
    """``(ν, N, m_k|k, P_k|k, E[s_k|y], Cov(s_k|y))`` of the covariance smoother (see
    ``covariance._smooth_scan``)."""
    n, big, q = a.shape[-3], a.shape[-1], o.shape[-1]
    batch = a.shape[:-3]
    vector = jax.ShapeDtypeStruct((*batch, n, big, q), a.dtype)
    matrix = jax.ShapeDtypeStruct((*batch, n, big, big), a.dtype)
    return _native_pass(_target("covariance_smooth", _SUFFIX[jnp.dtype(a.dtype)]), (vector, matrix) * 3, a, c, o, pred_mean, pred_cov)


def square_root_filter_call(a, noise_factor, c, o):
    """The fields of ``square_root.Filtered`` (see ``square_root.filter_sequential``)."""
    n, big, p, q = a.shape[-3], a.shape[-1], c.shape[-2], o.shape[-1]
    batch = a.shape[:-3]
    out = tuple(
        jax.ShapeDtypeStruct((*batch, n, *shape), a.dtype) for shape in ((big, q), (big, big), (p, big), (p, q), (), ())
    )
    return _native_pass(_target("square_root_filter", _SUFFIX[jnp.dtype(a.dtype)]), out, a, noise_factor, c, o)


def square_root_smooth_call(a_next, noise_next, c, o, filt_mean, filt_factor, filt_c_factor, filt_residual):
    """``(E[s_k|y], o − C E[s_k|y], G, C G, W, ỹ)``: the smoothed marginals (``Cov(s_k|y) = GGᵀ``)
    and the pseudo-observation of every state by the data from it on (see ``square_root.smooth``)."""
    n, big, p, q = a_next.shape[-3], a_next.shape[-1], c.shape[-2], o.shape[-1]
    batch = a_next.shape[:-3]
    shapes = ((big, q), (p, q), (big, big), (p, big), (big, big), (big, q))
    out = tuple(jax.ShapeDtypeStruct((*batch, n, *shape), a_next.dtype) for shape in shapes)
    target = _target("square_root_smooth", _SUFFIX[jnp.dtype(a_next.dtype)])
    return _native_pass(target, out, a_next, noise_next, c, o, filt_mean, filt_factor, filt_c_factor, filt_residual)
