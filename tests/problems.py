"""Random, well-conditioned GP problems for the tests, drawn from a few fixed sizes.

Shapes come from small fixed sets so that ``jit`` compiles once per shape and
kernel structure, while ``hypothesis`` varies the values through a seed.

Compilation, not arithmetic, is what the suite spends its time on. So in the fast profile
(``GPGRAD_TESTS=fast``) every *structural* choice — the data dimension, the index dimension,
scalar or ARD lengthscales, the form of the noise blocks — is fixed per (kernel, noise)
combination, spread over the combinations so that each form is still covered, and only the
values vary between examples: one compilation per test case. The full profile draws the
structure per example too.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from gpgrad_jax import kernels, noise

N_POINTS = 6
DATA_DIMS = (1, 3)

# name -> (factory(rng, ard_dim) -> kernel, scalar indices only); ard_dim: see _lengthscale
KERNELS = {
    "curve": (
        lambda rng, d: (
            kernels.CubicSpline(rng.uniform(0.5, 2.0))
            + kernels.Linear(rng.uniform(0.2, 1.0))
            + kernels.Constant(rng.uniform(0.2, 1.0))
        ),
        True,
    ),
    "cubic_spline": (lambda rng, d: kernels.CubicSpline(rng.uniform(0.5, 2.0)), True),
    "linear": (lambda rng, d: kernels.Linear(rng.uniform(0.2, 2.0)), False),
    "exp_squared": (
        lambda rng, d: kernels.ExpSquared(rng.uniform(0.5, 2.0), _lengthscale(rng, d)),
        False,
    ),
    "matern32": (
        lambda rng, d: kernels.Matern32(rng.uniform(0.5, 2.0), _lengthscale(rng, d)),
        False,
    ),
    "matern52": (
        lambda rng, d: kernels.Matern52(rng.uniform(0.5, 2.0), _lengthscale(rng, d)),
        False,
    ),
    "scaled_product_plus_constant": (
        lambda rng, d: (
            rng.uniform(0.5, 2.0)
            * kernels.Matern52(1.0, _lengthscale(rng, d))
            * kernels.ExpSquared(1.0, 2.0 * _lengthscale(rng, d))
            + kernels.Constant(rng.uniform(0.1, 1.0))
        ),
        False,
    ),
}

NOISES = ("isotropic", "per_point", "per_point_rank_deficient", "dense")


FULL = os.environ.get("GPGRAD_TESTS", "fast") == "full"
BY_STRUCTURE = "by structure"  # a dimension chosen by the structure rng (see the module docstring)


def _lengthscale(rng, ard_dim):
    """A scalar lengthscale, or one per index dimension (ARD) when ``ard_dim`` is an int."""
    return rng.uniform(0.4, 1.5) if ard_dim is None else rng.uniform(0.4, 1.5, size=ard_dim)


def _structure(seed, dim, index_dim, kernel_names, kernel_name, noise_kinds, noise_kind):
    """``(dim, index_dim, ard_dim, shape_rng)``: dimensions left ``BY_STRUCTURE`` resolved, ARD or
    not, and the generator of the remaining structural choices (the form of the noise blocks).

    Full profile: drawn per example. Fast profile: a fixed function of the (kernel, noise) pair,
    laid out so that every kernel meets all four (data dim, index dim) pairs over the noise kinds,
    ARD and scalar lengthscales on vector indices, and every noise kind both data dims.
    """
    if FULL:
        rng = np.random.default_rng(seed)
        draws = rng.integers(2, size=3)
    else:
        i, j = sorted(kernel_names).index(kernel_name), noise_kinds.index(noise_kind)
        rng = np.random.default_rng(zlib.crc32(f"{kernel_name}/{noise_kind}".encode()))
        draws = (i + j) % 2, (i + j // 2) % 2, (j + j // 2) % 2
    if dim == BY_STRUCTURE:
        dim = DATA_DIMS[draws[0]]
    if index_dim == BY_STRUCTURE:
        index_dim = (None, 2)[draws[1]]
    return dim, index_dim, index_dim if draws[2] else None, rng


def make_noise(kind: str, rng: np.random.Generator, n: int, dim: int, shape_rng=None) -> noise.Noise:
    shape_rng = rng if shape_rng is None else shape_rng
    if kind == "isotropic":
        return noise.Isotropic(rng.uniform(0.3, 1.0))
    if kind == "per_point":
        # Well-conditioned blocks (singular ones are the rank-deficient kind's job): with
        # cond(B) ~ 10³ float32 cannot check log|det B|'s gradient against a reference at all.
        blocks = 0.5 * rng.normal(size=(n, dim, dim)) + 2.0 * np.eye(dim)
        if dim == 1 and shape_rng.uniform() < 0.5:
            blocks = blocks.reshape(n)  # the (n,) form for 1-D data
        return noise.PerPoint(blocks)
    if kind == "per_point_rank_deficient":
        # Each point seen along one ray: precision zero along the ray; some
        # points carry no information at all (a zero block).
        rays = rng.normal(size=(n, dim))
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        blocks = (np.eye(dim) - rays[:, :, None] * rays[:, None, :]) / rng.uniform(0.3, 1.0, (n, 1, 1))
        blocks[rng.uniform(size=n) < 0.25] = 0.0
        if dim == 1:
            blocks[0] = 1.5  # keep at least one informative point for 1-D data
        return noise.PerPoint(blocks)
    if kind == "dense":
        rows = n * dim + int(shape_rng.choice([-2, 1]))
        return noise.Dense(rng.normal(size=(rows, n * dim)) / 2.0)
    raise ValueError(kind)


@dataclasses.dataclass
class Problem:
    kernel: kernels.Kernel
    x: jax.Array
    y: jax.Array
    noise: noise.Noise
    mean: jax.Array

    def args(self):
        return self.kernel, self.x, self.y, self.noise, self.mean

    @property
    def dim(self) -> int:
        """``D``, the dimension of each data point."""
        return 1 if self.y.ndim == 1 else self.y.shape[1]

    def astype(self, dtype) -> Problem:
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        return Problem(*(jax.tree_util.tree_map(cast, a) for a in self.args()))


def make_problem(
    kernel_name: str,
    noise_kind: str,
    seed: int,
    dim: int | str = BY_STRUCTURE,
    index_dim: int | str | None = BY_STRUCTURE,
    n: int = N_POINTS,
) -> Problem:
    rng = np.random.default_rng(seed)
    dim, index_dim, ard_dim, shape_rng = _structure(seed, dim, index_dim, KERNELS, kernel_name, NOISES, noise_kind)
    factory, scalar_only = KERNELS[kernel_name]
    if scalar_only:
        index_dim = ard_dim = None
    kernel = factory(rng, ard_dim)
    if index_dim is None:
        x = np.sort(rng.uniform(0.05, 3.0, n))
    else:
        x = rng.normal(size=(n, index_dim))
    y_shape = (n,) if dim == 1 else (n, dim)
    y = rng.normal(size=y_shape)
    mean = 0.3 * rng.normal(size=y_shape)
    dtype = jnp.zeros(()).dtype  # float64 under x64, else float32
    problem = Problem(kernel, x, y, make_noise(noise_kind, rng, n, dim, shape_rng), mean)
    return problem.astype(dtype)


def kernel_noise_pairs(kernel_names, noise_kinds, per_kernel: int = 1) -> list[tuple[str, str]]:
    """The (kernel, noise) cases of a property: all of them in the full profile; in the fast one
    ``per_kernel`` noise kinds per kernel, in turn, so that every kernel, every noise
    kind and (through ``_structure``) both data dimensions still appear — a fraction of the
    compilations, which are what the fast profile's time goes to (its budget: ~5 minutes from a
    clean clone)."""
    kernel_names = sorted(kernel_names)
    if FULL or per_kernel >= len(noise_kinds):
        return [(k, nk) for k in kernel_names for nk in noise_kinds]
    count, stride = len(noise_kinds), len(kernel_names)  # each further noise kind continues the round
    return [(k, noise_kinds[(i + step * stride) % count]) for i, k in enumerate(kernel_names) for step in range(per_kernel)]


seeds = st.integers(min_value=0, max_value=2**32 - 1)
# Drawn per example in the full profile; in the fast one left to the structure rng.
data_dims = st.sampled_from(DATA_DIMS) if FULL else st.just(BY_STRUCTURE)
index_dims = st.sampled_from([None, 2]) if FULL else st.just(BY_STRUCTURE)


def assert_trees_close(actual, expected, rtol, what=""):
    """Leafwise ``‖a − e‖∞ ≤ rtol · max(‖e‖∞, 1)``; also checks structure and finiteness."""
    _actual_leaves, actual_def = jax.tree_util.tree_flatten(actual)
    expected_leaves, expected_def = jax.tree_util.tree_flatten(expected)
    assert actual_def == expected_def, f"{what}: structure {actual_def} != {expected_def}"
    for path_and_a, e in zip(jax.tree_util.tree_leaves_with_path(actual), expected_leaves):
        path, a = path_and_a
        a, e = np.asarray(a), np.asarray(e)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        assert np.all(np.isfinite(a)), f"{name}: non-finite values {a}"
        scale = max(float(np.max(np.abs(e), initial=0.0)), 1.0)
        err = float(np.max(np.abs(a - e), initial=0.0))
        assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}\n{a}\n{e}"


# Kernels with a state-space form: name -> factory(rng) (scalar indices).
MARKOV_KERNELS = {
    "curve": lambda rng: KERNELS["curve"][0](rng, None),
    "matern32": lambda rng: kernels.Matern32(rng.uniform(0.5, 2.0), rng.uniform(0.4, 1.5)),
    "matern52": lambda rng: kernels.Matern52(rng.uniform(0.5, 2.0), rng.uniform(0.4, 1.5)),
    "scaled_sum": lambda rng: (
        rng.uniform(0.5, 2.0) * kernels.Matern52(1.0, rng.uniform(0.4, 1.5))
        + kernels.Matern32(rng.uniform(0.2, 1.0), rng.uniform(0.4, 1.5))
        + kernels.CubicSpline(rng.uniform(0.2, 1.0))
        + kernels.Constant(rng.uniform(0.2, 1.0))
    ),
    "linear_constant": lambda rng: kernels.Linear(rng.uniform(0.2, 1.0)) + kernels.Constant(rng.uniform(0.2, 1.0)),
}

MARKOV_NOISES = ("isotropic", "per_point", "per_point_rank_deficient")

# Time-series kernels (generic state-space rule, kinks at ties): name -> factory(rng).
TIME_SERIES_KERNELS = {
    "matern12": lambda rng: kernels.Matern12(rng.uniform(0.5, 2.0), rng.uniform(0.3, 1.5)),
    # quality below, at and above 1/2, where the closed forms change
    "sho": lambda rng: kernels.SHO(
        rng.uniform(0.5, 1.5), rng.uniform(1.0, 4.0), rng.choice([rng.uniform(0.15, 0.45), 0.5, rng.uniform(0.6, 5.0)])
    ),
    "cosine": lambda rng: kernels.Cosine(rng.uniform(0.5, 2.0), rng.uniform(0.8, 3.0)),
    "quasi_periodic": lambda rng: (
        kernels.Matern32(rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)) * kernels.Cosine(1.0, rng.uniform(0.8, 3.0))
        + kernels.Matern12(rng.uniform(0.1, 0.5), rng.uniform(0.3, 1.0))
    ),
    "sum_of_products": lambda rng: (
        (kernels.Matern52(1.0, rng.uniform(0.5, 2.0)) + kernels.SHO(0.7, rng.uniform(1.0, 3.0), 2.0))
        * kernels.Cosine(rng.uniform(0.5, 1.5), rng.uniform(0.8, 3.0))
        * kernels.Matern12(1.0, rng.uniform(1.0, 3.0))
        + rng.uniform(0.5, 2.0) * kernels.SHO(0.5, rng.uniform(1.0, 3.0), 0.3)
    ),
    "trend_plus_matern12": lambda rng: (
        kernels.CubicSpline(rng.uniform(0.2, 1.0)) + kernels.Linear(0.5) + kernels.Matern12(rng.uniform(0.2, 1.0), 0.5)
    ),
}


def make_markov_problem(
    kernel_name: str,
    noise_kind: str,
    seed: int,
    dim: int | str = BY_STRUCTURE,
    n: int = N_POINTS,
    kernel_table=None,
    ties: int = 1,
) -> Problem:
    """A problem for the state-space solvers: scalar indices in random order with ``ties`` ties
    (each possibly a no-op), from ``MARKOV_KERNELS`` or ``kernel_table``."""
    kernel_table = MARKOV_KERNELS if kernel_table is None else kernel_table
    rng = np.random.default_rng(seed)
    dim, _, _, shape_rng = _structure(seed, dim, None, kernel_table, kernel_name, MARKOV_NOISES, noise_kind)
    kernel = kernel_table[kernel_name](rng)
    x = rng.permutation(rng.uniform(0.05, 3.0, n))
    for _ in range(ties):
        x[rng.integers(n)] = x[rng.integers(n)]  # a tie (or a no-op), anywhere
    y_shape = (n,) if dim == 1 else (n, dim)
    problem = Problem(
        kernel,
        x,
        rng.normal(size=y_shape),
        make_noise(noise_kind, rng, n, dim, shape_rng),
        0.3 * rng.normal(size=y_shape),
    )
    return problem.astype(jnp.zeros(()).dtype)


def jaxpr_shapes(fn, *args) -> set:
    """Every intermediate array shape in ``fn``'s jaxpr, sub-jaxprs (scans, custom rules) included."""
    import jax.extend

    shapes = set()

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                collect(sub)

    collect(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def _value_and_grads(solver, *args):
    import functools

    import gpgrad_jax as gg

    return jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver=solver), argnums=(0, 1, 2, 3, 4))(*args)


