"""``gg.unconstrain`` and ``gg.constrain``: positive parameters to and from unconstrained numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given
from hypothesis import strategies as st

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise


@given(values=st.lists(st.floats(1e-4, 1e4), min_size=6, max_size=6))
def test_round_trip_and_positivity_through_composition(values, x64):
    a, b, c, d, e, f = values
    tree = {
        "kernel": kernels.CubicSpline(a) + b * kernels.Matern32(c, d) * kernels.Cosine(1.0, e),
        "noise": (noise.Isotropic(f), noise.PerPoint(-jnp.ones((2, 3, 3)))),
        "other": jnp.array([-1.0, 2.0]),
    }
    free = gg.unconstrain(tree)
    back = gg.constrain(free)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    rtol = 1e-9 if x64 else 1e-4
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-30)
    # Positive parameters moved to any real number come back positive; other leaves untouched.
    shifted = jax.tree_util.tree_map(lambda leaf: leaf - 50.0, free)
    constrained = gg.constrain(shifted)
    assert float(constrained["kernel"].k1.variance) > 0 and float(constrained["noise"][0].sigma) > 0
    np.testing.assert_array_equal(free["noise"][1].blocks, tree["noise"][1].blocks)
    np.testing.assert_array_equal(free["other"], tree["other"])


def test_large_steps_stay_valid_where_raw_parameters_go_negative():
    """adam(0.5) on the raw parameters takes sigma below zero (a ValueError at step 49); on the
    unconstrained ones every step is a valid model and the loss decreases."""
    x = jnp.linspace(0.0, 3.0, 20)
    y = jnp.sin(2.0 * x)

    def loss(params):
        kernel, nz = gg.constrain(params)
        return -gg.log_marginal_likelihood(kernel, x, y, nz)

    params = gg.unconstrain((kernels.Matern32(1.0, 1.0), noise.Isotropic(0.5)))
    optimiser = optax.adam(0.5)
    state = optimiser.init(params)
    step = jax.jit(lambda p, s: (lambda v, g: (v, *optimiser.update(g, s)))(*jax.value_and_grad(loss)(p)))
    first = None
    for _ in range(60):
        value, updates, state = step(params, state)
        first = value if first is None else first
        params = optax.apply_updates(params, updates)
        assert np.isfinite(value)
    assert loss(params) < first


def test_leaves_outside_models_pass_through():
    assert gg.constrain(3.0) == 3.0
    assert gg.unconstrain([kernels.Linear(2.0), 5.0])[1] == 5.0
