r"""The solvers, as objects: what ``solver=`` takes besides a name.

Every public function that evaluates the likelihood or the posterior takes ``solver=`` — a
registered name (``"auto"``, ``"dense"``, ``"markov"``, ``"markov-parallel"``) or a solver object,
which may carry options the names do not:

* [``Dense``][gpgrad_jax.solvers.Dense]`()` — one Cholesky factorisation of ``U``; any problem;
* [``Markov``][gpgrad_jax.solvers.Markov]`(form=None, parallel=False)` — the Kalman filter and
  smoother, O(n), in covariance or square-root form, by sequential or associative scans;
* [``Inducing``][gpgrad_jax.solvers.Inducing]`(inducing, jitter=None)` — Titsias' bound with
  inducing inputs ``Z`` and its variational posterior (for ``predict`` and ``sample_posterior``;
  a bound, so ``log_marginal_likelihood`` refuses it — use ``gg.inducing_bound``).

All of them follow one protocol ([``Solver``][gpgrad_jax.solvers.Solver]): ``prepare`` what the
solver needs from a problem, the value with its closed-form rule, the gradient in ``x``, the
posterior's marginals, covariance and draws — each with a default from the others where a solver
has no faster form. A solver of your own is a subclass and, to use it by name, one
``register`` call (``docs/architecture.md``).

Examples:
    >>> import jax.numpy as jnp
    >>> import gpgrad_jax as gg
    >>> from gpgrad_jax import kernels, noise
    >>> x = jnp.linspace(0.0, 5.0, 40)
    >>> args = (kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1))
    >>> a = gg.log_marginal_likelihood(*args, solver="markov")
    >>> b = gg.log_marginal_likelihood(*args, solver=gg.solvers.Markov(form="square-root"))
    >>> bool(jnp.allclose(a, b))
    True
    >>> sorted(gg.solvers.names())
    ['auto', 'dense', 'markov', 'markov-parallel']
"""

from __future__ import annotations

from gpgrad_jax._arguments import prepare as _check
from gpgrad_jax._solver.base import Inapplicable, Solver
from gpgrad_jax._solver.dense import Dense
from gpgrad_jax._solver.inducing import Inducing
from gpgrad_jax._solver.markov import Markov, default_for_backend

__all__ = [
    "Dense",
    "Inapplicable",
    "Inducing",
    "Markov",
    "Solver",
    "names",
    "prepare",
    "register",
    "resolve",
    "rounding_estimate",
]

_REGISTRY: dict[str, Solver] = {
    "dense": Dense(),
    "markov": Markov(),
    "markov-parallel": Markov(parallel=True),
}

#: ``"auto"`` uses a Markov solver from this many points (data and new) on: below it the dense
#: solver's few large matrix operations beat the scan's per-step cost (``benchmarks/run.py``).
MARKOV_MIN_POINTS = 32


def names() -> tuple[str, ...]:
    """The names ``solver=`` takes: ``"auto"`` and the registered solvers'."""
    return ("auto", *_REGISTRY)


def register(name: str, solver: Solver) -> None:
    """Make ``solver=name`` mean ``solver`` (a [``Solver``][gpgrad_jax.solvers.Solver] instance).

    Examples:
        >>> import gpgrad_jax as gg
        >>> gg.solvers.register("markov-sqrt", gg.solvers.Markov(form="square-root"))
        >>> "markov-sqrt" in gg.solvers.names()
        True
    """
    if not isinstance(name, str) or name == "auto":
        raise ValueError(f"a solver's name must be a string other than 'auto', got {name!r}")
    if not isinstance(solver, Solver):
        raise TypeError(f"`solver` must be a gpgrad_jax.solvers.Solver instance, got {type(solver).__name__}")
    _REGISTRY[name] = solver


