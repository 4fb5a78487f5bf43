"""Every public function × solver × transformation, as programs: what the LAPACK check lowers and
the hang soak (``tests/soak.py``) runs.

A *case* is ``(function, solver)``; a *transform* one of ``TRANSFORMS``. ``program(case,
transform)`` returns a callable of ``(kernel, x, y, noise, mean)`` — batched along the first axis
of everything but the kernel for the ``vmap`` transforms — and ``problem(...)`` its arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise

SOLVERS = ("dense", "markov", "markov-parallel")
#: Functions taking ``solver=``; the inducing bound's functions are the ``"inducing"`` cases.
SOLVER_FUNCTIONS = (
    "log_marginal_likelihood",
    "precision_form_log_likelihood",
    "index_gradient",
    "predict",
    "predict_covariance",
    "sample_posterior",
)
INDUCING_FUNCTIONS = ("inducing_bound", "predict", "sample_posterior")
CASES = tuple((f, s) for f in SOLVER_FUNCTIONS for s in SOLVERS) + tuple((f, "inducing") for f in INDUCING_FUNCTIONS)
TRANSFORMS = ("eager", "jit", "vmap", "grad", "vmap_grad", "hessian")


def _call(case, kernel, x, y, nz, mean):
    """The function of ``case`` on one problem; its result as a tuple of arrays."""
    function, solver = case
    n_new = 7
    x_new = jnp.linspace(0.05, 3.0, n_new, dtype=x.dtype)
    key = jax.random.key(0)
    if solver == "inducing":
        z = jnp.linspace(0.1, 2.9, 5, dtype=x.dtype)
        if function == "inducing_bound":
            return (gg.inducing_bound(kernel, x, y, nz, z, mean),)
        if function == "predict":
            return gg.predict(kernel, x, y, nz, x_new, mean, inducing=z)
        return (gg.sample_posterior(key, kernel, x, y, nz, x_new, 3, mean, inducing=z),)
    if function in ("log_marginal_likelihood", "precision_form_log_likelihood"):
        return (getattr(gg, function)(kernel, x, y, nz, mean, solver=solver),)
    if function == "index_gradient":
        return gg.index_gradient(kernel, x, y, nz, mean, solver=solver)
    if function == "predict":
        return gg.predict(kernel, x, y, nz, x_new, mean, solver=solver)
    if function == "predict_covariance":
        return gg.predict(kernel, x, y, nz, x_new, mean, solver=solver, full_covariance=True)
    return (gg.sample_posterior(key, kernel, x, y, nz, x_new, 3, mean, solver=solver, noise_new=noise.Isotropic(0.5)),)


def _total(case, *args):
    return sum(jnp.sum(leaf) for leaf in _call(case, *args))


def program(case, transform):
    """The program of ``case`` under ``transform``: a callable of ``(kernel, x, y, noise, mean)``."""
    one = functools.partial(_call, case)
    total = functools.partial(_total, case)
    grad = jax.grad(total, argnums=(0, 1, 2, 3, 4))
    batched = functools.partial(jax.vmap, in_axes=(None, 0, 0, 0, 0))
    return {
        "eager": one,
        "jit": jax.jit(one),
        "vmap": jax.jit(batched(one)),
        "grad": jax.jit(grad),
        "vmap_grad": jax.jit(batched(grad)),
        "hessian": jax.jit(jax.hessian(total, argnums=1)),
    }[transform]


def problem(n: int, dim: int, dtype, batch: int | None = None, noise_kind: str = "per_point", seed: int = 0):
    """``(kernel, x, y, noise, mean)``: a curve in ``dim ≥ 2`` dimensions seen along one camera ray
    per point (``PerPoint`` blocks of rank ``dim − 1``, or ``Dense`` noise), unsorted indices with
    a tie; a leading batch axis on all but the kernel when ``batch`` is given."""
    rng = np.random.default_rng(seed)

    def one(rng):
        x = rng.permutation(rng.uniform(0.05, 3.0, n))
        x[1] = x[0]
        y = np.stack([np.cos(x), np.sin(x), 0.3 * x][:dim], axis=1) + 0.05 * rng.normal(size=(n, dim))
        if noise_kind == "dense":
            nz = noise.Dense(rng.normal(size=(n * dim, n * dim)) / np.sqrt(n * dim) + 3.0 * np.eye(n * dim))
        else:
            rays = rng.normal(size=(n, dim))
            rays /= np.linalg.norm(rays, axis=1, keepdims=True)
            nz = noise.PerPoint((np.eye(dim) - rays[:, :, None] * rays[:, None, :]) / 0.1)
        return x, y, nz, 0.1 * y

    kernel = kernels.CubicSpline(1.0) + kernels.Linear(0.5) + kernels.Constant(0.5)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    if batch is None:
        parts = one(rng)
    else:
        problems = [one(rng) for _ in range(batch)]
        parts = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *problems)
    return jax.tree_util.tree_map(cast, (kernel, *parts))
