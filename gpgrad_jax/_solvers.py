"""The ``solver=`` keyword: names to solver objects, and the ``"auto"`` choice.

Every solver offers ``log_marginal_likelihood`` — the precision form ``L``, with its
closed-form ``custom_vjp``; the public function of that name adds the noise-only term —
``index_gradient`` and ``predict`` on validated, dtype-normalised arguments
``(kernel, noise, x, r)`` with ``r = y − μ`` of shape ``(n, D)``.
"""

from __future__ import annotations

import jax

from gpgrad_jax._dense import DenseSolver
from gpgrad_jax._markov import MarkovSolver
from gpgrad_jax._noise import BlockDiagonal
from gpgrad_jax._statespace import NoStateSpaceForm, model_components

SOLVERS = ("auto", "dense", "markov", "markov-parallel")

#: ``"auto"`` uses a Markov solver from this many points on: below it the dense solver's few
#: large matrix operations beat the scan's per-step cost (measured by benchmarks/run.py).
MARKOV_MIN_POINTS = 32

_DENSE = DenseSolver()
_MARKOV = {False: MarkovSolver(parallel=False), True: MarkovSolver(parallel=True)}


def markov_obstacle(kernel, noise, x) -> str | None:
    """Why the state-space solvers cannot take this problem, or ``None`` when they can."""
    if x.ndim != 1:
        return f"they need scalar indices, `x` has shape {x.shape}"
    if not isinstance(noise, BlockDiagonal):
        return (
            f"noise.{type(noise).__name__} is not block diagonal per point (use Isotropic or "
            "PerPoint noise)"
        )
    try:
        model_components(kernel)
    except NoStateSpaceForm as err:
        return str(err)
    return None


def resolve(solver: str, kernel, noise, x, n_new: int = 0):
    """The solver object for ``solver`` (one of ``SOLVERS``) on this problem; ``n_new`` new
    indices to predict or draw at count towards the size ``"auto"`` weighs (the dense solver's
    predictions grow with them too: ``(n_new D)²`` memory for draws)."""
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {', '.join(map(repr, SOLVERS))}; got {solver!r}")
    if solver == "dense":
        return _DENSE
    obstacle = markov_obstacle(kernel, noise, x)
    if solver == "auto":
        if obstacle is not None or x.shape[0] + n_new < MARKOV_MIN_POINTS:
            return _DENSE
        return _MARKOV[jax.default_backend() != "cpu"]
    if obstacle is not None:
        raise ValueError(f"solver={solver!r} cannot be used here: {obstacle}")
    return _MARKOV[solver == "markov-parallel"]


def call_solver(method, *args):
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
