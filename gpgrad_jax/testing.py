"""Checks and ``hypothesis`` strategies for your own tests of code built on gpgrad_jax.

* :func:`check_kernel` — is a (custom) kernel's ``grad_first`` the derivative of its
  ``evaluate``, is it a covariance, does the likelihood's rule agree with autodiff?
* Strategies: :func:`index_sets`, :func:`data`, :func:`kernels`, :func:`noises` and
  :func:`problems` (all of them together).

Needs ``hypothesis`` (a test dependency, not a run-time one).
"""

from gpgrad_jax._testing import check_kernel, data, index_sets, kernels, noises, problems

__all__ = ["check_kernel", "data", "index_sets", "kernels", "noises", "problems"]
