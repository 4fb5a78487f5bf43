"""Kernels: hand-derived derivatives against autodiff and finite differences, a peer, pytree behaviour."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from problems import KERNELS, seeds

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise


def _points(rng, scalar_only, index_dim, dtype):
    shape = () if (scalar_only or index_dim is None) else (index_dim,)
    if scalar_only:
        return [jnp.asarray(rng.uniform(0.05, 3.0, shape), dtype) for _ in range(2)]
    return [jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2)]


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
@given(seed=seeds, index_dim=st.sampled_from([None, 3]), coincide=st.booleans())
def test_grad_first_matches_autodiff_of_evaluate(kernel_name, seed, index_dim, coincide, rtol):
    rng = np.random.default_rng(seed)
    factory, scalar_only = KERNELS[kernel_name]
    ard = not scalar_only and rng.uniform() < 0.5  # one lengthscale per index dimension, or a scalar
    kernel = factory(rng, index_dim if ard else None)
    dtype = jnp.zeros(()).dtype
    a, b = _points(rng, scalar_only, index_dim, dtype)
    if coincide:
        b = a
    hand = kernel.grad_first(a, b)
    auto = jax.grad(kernel.evaluate, argnums=0)(a, b)
    assert hand.shape == jnp.shape(a)
    assert np.all(np.isfinite(hand))
    np.testing.assert_allclose(hand, auto, rtol=rtol, atol=rtol)


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
def test_grad_first_matches_central_differences_including_the_diagonal(kernel_name, x64):
    """Autodiff could share a bug with the hand rule; differences cannot."""
    if not x64:
        pytest.skip("finite differences need float64")
    rng = np.random.default_rng(0)
    factory, scalar_only = KERNELS[kernel_name]
    kernel = factory(rng, None if scalar_only else 2)
    a, b = _points(rng, scalar_only, 2, jnp.float64)
    eps = 1e-6
    for bb in (b, a):  # a generic pair, then a == b
        hand = np.atleast_1d(kernel.grad_first(a, bb))
        flat_a = np.atleast_1d(np.asarray(a))
        for c in range(flat_a.size):
            step = np.zeros_like(flat_a)
            step[c] = eps
            shape = jnp.shape(a)
            plus = kernel.evaluate(jnp.reshape(flat_a + step, shape), bb)
            minus = kernel.evaluate(jnp.reshape(flat_a - step, shape), bb)
            np.testing.assert_allclose(hand[c], (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel_name", ["exp_squared", "matern32", "matern52", "scaled_product_plus_constant"])
def test_derivative_of_grad_first_at_a_tie_is_the_second_derivative(kernel_name, x64):
    """``∂ grad_first(a, b)/∂a`` at ``a == b`` is ``∂²k/∂a²`` (``−σ²/ℓ²`` for the squared exponential),
    not the zero a ``where`` guard would give: Hessians in the indices at ties and at inducing
    inputs on data points use it."""
    if not x64:
        pytest.skip("finite differences need float64")
    rng = np.random.default_rng(1)
    kernel = KERNELS[kernel_name][0](rng, 2)
    a = jnp.asarray(rng.normal(size=2))
    hessian = jax.jacfwd(kernel.grad_first, argnums=0)(a, a)
    eps = 1e-7  # the Matérn kernels' third derivative jumps at a tie: central differences are O(eps)
    differences = np.stack(
        [(kernel.grad_first(a + eps * e, a) - kernel.grad_first(a - eps * e, a)) / (2 * eps) for e in np.eye(2)], axis=1
    )
    np.testing.assert_allclose(hessian, differences, rtol=1e-5, atol=1e-7)
    assert np.all(np.diagonal(hessian) < 0)


def test_curve_kernel_closed_form_values():
    k = kernels.CubicSpline(2.0)
    # m = 1: 2 * (1/3 + 2 * 1/2) = 8/3 ; ∂k/∂a at (1, 3) = 2 * 1 * (3 - 1/2) = 5 ; at (3, 1): 2 * 1 * (1 - 1/2) = 1
    np.testing.assert_allclose(k.evaluate(1.0, 3.0), 8.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(k.grad_first(1.0, 3.0), 5.0, rtol=1e-6)
    np.testing.assert_allclose(k.grad_first(3.0, 1.0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernels.Linear(2.0).grad_first(1.5, 4.0), 8.0, rtol=1e-6)
    assert float(kernels.Constant(3.0).grad_first(1.5, 4.0)) == 0.0


tinygp = pytest.importorskip("tinygp")

PEERS = {
    "exp_squared": (kernels.ExpSquared, tinygp.kernels.ExpSquared),
    "matern32": (kernels.Matern32, tinygp.kernels.Matern32),
    "matern52": (kernels.Matern52, tinygp.kernels.Matern52),
}


@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("index_dim", [None, 2])
def test_stationary_kernels_match_tinygp(name, index_dim, rtol, x64):
    ours, theirs = PEERS[name]
    rng = np.random.default_rng(1)
    n = 7
    x = rng.normal(size=(n,) if index_dim is None else (n, index_dim))
    x[3] = x[1]  # a coincident pair
    x = jnp.asarray(x)
    variance, lengthscale = 1.7, 0.8
    k = ours(variance, lengthscale)
    # tinygp's Matérn kernels default to an L1 distance; ours (like GPy's) is Euclidean.
    k_peer = variance * theirs(scale=lengthscale, distance=tinygp.kernels.distance.L2Distance())
    np.testing.assert_allclose(k.matrix(x, x), k_peer(x, x), rtol=rtol, atol=rtol)

    # The likelihood against tinygp's log probability: the same Gaussian density, and the
    # precision form below it by log|det S| = n log(1/σ).
    y = jnp.asarray(rng.normal(size=n))
    sigma = 0.4
    gp = tinygp.GaussianProcess(k_peer, x, diag=sigma**2)
    expected = gp.log_probability(y)
    np.testing.assert_allclose(gg.log_marginal_likelihood(k, x, y, noise.Isotropic(sigma)), expected, rtol=rtol)
    L = gg.precision_form_log_likelihood(k, x, y, noise.Isotropic(sigma))
    np.testing.assert_allclose(L, expected + n * np.log(sigma), rtol=rtol)

    # And tinygp's autodiff gradient in the inputs (away from the coincident pair for Matérn
    # kernels, where autodiff through tinygp's distance is not defined).
    if name == "exp_squared":
        grad_peer = jax.grad(
            lambda x_: tinygp.GaussianProcess(k_peer, x_, diag=sigma**2).log_probability(y)
        )(x)
        grad = jax.grad(gg.precision_form_log_likelihood, argnums=1)(k, x, y, noise.Isotropic(sigma))
        np.testing.assert_allclose(grad, grad_peer, rtol=10 * rtol, atol=10 * rtol)


def test_kernels_are_pytrees_with_differentiable_named_parameters():
    k = kernels.CubicSpline(1.0) + kernels.Linear(0.5) + kernels.Constant(2.0)
    x = jnp.linspace(0.1, 2.0, 6)
    y = jnp.stack([jnp.sin(x), jnp.cos(x), x], axis=1)
    nz = noise.Isotropic(0.3)
    grad_k = jax.grad(gg.precision_form_log_likelihood)(k, x, y, nz)
    assert isinstance(grad_k, kernels.Sum)
    assert grad_k.k1.k1.variance.shape == ()
    assert float(grad_k.k2.variance) != 0.0

    # optax updates the kernel directly.
    optimizer = optax.adam(1e-2)
    state = optimizer.init(k)
    updates, state = optimizer.update(jax.tree_util.tree_map(jnp.negative, grad_k), state, k)
    k_new = optax.apply_updates(k, updates)
    assert isinstance(k_new, kernels.Sum)
    assert gg.precision_form_log_likelihood(k_new, x, y, nz) > gg.precision_form_log_likelihood(k, x, y, nz)


def test_scalar_times_kernel_is_a_learnable_constant_factor():
    base = kernels.Matern32(1.0, 0.7)
    scaled = 3.0 * base
    assert isinstance(scaled, kernels.Product) and isinstance(scaled.k1, kernels.Constant)
    np.testing.assert_allclose(scaled.evaluate(0.2, 0.9), 3.0 * base.evaluate(0.2, 0.9), rtol=1e-6)
    assert isinstance(base * 2.0, kernels.Product)
    x = jnp.linspace(0.0, 1.0, 4)
    grad = jax.grad(gg.precision_form_log_likelihood)(scaled, x, jnp.sin(x), noise.Isotropic(0.3))
    assert float(grad.k1.variance) != 0.0
    with pytest.raises(TypeError):
        base + 1.0


def test_kernels_with_the_same_fields_are_different_tree_structures():
    # JAX 0.10's register_dataclass tree definitions compare equal across classes with the same
    # field names; jit then served Matern32's compiled state-space model for Matern52.
    structure = lambda k: jax.tree_util.tree_structure(k)  # noqa: E731
    assert structure(kernels.Matern32(1.0, 0.5)) != structure(kernels.Matern52(1.0, 0.5))
    assert structure(kernels.Matern32(1.0, 0.5)) != structure(kernels.ExpSquared(1.0, 0.5))
    x = jnp.linspace(0.0, 2.0, 40)
    y, nz = jnp.sin(x), noise.PerPoint(jnp.full(40, 3.0))
    values = {}
    for kernel in (kernels.Matern32(1.0, 0.5), kernels.Matern52(1.0, 0.5)):
        for solver in ("markov", "dense"):
            value_and_grad = jax.value_and_grad(functools.partial(gg.precision_form_log_likelihood, solver=solver), argnums=1)
            values[type(kernel).__name__, solver] = jax.jit(value_and_grad)(kernel, x, y, nz)
    for name in ("Matern32", "Matern52"):
        np.testing.assert_allclose(values[name, "markov"][0], values[name, "dense"][0], rtol=1e-5)
    assert abs(float(values["Matern32", "markov"][0] - values["Matern52", "markov"][0])) > 1e-3
