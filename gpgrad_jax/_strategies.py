"""``hypothesis`` strategies for users' own test suites (``gpgrad_jax.testing``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpgrad_jax import _kernels as kernel_classes
from gpgrad_jax import _noise as noise_classes

_POSITIVE = dict(min_value=0.3, max_value=2.0, allow_nan=False, allow_infinity=False)


def _floats(**bounds):
    return st.floats(**{**_POSITIVE, **bounds})


def _dtype(dtype):
    return jnp.zeros((), dtype).dtype if dtype is not None else jnp.zeros(()).dtype


def index_sets(n: int, index_dim: int | None = None, *, low: float = 0.0, high: float = 3.0, dtype=None):
    """Index sets ``x`` of ``n`` points in ``[low, high]``: shape ``(n,)``, or ``(n, index_dim)``.

    Values are drawn independently (ties and any order are possible); ``dtype`` defaults to
    JAX's default float.
    """
    shape = (n,) if index_dim is None else (n, index_dim)
    elements = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False, width=64)
    return hnp.arrays(np.float64, shape, elements=elements).map(lambda a: jnp.asarray(a, _dtype(dtype)))


def data(n: int, dim: int | None = None, *, scale: float = 2.0, dtype=None):
    """Data ``y`` (or a mean) of ``n`` points: shape ``(n,)``, or ``(n, dim)``, entries in ``[−scale, scale]``."""
    shape = (n,) if dim is None else (n, dim)
    elements = st.floats(min_value=-scale, max_value=scale, allow_nan=False, allow_infinity=False, width=64)
    return hnp.arrays(np.float64, shape, elements=elements).map(lambda a: jnp.asarray(a, _dtype(dtype)))


def _as_dtype(tree, dtype):
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, _dtype(dtype)), tree)


def kernels(index_dim: int | None = None, *, markov: bool = False, dtype=None):
    """Built-in kernels with parameters in well-conditioned ranges, elementary and composed.

    Every built-in kernel: Matérn 1/2, 3/2, 5/2, the squared exponential, and for scalar indices
    (``index_dim=None``) the curve kernels, SHO (qualities below, at and above ½) and Cosine;
    sums, ``c * k``, ``k + Constant`` and products of stationary kernels. ``index_dim``: ``None``
    for scalar indices, or ``d`` (ARD lengthscales of length ``d`` among them). ``markov=True``: only kernels with a state-space
    form (what ``solver="markov"`` accepts). Parameters are arrays of ``dtype`` (default: JAX's
    default float).
    """
    variance, lengthscale = _floats(), _floats(min_value=0.4, max_value=1.5)
    if index_dim is not None and not markov:
        lengthscale = st.one_of(lengthscale, hnp.arrays(np.float64, (index_dim,), elements=lengthscale))
    stationary = [
        st.builds(kernel_classes.Matern12, variance, lengthscale),
        st.builds(kernel_classes.Matern32, variance, lengthscale),
        st.builds(kernel_classes.Matern52, variance, lengthscale),
    ]
    if not markov:
        stationary.append(st.builds(kernel_classes.ExpSquared, variance, lengthscale))
    if index_dim is None:  # the time-series kernels take scalar indices
        quality = st.one_of(_floats(min_value=0.2, max_value=0.45), st.just(0.5), _floats(min_value=0.6, max_value=5.0))
        stationary += [
            st.builds(kernel_classes.SHO, variance, _floats(min_value=0.5, max_value=3.0), quality),
            st.builds(kernel_classes.Cosine, variance, _floats(min_value=0.8, max_value=3.0)),
        ]
    elementary = list(stationary)
    if index_dim is None:
        elementary += [st.builds(kernel_classes.CubicSpline, variance), st.builds(kernel_classes.Linear, variance)]
    leaf = st.one_of(elementary)
    composed = [
        st.builds(lambda a, b: a + b, leaf, leaf),
        st.builds(lambda c, k: c * k, variance, leaf),
        st.builds(lambda k, c: k + kernel_classes.Constant(c), leaf, variance),
        # Products of stationary kernels (Markov too: product blocks); the curve kernels' are not.
        st.builds(lambda a, b: a * b, st.one_of(stationary), st.one_of(stationary)),
    ]
    return st.one_of(leaf, *composed).map(lambda kernel: _as_dtype(kernel, dtype))


def noises(n: int, dim: int | None = None, *, kinds=("isotropic", "per_point", "rank_deficient", "dense"), dtype=None):
    """Noise models for ``n`` points of dimension ``dim`` (``None``: 1-D data).

    Kinds: ``"isotropic"``; ``"per_point"`` (well-conditioned full-rank blocks);
    ``"rank_deficient"`` (each point seen along a random ray: its block has no information along
    the ray; some blocks are zero, at least one is not); ``"dense"`` (a random ``S`` with
    more or fewer rows than ``n·D``, dense solver only). Arrays of ``dtype`` (default: JAX's
    default float).
    """
    d = 1 if dim is None else dim
    strategies = {
        "isotropic": st.builds(noise_classes.Isotropic, _floats(min_value=0.3, max_value=1.0)),
        "per_point": hnp.arrays(np.float64, (n, d, d), elements=_floats(min_value=-0.5, max_value=0.5)).map(
            lambda e: noise_classes.PerPoint(e + 2.0 * np.eye(d))
        ),
        "rank_deficient": st.tuples(
            hnp.arrays(np.float64, (n, d), elements=_floats(min_value=-1.0, max_value=1.0)),
            hnp.arrays(np.float64, (n,), elements=st.sampled_from([0.0, 1.0, 2.0, 3.0])),
        ).map(lambda rays_and_scales: _rank_deficient(*rays_and_scales)),
        "dense": st.sampled_from([-2, 1]).flatmap(
            lambda extra: hnp.arrays(
                np.float64, (n * d + extra, n * d), elements=_floats(min_value=-1.0, max_value=1.0)
            ).map(lambda s: noise_classes.Dense(s + 2.0 * np.eye(*s.shape)))
        ),
    }
    unknown = set(kinds) - set(strategies)
    if unknown:
        raise ValueError(f"`kinds` must be among {sorted(strategies)}, got {sorted(unknown)}")
    return st.one_of([strategies[kind] for kind in kinds]).map(lambda noise: _as_dtype(noise, dtype))


def _rank_deficient(rays, scales):
    n, d = rays.shape
    scales = scales.copy()
    scales[0] = max(scales[0], 1.0)  # at least one informative point
    if d == 1:  # a 1-D point has no ray: it is seen or not
        return noise_classes.PerPoint(np.where(scales > 0, scales, 0.0).reshape(n, 1, 1))
    rays = rays + np.eye(d)[0] * (np.linalg.norm(rays, axis=1, keepdims=True) < 1e-3)
    rays = rays / np.linalg.norm(rays, axis=1, keepdims=True)
    projectors = np.eye(d) - rays[:, :, None] * rays[:, None, :]
    return noise_classes.PerPoint(projectors * scales[:, None, None])


def problems(n: int, dim: int | None = None, index_dim: int | None = None, *, markov: bool = False):
    """Whole problems ``(kernel, x, y, noise, mean)`` from the strategies above, ready for
    ``gg.log_marginal_likelihood(*problem)``: ``n`` points of dimension ``dim`` (``None``: 1-D
    data of shape ``(n,)``) at indices of shape ``(n,)`` or ``(n, index_dim)``.

    ``markov=True``: only what ``solver="markov"`` accepts (scalar indices, a kernel with a
    state-space form, block-diagonal noise).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hypothesis import given, settings
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import testing
        >>> @settings(max_examples=3, deadline=None)
        ... @given(testing.problems(n=4, dim=3))
        ... def test_finite(problem):
        ...     assert jnp.isfinite(gg.log_marginal_likelihood(*problem))
        >>> test_finite()
    """
    if markov and index_dim is not None:
        raise ValueError(f"the Markov solvers need scalar indices: `index_dim` must be None, got {index_dim}")
    kinds = ("isotropic", "per_point", "rank_deficient") + (() if markov else ("dense",))
    return st.tuples(
        kernels(index_dim, markov=markov),
        index_sets(n, index_dim),
        data(n, dim),
        noises(n, dim, kinds=kinds),
        data(n, dim, scale=0.5),
    )
