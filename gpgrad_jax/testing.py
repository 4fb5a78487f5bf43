"""Checks and ``hypothesis`` strategies for your own tests of code built on gpgrad_jax.

* [``check_kernel``][gpgrad_jax.testing.check_kernel] — is a (custom) kernel's ``grad_first`` the derivative of its
  ``evaluate``, is it a covariance, does the likelihood's rule agree with autodiff? Needs
  nothing beyond gpgrad_jax itself.
* Strategies: [``index_sets``][gpgrad_jax.testing.index_sets], [``data``][gpgrad_jax.testing.data], [``kernels``][gpgrad_jax.testing.kernels], [``noises``][gpgrad_jax.testing.noises] and
  [``problems``][gpgrad_jax.testing.problems] (all of them together). These need ``hypothesis`` (a test dependency, not a
  run-time one: ``pip install hypothesis``); they are imported when first used.
"""

from typing import TYPE_CHECKING

from gpgrad_jax._diagnostics import WARNED
from gpgrad_jax._testing import check_kernel

if TYPE_CHECKING:  # for type checkers and the API docs; at run time imported on first use, below
    from gpgrad_jax._strategies import data, index_sets, kernels, noises, problems

__all__ = ["check_kernel", "data", "index_sets", "kernels", "noises", "problems", "reset_warnings"]

_STRATEGIES = ("data", "index_sets", "kernels", "noises", "problems")


def reset_warnings() -> None:
    """Forget which [``ConditioningWarning``][gpgrad_jax.ConditioningWarning] messages were shown: each is
    shown once per solver, precision and process, so a test that expects one calls this first.

    Examples:
        >>> import warnings
        >>> import jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise, testing
        >>> x = jnp.linspace(0.0, 3000.0, 40, dtype=jnp.float32)
        >>> for _ in range(2):
        ...     testing.reset_warnings()
        ...     with warnings.catch_warnings(record=True) as caught:
        ...         warnings.simplefilter("always")
        ...         _ = gg.log_marginal_likelihood(kernels.CubicSpline(1.0), x, jnp.sin(x), noise.Isotropic(0.01), solver="dense")
        ...     print(len(caught))
        1
        1
    """
    WARNED.clear()


def __getattr__(name):
    if name not in _STRATEGIES:
        raise AttributeError(f"module 'gpgrad_jax.testing' has no attribute {name!r}")
    try:
        from gpgrad_jax import _strategies
    except ImportError as err:
        raise ImportError(
            f"gpgrad_jax.testing.{name} is a hypothesis strategy and needs hypothesis: "
            "pip install hypothesis (or gpgrad_jax[test]); check_kernel does not"
        ) from err
    return getattr(_strategies, name)


def __dir__():
    return sorted(__all__)
