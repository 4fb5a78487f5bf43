r"""The solver protocol: what every way of evaluating the likelihood and the posterior provides.

A solver is a small frozen dataclass whose fields are its options (hashable, so that it rides
through ``jit`` as a static argument; the inducing-point solver also holds its inducing inputs). The public functions check their arguments once
(``gpgrad_jax._arguments``), then call, on the solver chosen:

* ``prepare(problem)`` — what the solver builds from the problem once per call (the Markov
  solvers: the state-space blocks of the kernel), or ``Inapplicable`` with the reason;
* ``log_likelihood(prepared)`` — the precision-form ``L`` with its closed-form ``custom_vjp``;
* ``plain_log_likelihood(prepared)`` — the same forward computation without the rule: the plain
  autodiff baseline of the tests and benchmarks;
* ``index_gradient(prepared)`` — ``(L, ∇ₓL)``;
* ``predict(prepared, x_new)`` — posterior mean offset and variance, each ``(n_new, D)``;
* ``predict_covariance(prepared, x_new)`` — mean offset and full covariance ``(n_new, D, n_new, D)``;
* ``sample(key, prepared, x_new, num_samples)`` — posterior draws ``(num_samples, n_new, D)``.

Only ``log_likelihood`` is required. The defaults: ``plain_log_likelihood`` is
``log_likelihood`` (a solver without a custom rule is its own baseline), ``index_gradient``
differentiates ``log_likelihood`` in ``x``, ``predict_covariance`` is the dense formula, and
``predict`` and ``sample`` come from ``predict_covariance`` — exact whatever the solver, at the
dense solver's cost. ``exact = False`` marks a bound (``Inducing``):
``log_marginal_likelihood`` refuses it.

Adding a solver is one module with a subclass and one line in the registry of
``gpgrad_jax.solvers``; ``docs/architecture.md`` walks through it.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from gpgrad_jax._arguments import Problem
from gpgrad_jax._linalg import psd_sqrt

Array = Any


class Inapplicable(ValueError):
    """The solver cannot take this problem; the message says why."""


class Solver:
    """Base of the solvers (see the module docstring for the protocol)."""

    #: The solver's name in messages and in the ``solver=`` registry.
    name: ClassVar[str] = "solver"
    #: ``False`` for a bound: ``log_marginal_likelihood`` refuses it.
    exact: ClassVar[bool] = True

    def prepare(self, problem: Problem) -> Any:
        """What the other methods take: the problem itself unless the solver builds more."""
        return problem

    def log_likelihood(self, prepared) -> jax.Array:
        """The precision-form ``L``, with the solver's closed-form ``custom_vjp``."""
        raise NotImplementedError(f"{type(self).__name__} does not define log_likelihood")

    def plain_log_likelihood(self, prepared) -> jax.Array:
        """``L`` by the same forward computation with no custom rule (the autodiff baseline)."""
        return self.log_likelihood(prepared)

    def index_gradient(self, prepared) -> tuple[jax.Array, jax.Array]:
        """``(L, ∇ₓL)``."""
        return jax.value_and_grad(lambda x: self.log_likelihood(_with_x(prepared, x)))(prepared.x)

    def predict(self, prepared, x_new) -> tuple[jax.Array, jax.Array]:
        """Posterior mean offset and per-coordinate variance at ``x_new``, each ``(n_new, D)``."""
        offset, covariance = self.predict_covariance(prepared, x_new)
        n_new, dim = offset.shape
        variance = jnp.diagonal(covariance.reshape(n_new * dim, n_new * dim)).reshape(n_new, dim)
        return offset, variance

    def predict_covariance(self, prepared, x_new) -> tuple[jax.Array, jax.Array]:
        """Posterior mean offset ``(n_new, D)`` and covariance ``(n_new, D, n_new, D)``: the dense
        formula (O((nD)³ + (n_new D)²)) unless the solver has a faster one."""
        from gpgrad_jax._solver.dense import Dense

        return Dense().predict_covariance(Dense().prepare(_problem_of(prepared)), x_new)

    def rounding_estimate(self, prepared) -> tuple[Any, Any]:
        """``(estimate, level)``: the relative rounding the solver's result may carry and the level
        above which it warns, or ``(None, None)`` where it has no estimate."""
        return None, None

    def sample(self, key, prepared, x_new, num_samples: int) -> jax.Array:
        """Posterior draws at ``x_new``, ``(num_samples, n_new, D)``: the mean plus the symmetric
        square root of ``predict_covariance`` times standard normal draws."""
        offset, covariance = self.predict_covariance(prepared, x_new)
        return draws_from_covariance(key, num_samples, offset, covariance)



