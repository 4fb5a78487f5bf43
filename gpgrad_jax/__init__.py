"""gpgrad_jax: GP marginal likelihoods with exact, closed-form gradients in the index set.

>>> import gpgrad_jax as gg
>>> from gpgrad_jax import kernels, noise
"""

from gpgrad_jax import kernels, noise, reference
from gpgrad_jax._likelihood import index_gradient, log_marginal_likelihood, log_probability
from gpgrad_jax._predict import predict, sample_posterior
from gpgrad_jax._validation import ConditioningWarning, FactorizationError, NumericalError, value_checks

__version__ = "0.3.0"

__all__ = [
    "ConditioningWarning",
    "FactorizationError",
    "NumericalError",
    "index_gradient",
    "kernels",
    "log_marginal_likelihood",
    "log_probability",
    "noise",
    "predict",
    "reference",
    "sample_posterior",
    "value_checks",
]
