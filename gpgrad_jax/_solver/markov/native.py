r"""The native recursions: the covariance form's filter and smoother passes in C++ (``csrc/``), one
``jax.ffi`` custom call per pass over all points.

XLA:CPU runs a ``lax.scan`` step through its loop machinery, hundreds of nanoseconds per step
whatever the arithmetic; a C++ loop costs the arithmetic. The library built by ``pip install``
(``gpgrad_jax/_native*.so``, a plain shared library: no Python API, loaded with ``ctypes``)
registers its handlers for the CPU on first use. Where it is missing — no C++ compiler at install
time — the solvers run the JAX scans, after a one-time warning; on other platforms
(``lax.platform_dependent``) the JAX scans always run.

The calls are single-threaded and take leading batch axes (``vmap``: ``broadcast_all``) as a
loop. Their derivatives, where anything differentiates them (second order, the plain-autodiff
baseline), are those of the JAX scans (``covariance.py``): the JAX scans are the reference.
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

import jax
import jax.numpy as jnp

from gpgrad_jax._diagnostics import warn_once

_PACKAGE = pathlib.Path(__file__).resolve().parents[2]

#: Handler symbols of ``csrc/markov_kernels.cc`` by pass, per dtype suffix.
_SYMBOLS = {"filter": "GpgradCovarianceFilter", "smooth": "GpgradCovarianceSmooth"}
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
    return True


def _target(stem: str, suffix: str) -> str:
    return f"gpgrad_jax_covariance_{stem}_{suffix.lower()}"


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


def filter_call(a, noise, c, o):
    """``(m⁻, P⁻, log terms)`` of the covariance filter (see ``covariance.filter_sequential``)."""
    n, big, q = a.shape[-3], a.shape[-1], o.shape[-1]
    batch = a.shape[:-3]
    out = (
        jax.ShapeDtypeStruct((*batch, n, big, q), a.dtype),
        jax.ShapeDtypeStruct((*batch, n, big, big), a.dtype),
        jax.ShapeDtypeStruct((*batch, n), a.dtype),
    )
    call = jax.ffi.ffi_call(_target("filter", _SUFFIX[jnp.dtype(a.dtype)]), out, vmap_method="broadcast_all")
    return call(a, noise, c, o)


def smooth_call(a, c, o, pred_mean, pred_cov):
    """``(ν, N, m_k|k, P_k|k, E[s_k|y], Cov(s_k|y))`` of the covariance smoother (see
    ``covariance._smooth_scan``)."""
    n, big, q = a.shape[-3], a.shape[-1], o.shape[-1]
    batch = a.shape[:-3]
    vector = jax.ShapeDtypeStruct((*batch, n, big, q), a.dtype)
    matrix = jax.ShapeDtypeStruct((*batch, n, big, big), a.dtype)
    call = jax.ffi.ffi_call(_target("smooth", _SUFFIX[jnp.dtype(a.dtype)]), (vector, matrix) * 3, vmap_method="broadcast_all")
    return call(a, c, o, pred_mean, pred_cov)