def _against_dense(solver, *args):
    """One compilation per shape and structure: the solver's rule, its explicit gradient, dense."""
    import gpgrad_jax as gg

    return _value_and_grads(solver, *args), gg.index_gradient(*args, solver=solver), _value_and_grads("dense", *args)


against_dense = jax.jit(_against_dense, static_argnums=0)


def check_against_dense(solver: str, problem: Problem, rtol: float) -> None:
    """Value, every cotangent (kernel, x, y, noise, mean) and ``index_gradient`` of ``solver``
    against the dense solver's."""
    (value, grads), explicit, (ref_value, ref_grads) = against_dense(solver, *problem.args())
    assert_trees_close(value, ref_value, rtol, f"{solver} value")
    for name, grad, ref in zip(("kernel", "x", "y", "noise", "mean"), grads, ref_grads):
        assert_trees_close(grad, ref, rtol, f"{solver} d/d{name}")
    assert_trees_close(explicit, (ref_value, ref_grads[1]), rtol, f"{solver} index_gradient")


# ------------------------------------------------------------ every solver

# Every state-space kernel, one table: the contract tests run each solver over all of them.
STATE_SPACE_KERNELS = {**MARKOV_KERNELS, **TIME_SERIES_KERNELS}


def state_space_problem(kernel_name: str, noise_kind: str, seed: int, dim: int | str = BY_STRUCTURE) -> Problem:
    """A problem for ``STATE_SPACE_KERNELS[kernel_name]``: the time-series kernels (kinks at ties)
    on 7 points with two ties, the others on 6 with one."""
    if kernel_name in TIME_SERIES_KERNELS:
        return make_markov_problem(kernel_name, noise_kind, seed, dim, n=7, kernel_table=TIME_SERIES_KERNELS, ties=2)
    return make_markov_problem(kernel_name, noise_kind, seed, dim)


