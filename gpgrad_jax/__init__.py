"""gpgrad_jax: GP marginal likelihoods with exact, closed-form gradients in the index set.

Examples:
    >>> import gpgrad_jax as gg
    >>> from gpgrad_jax import kernels, noise
"""

from gpgrad_jax import kernels, noise, reference, solvers, state_space
from gpgrad_jax._arguments import value_checks
from gpgrad_jax._errors import ConditioningWarning, FactorizationError, NumericalError
from gpgrad_jax._likelihood import (
    index_gradient,
    index_hessian,
    inducing_bound,
    log_marginal_likelihood,
    precision_form_log_likelihood,
)
from gpgrad_jax._parameters import constrain, unconstrain
from gpgrad_jax._predict import predict, sample_posterior

__version__ = "0.6.0"

__all__ = [
    "ConditioningWarning",
    "FactorizationError",
    "NumericalError",
    "constrain",
    "index_gradient",
    "index_hessian",
    "inducing_bound",
    "kernels",
    "log_marginal_likelihood",
    "noise",
    "precision_form_log_likelihood",
    "predict",
    "reference",
    "sample_posterior",
    "solvers",
    "state_space",
    "unconstrain",
    "value_checks",
]