def _problem_of(prepared) -> Problem:
    """The ``Problem`` inside a solver's prepared arguments (a ``Problem`` or a tuple that
    starts with its four fields)."""
    return Problem(*prepared[:4])


def _with_x(prepared, x):
    return prepared._replace(x=x)


@functools.partial(jax.jit, static_argnums=1)
def draws_from_covariance(key, num_samples: int, offset, covariance) -> jax.Array:
    """``offset + C^{1/2} ξ``, ``(num_samples, *offset.shape)``, with ``C^{1/2}`` the symmetric
    square root of the covariance (eigenvalues below zero, rounding, clipped): exact for a
    positive semi-definite covariance, whatever its rank."""
    size = offset.size
    root = psd_sqrt(covariance.reshape(size, size))  # symmetric
    standard = jax.random.normal(key, (num_samples, size), offset.dtype)
    return offset + (standard @ root).reshape(num_samples, *offset.shape)


def call(method, *args):
    """``method(*args)``; under a mesh with explicit axes, a sharding failure gets the recipe.

    Under a mesh with ``AxisType.Explicit`` axes (``jax.make_mesh``'s default), ``vmap`` over a
    batch sharded along such an axis puts a sharding into every array's type, and several of
    JAX's batching rules (``stack``, reshapes that merge two axis pairs) then refuse to trace.
    The solvers never communicate between problems, so the remedy is to run the batched
    function with the axes automatic — ``jax.sharding.auto_axes`` — where the partitioner keeps
    each problem on its own device.
    """
    try:
        return method(*args)
    except Exception as err:
        mesh = jax.sharding.get_abstract_mesh()
        if type(err).__name__ != "ShardingTypeError" or mesh.empty or not mesh.explicit_axes:
            raise
        raise TypeError(
            f"the solvers cannot trace with the explicit mesh axes {mesh.explicit_axes} ({err}). "
            "Run the batched function with the axes automatic: "
            "jax.sharding.auto_axes(jax.vmap(f), out_sharding=PartitionSpec('batch'))(...) inside "
            "jax.jit, or build the mesh with axis_types=(jax.sharding.AxisType.Auto,); see the "
            "README's 'Scaling out'."
        ) from err


def mesh_axis(mesh, axis, what: str) -> tuple[Any, int] | None:
    """``(axis, size)``: the axis of ``mesh`` that ``what`` (the points, the series) is split
    along, checked — ``axis`` a name or a tuple of names, ``None`` for a mesh of one axis — and
    its number of devices; ``None`` without a mesh."""
    if mesh is None:
        if axis is not None:
            raise ValueError(f"`axis` ({axis!r}) names an axis of `mesh`, which is None: pass the mesh too")
        return None
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh (or None), got {type(mesh).__name__}")
    if axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"`axis`: name the mesh axis {what} split along, one of {mesh.axis_names}")
        axis = mesh.axis_names[0]
    names = axis if isinstance(axis, tuple) else (axis,)
    if not names or any(a not in mesh.axis_names for a in names):
        raise ValueError(f"`axis` must name axes of `mesh` {mesh.axis_names} (a name or a tuple of names), got {axis!r}")
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return axis, size
