"""``gpgrad_jax.testing`` and custom kernels declared with ``kernels.register``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from problems import KERNELS, assert_trees_close

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, testing


@kernels.register
class Periodic(kernels.Kernel):
    """``σ² exp(−2 sin²(π(a − b)/p))`` with a hand-derived derivative."""

    variance: jax.Array
    period: jax.Array
    positive_fields = ("variance", "period")

    def evaluate(self, a, b):
        return self.variance * jnp.exp(-2.0 * jnp.sin(jnp.pi * (a - b) / self.period) ** 2)

    def grad_first(self, a, b):
        phase = jnp.pi * (a - b) / self.period
        return -2.0 * jnp.pi / self.period * jnp.sin(2.0 * phase) * self.evaluate(a, b)


@kernels.register
class WrongSign(Periodic):
    def grad_first(self, a, b):
        return -super().grad_first(a, b)


@kernels.register
class ZeroDerivative(Periodic):
    def grad_first(self, a, b):
        return jnp.zeros_like(a)


@kernels.register
class Exponential(kernels.Kernel):
    """``exp(−‖a − b‖)`` written with a plain ``sqrt``: autodiff is NaN at ``a == b``."""

    def evaluate(self, a, b):
        return jnp.exp(-jnp.sqrt(jnp.sum((a - b) ** 2)))

    def grad_first(self, a, b):
        r = jnp.sqrt(jnp.sum((a - b) ** 2))
        return jnp.where(r > 0, -(a - b) / jnp.where(r > 0, r, 1.0), 0.0) * jnp.exp(-r)


@kernels.register
class NotSymmetric(kernels.Kernel):
    def evaluate(self, a, b):
        return jnp.exp(-((a - 0.5 * b) ** 2))

    def grad_first(self, a, b):
        return -2.0 * (a - 0.5 * b) * self.evaluate(a, b)


X = jnp.array([0.1, 0.7, 0.7, 1.9, 2.6])  # a repeated point: the pair a == b off the diagonal too


@pytest.mark.parametrize("index_dim", [None, 2])
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_built_in_kernels_pass_check_kernel(kernel_name, index_dim):
    factory, scalar_only = KERNELS[kernel_name]
    if scalar_only and index_dim:
        pytest.skip("scalar indices only")
    rng = np.random.default_rng(1)
    kernel = factory(rng, index_dim)
    x = X if index_dim is None else jnp.stack([X, X[::-1]], axis=1)
    testing.check_kernel(kernel, x)


def test_a_correct_custom_kernel_passes_including_a_nan_autodiff_at_a_equals_b():
    testing.check_kernel(Periodic(1.3, 0.8), X)
    # Autodiff of evaluate is NaN on the diagonal. (No tied points: with a kink at a == b the
    # likelihood is not differentiable at a tie.)
    x = jnp.unique(X)
    testing.check_kernel(Exponential(), x)
    testing.check_kernel(Exponential() + kernels.Linear(0.5), jnp.stack([x, x**2], axis=1))


@pytest.mark.parametrize("kernel", [WrongSign(1.0, 0.8), ZeroDerivative(1.0, 0.8)], ids=["wrong sign", "zero"])
def test_a_wrong_grad_first_is_named_with_its_worst_pair(kernel):
    with pytest.raises(AssertionError, match=r"grad_first disagrees with the derivative of evaluate: worst at pair \(i=\d, j=\d\)"):
        testing.check_kernel(kernel, X)


def test_not_a_covariance_is_caught():
    with pytest.raises(AssertionError, match="not symmetric"):
        testing.check_kernel(NotSymmetric(), X)


def test_custom_kernels_differentiate_jit_compose_and_train_with_optax(rtol):
    x = jnp.linspace(0.0, 3.0, 12)
    y = jnp.stack([jnp.sin(2 * x), jnp.cos(2 * x)], axis=1)
    nz = noise.Isotropic(0.2)
    kernel = Periodic(1.0, 1.2) + kernels.Matern32(0.5, 1.0)
    grads = jax.jit(jax.grad(gg.precision_form_log_likelihood, argnums=(0, 1)))(kernel, x, y, nz)
    want = jax.grad(gg.reference.precision_form_log_likelihood, argnums=(0, 1))(kernel, x, y, nz)
    assert_trees_close(grads, want, rtol, "custom kernel")
    assert isinstance(grads[0].k1, Periodic) and grads[0].k1.period != 0
    with pytest.raises(ValueError, match="Periodic has no state-space form"):
        gg.precision_form_log_likelihood(kernel, x, y, nz, solver="markov")

    optimizer = optax.adam(0.01)  # small steps: plain (not log) parameters stay positive
    loss = lambda k: -gg.log_marginal_likelihood(k, x, y, nz)  # noqa: E731

    @jax.jit
    def step(kernel, state):
        value, grad = jax.value_and_grad(loss)(kernel)
        updates, state = optimizer.update(grad, state)
        return optax.apply_updates(kernel, updates), state, value

    state = optimizer.init(kernel)
    kernel, state, before = step(kernel, state)
    for _ in range(10):
        kernel, state, value = step(kernel, state)
    assert value < before


def test_register_refuses_what_is_not_a_kernel():
    with pytest.raises(TypeError, match=r"subclass of gpgrad_jax\.kernels\.Kernel"):
        kernels.register(int)


@settings(max_examples=min(4, settings.default.max_examples))
@given(testing.problems(n=5, dim=3))
def test_generated_problems_are_valid_and_the_rule_matches_autodiff(problem):
    value, grads = jax.value_and_grad(gg.precision_form_log_likelihood, argnums=(0, 1))(*problem)
    want_value, want_grads = jax.value_and_grad(gg.reference.precision_form_log_likelihood, argnums=(0, 1))(*problem)
    rtol = 1e-8 if jax.config.jax_enable_x64 else 1e-2
    assert_trees_close((value, grads), (want_value, want_grads), rtol, "generated problem")


@settings(max_examples=min(3, settings.default.max_examples))
@given(testing.problems(n=6, markov=True))
def test_generated_markov_problems_fit_the_markov_solver(problem):
    dense = gg.precision_form_log_likelihood(*problem, solver="dense")
    markov = gg.precision_form_log_likelihood(*problem, solver="markov")
    np.testing.assert_allclose(markov, dense, rtol=1e-8 if jax.config.jax_enable_x64 else 1e-3)


_WITHOUT_HYPOTHESIS = """
import importlib.abc, sys

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ImportError("hidden for this test: " + name)

sys.meta_path.insert(0, Hide())
import jax.numpy as jnp
from gpgrad_jax import kernels, testing

testing.check_kernel(kernels.Matern32(1.0, 0.7), jnp.linspace(0.0, 2.0, 5))
try:
    testing.problems
except ImportError as err:
    assert "needs hypothesis" in str(err) and "check_kernel does not" in str(err), err
else:
    raise AssertionError("the strategies imported without hypothesis")
print("ok")
"""


def test_check_kernel_works_without_hypothesis():
    """``check_kernel`` is a plain function; only the strategies need ``hypothesis``, and asking
    for one without it names the package."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WITHOUT_HYPOTHESIS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