def resolve(solver, kernel, x, y, noise, mean=None, *, n_new: int = 0) -> Solver:
    """The solver object ``solver=`` (a name or a [``Solver``][gpgrad_jax.solvers.Solver]) stands for
    on this problem — what ``"auto"`` picks, or a ``ValueError`` naming why a named solver cannot
    take it. ``n_new``: new indices to predict or draw at, which ``"auto"`` counts too.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 1.0, 100)
        >>> gg.solvers.resolve("auto", kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1)).name
        'markov'
        >>> gg.solvers.resolve("auto", kernels.ExpSquared(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1)).name
        'dense'
    """
    return _resolve(solver, _check(kernel, x, y, noise, mean)[0], n_new)[0]


def prepare(solver, kernel, x, y, noise, mean=None, *, n_new: int = 0):
    """``(solver object, prepared)``: the arguments checked and cast once, and what the solver
    builds from them — what the protocol's methods take. For calling a solver's methods directly
    (testing a solver of your own, reading the raw marginals); the public functions do this
    themselves.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 1.0, 50)
        >>> solver, prepared = gg.solvers.prepare("markov", kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1))
        >>> offset, variance = solver.predict(prepared, jnp.array([0.5]))
        >>> offset.shape, variance.shape
        ((1, 1), (1, 1))
    """
    return _resolve(solver, _check(kernel, x, y, noise, mean)[0], n_new)


def rounding_estimate(kernel, x, y, noise, mean=None, *, solver="auto"):
    """``(estimate, level)``: the solver's estimate of how much rounding its result carries, relative
    — what its [``ConditioningWarning``][gpgrad_jax.ConditioningWarning] compares with ``level`` —
    or ``(None, None)`` for a solver without one (the covariance form of the Markov solver; a
    float64 state-space problem). The dense solver: ``eps · cond(U)``; the Markov solver in
    square-root form: ``eps`` times how many noise standard deviations the whitened data and the
    predicted spread of the curve span. A quick way to ask whether float32 will do.

    Examples:
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 50, dtype=jnp.float32)
        >>> estimate, level = gg.solvers.rounding_estimate(kernels.CubicSpline(1.0), x, jnp.sin(x), noise.Isotropic(0.01), solver="dense")
        >>> bool(estimate > level)  # cond(U) ≈ 5e6: float32 would warn
        True
    """
    chosen, prepared = _resolve(solver, _check(kernel, x, y, noise, mean)[0])
    return chosen.rounding_estimate(prepared)


def _resolve(solver, problem, n_new: int = 0):
    """``(solver object, what it prepared)`` for ``solver=`` (a name or a ``Solver``) on a checked
    problem. ``"auto"``: a Markov solver (the parallel one on an accelerator) where it applies
    and the problem has ``MARKOV_MIN_POINTS`` points or more, counting ``n_new`` new indices to
    predict or draw at; else the dense solver. A named or given solver that cannot take the
    problem raises a ``ValueError`` naming the obstacle."""
    if isinstance(solver, str):
        if solver == "auto":
            if problem.x.shape[0] + n_new >= MARKOV_MIN_POINTS:
                markov = default_for_backend()
                try:
                    return markov, markov.prepare(problem)
                except Inapplicable:
                    pass
            return _REGISTRY["dense"], _REGISTRY["dense"].prepare(problem)
        if solver not in _REGISTRY:
            raise ValueError(f"`solver` must be one of {', '.join(map(repr, names()))} or a gpgrad_jax.solvers.Solver; got {solver!r}")
        label, chosen = repr(solver), _REGISTRY[solver]
    elif isinstance(solver, Solver):
        label, chosen = repr(solver), solver
    else:
        raise TypeError(f"`solver` must be a name ({', '.join(map(repr, names()))}) or a gpgrad_jax.solvers.Solver, got {type(solver).__name__}")
    try:
        return chosen, chosen.prepare(problem)
    except Inapplicable as err:
        raise ValueError(f"solver={label} cannot be used here: {err}") from err