def _solvers():
    import gpgrad_jax as gg

    markov = gg.solvers.Markov
    return {
        "dense": gg.solvers.Dense(),
        "markov": markov(),  # the form by the dtype: covariance in float64, square root below
        "markov-square-root": markov(form="square-root"),  # the float32 form, checked in float64 too
        "markov-parallel": markov(parallel=True),
        "markov-parallel-square-root": markov(form="square-root", parallel=True),
    }


#: Every solver the contract tests drive, by name (as diffrax's ``all_ode_solvers``): the options
#: of ``gg.solvers.Markov`` that change the computation. (``form="covariance"`` is ``"markov"``
#: in float64; in float32 it is the form the docs advise against.) A solver added to the library
#: is added here.
SOLVERS = _solvers()

#: The associative scans compile for 5–20 s per structure on the CPU: full profile only.
SLOW_SOLVERS = ("markov-parallel", "markov-parallel-square-root")


def solver_params(names=None, fast=("dense", "markov"), float32=("dense", "markov")):
    """``pytest.param``s of ``SOLVERS`` (all, or ``names``): those not in ``fast`` in the full
    profile only; those in ``float32`` also in the fast profile's float32 pass."""
    import pytest

    params = []
    for name in SOLVERS if names is None else names:
        marks = [] if name in fast else [pytest.mark.slow]
        if name in float32:
            marks.append(pytest.mark.float32)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def rerun_on_host_devices(path: str, devices: int, timeout: float) -> None:
    """Run the test file ``path`` in a fresh process with ``devices`` forced host (CPU) devices —
    the device count is fixed when JAX starts — and assert that its tests passed."""
    # The device count first (XLA stops at a word without "--").
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false "
    flags += os.environ.get("XLA_FLAGS", "")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", path],
        env=dict(os.environ, XLA_FLAGS=flags),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]
