"""The closed-form likelihood and its custom VJP against plain autodiff and independent checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    KERNELS,
    NOISES,
    assert_trees_close,
    data_dims,
    index_dims,
    jaxpr_shapes,
    kernel_noise_pairs,
    make_problem,
    seeds,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise

ALL_ARGS = (0, 1, 2, 3, 4)  # kernel, x, y, noise, mean


def value_and_grads(fn, *args):
    return jax.value_and_grad(fn, argnums=ALL_ARGS)(*args)


@jax.jit
def closed_form_and_reference(*args):
    """One compilation per shape: custom VJP, explicit formula and reference together — of the
    public ``log_marginal_likelihood`` (the density: the precision form's rule plus the noise
    term's), against autodiff of the dense reference density."""
    return (
        value_and_grads(gg.log_marginal_likelihood, *args),
        gg.index_gradient(*args),
        value_and_grads(gg.reference.log_marginal_likelihood, *args),
    )


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name, noise_kind", kernel_noise_pairs(KERNELS, NOISES))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_matches_plain_autodiff(kernel_name, noise_kind, seed, dim, index_dim, rtol):
    """Value and the cotangents of *every* input equal the dense autodiff reference."""
    problem = make_problem(kernel_name, noise_kind, seed, dim, index_dim)
    (value, grads), explicit, (ref_value, ref_grads) = closed_form_and_reference(*problem.args())

    assert_trees_close(value, ref_value, rtol, "value")
    for name, grad, ref in zip(("kernel", "x", "y", "noise", "mean"), grads, ref_grads):
        assert_trees_close(grad, ref, rtol, f"d/d{name}")

    explicit_value, explicit_grad_x = explicit
    assert_trees_close(explicit_value, ref_value, rtol, "index_gradient value")
    assert_trees_close(explicit_grad_x, ref_grads[1], rtol, "index_gradient grad")
    assert_trees_close(explicit_grad_x, grads[1], rtol, "index_gradient vs custom_vjp")


# Module level: one compilation per structure, not one per hypothesis example.
_GRAD_X = jax.jit(jax.grad(gg.precision_form_log_likelihood, argnums=1))


def _central_difference(f, x, eps):
    flat = np.asarray(x, np.float64).ravel()
    grad = np.empty_like(flat)
    for i in range(flat.size):
        step = np.zeros_like(flat)
        step[i] = eps
        grad[i] = (f((flat + step).reshape(x.shape)) - f((flat - step).reshape(x.shape))) / (2 * eps)
    return grad.reshape(x.shape)


@pytest.mark.parametrize(
    "kernel_name, noise_kind", kernel_noise_pairs(KERNELS, ["isotropic", "per_point_rank_deficient"])
)
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_index_gradient_matches_finite_differences(kernel_name, noise_kind, seed, dim, index_dim, x64):
    """Independent of autodiff: central differences of the value in float64."""
    if not x64:
        pytest.skip("finite differences need float64")
    problem = make_problem(kernel_name, noise_kind, seed, dim, index_dim, n=4)
    kernel, x, y, nz, mean = problem.args()
    value = jax.jit(gg.precision_form_log_likelihood)
    numeric = _central_difference(lambda x_: float(value(kernel, x_, y, nz, mean)), x, 1e-6)
    grad_x = _GRAD_X(kernel, x, y, nz, mean)
    np.testing.assert_allclose(grad_x, numeric, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(numeric).max()))


@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
@settings(max_examples=min(4, settings.default.max_examples))
@given(seed=seeds, dim=data_dims, index_dim=index_dims)
def test_kernel_parameter_gradient_matches_finite_differences(kernel_name, seed, dim, index_dim, x64):
    if not x64:
        pytest.skip("finite differences need float64")
    problem = make_problem(kernel_name, "per_point", seed, dim, index_dim, n=4)
    kernel, x, y, nz, mean = problem.args()
    leaves, treedef = jax.tree_util.tree_flatten(kernel)
    value = jax.jit(gg.precision_form_log_likelihood)
    grads = jax.tree_util.tree_leaves(jax.grad(gg.precision_form_log_likelihood)(kernel, x, y, nz, mean))
    for i, leaf in enumerate(leaves):

        def at(leaf_value, i=i):
            moved = list(leaves)
            moved[i] = jnp.asarray(leaf_value)
            return float(value(jax.tree_util.tree_unflatten(treedef, moved), x, y, nz, mean))

        numeric = _central_difference(at, np.asarray(leaf), 1e-6)
        np.testing.assert_allclose(grads[i], numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.float32
@pytest.mark.parametrize("kernel_name", sorted(KERNELS))
@pytest.mark.parametrize("pattern", ["pair", "all_equal"])
def test_coincident_indices_give_finite_exact_gradients(kernel_name, pattern, x64):
    """x_i == x_j: the closed form is finite and equals one-sided-free central differences."""
    problem = make_problem(kernel_name, "per_point_rank_deficient", 7, 3, 2, n=5)
    kernel, x, y, nz, mean = problem.args()
    x = np.array(x)
    if pattern == "pair":
        x[3] = x[1]
    else:
        x[:] = x[2]
    x = jnp.asarray(x)
    grad_x = jax.grad(gg.precision_form_log_likelihood, argnums=1)(kernel, x, y, nz, mean)
    assert np.all(np.isfinite(grad_x))
    _, explicit = gg.index_gradient(kernel, x, y, nz, mean)
    np.testing.assert_allclose(explicit, grad_x, rtol=1e-9 if x64 else 1e-5, atol=1e-9 if x64 else 1e-4)
    if x64:
        value = jax.jit(gg.precision_form_log_likelihood)
        numeric = _central_difference(lambda x_: float(value(kernel, x_, y, nz, mean)), x, 1e-6)
        np.testing.assert_allclose(grad_x, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel_name, noise_kind", kernel_noise_pairs(["exp_squared", "matern32"], NOISES))
def test_vmap_over_data_sets_and_index_sets(kernel_name, noise_kind, rtol):
    problems = [make_problem(kernel_name, noise_kind, seed, 3, None) for seed in range(3)]
    kernel, _, _, nz, mean = problems[0].args()
    xs = jnp.stack([p.x for p in problems])
    ys = jnp.stack([p.y for p in problems])
    batched = jax.jit(
        jax.vmap(jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1), in_axes=(None, 0, 0, None, None))
    )
    values, grads = batched(kernel, xs, ys, nz, mean)
    for i in range(3):
        ref_value, ref_grad = jax.value_and_grad(gg.reference.precision_form_log_likelihood, argnums=1)(
            kernel, xs[i], ys[i], nz, mean
        )
        assert_trees_close((values[i], grads[i]), (ref_value, ref_grad), rtol, f"batch {i}")


def test_vmap_over_noise_and_kernel_parameters(rtol):
    problem = make_problem("curve", "per_point_rank_deficient", 3, 3, None)
    _kernel, x, y, nz, mean = problem.args()
    variances = jnp.array([0.5, 1.0, 2.0], x.dtype)
    blocks = jnp.stack([nz.blocks, 2.0 * nz.blocks, 0.5 * nz.blocks])

    def f(variance, blocks):
        k = kernels.CubicSpline(variance) + kernels.Linear(0.3)
        return gg.precision_form_log_likelihood(k, x, y, noise.PerPoint(blocks), mean)

    def f_ref(variance, blocks):
        k = kernels.CubicSpline(variance) + kernels.Linear(0.3)
        return gg.reference.precision_form_log_likelihood(k, x, y, noise.PerPoint(blocks), mean)

    got = jax.vmap(jax.grad(f, argnums=(0, 1)))(variances, blocks)
    want = jax.vmap(jax.grad(f_ref, argnums=(0, 1)))(variances, blocks)
    assert_trees_close(got, want, rtol, "vmapped parameter grads")


def test_second_derivatives_equal_reference_hessian(x64):
    """Reverse-over-reverse and forward-over-reverse (jax.hessian) differentiate the rule itself;
    pure forward mode (jax.jvp of L) is unavailable through a custom_vjp and says so."""
    problem = make_problem("curve", "per_point_rank_deficient", 11, 3, None, n=5)
    kernel, x, y, nz, mean = problem.args()
    f = lambda x_: gg.precision_form_log_likelihood(kernel, x_, y, nz, mean)  # noqa: E731
    f_ref = lambda x_: gg.reference.precision_form_log_likelihood(kernel, x_, y, nz, mean)  # noqa: E731
    hess = jax.jit(jax.jacrev(jax.grad(f)))(x)
    np.testing.assert_allclose(hess, jax.jit(jax.hessian(f_ref))(x), rtol=1e-8 if x64 else 2e-3, atol=1e-8 if x64 else 1e-3)
    np.testing.assert_allclose(hess, hess.T, rtol=1e-8 if x64 else 1e-3, atol=1e-10 if x64 else 1e-3)
    np.testing.assert_allclose(jax.jit(jax.hessian(f))(x), hess, rtol=1e-8 if x64 else 2e-3, atol=1e-8 if x64 else 1e-3)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize(
    "solver, index_dim",
    # the Markov solver's second order (the JAX scans' derivatives) compiles for ~10 s: full profile
    [("dense", None), ("dense", 2), pytest.param("markov", None, marks=pytest.mark.slow)],
)
def test_index_hessian_in_blocks_equals_jax_hessian(solver, index_dim, x64):
    """``gg.index_hessian`` (Hessian-vector products, a few directions at a time) is
    ``jax.hessian`` of the log density, for scalar and 2-D indices, any block size."""
    kernel_name = "curve" if index_dim is None else "matern32"
    problem = make_problem(kernel_name, "per_point_rank_deficient", 3, 3, index_dim, n=7)
    kernel, x, y, nz, mean = problem.args()
    want = jax.jit(jax.hessian(lambda x_: gg.log_marginal_likelihood(kernel, x_, y, nz, mean, solver=solver)))(x)
    tol = 1e-8 if x64 else 5e-3
    for block_size in (2, 50):
        got = gg.index_hessian(kernel, x, y, nz, mean, solver=solver, block_size=block_size)
        assert got.shape == x.shape + x.shape
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
        gg.index_hessian(kernel, x, y, nz, block_size=0)


@pytest.mark.float32
def test_float32_agrees_with_float64_on_a_well_scaled_problem(x64):
    if not x64:
        pytest.skip("needs float64 for the comparison")
    problem = make_problem("curve", "per_point_rank_deficient", 5, 3, None, n=20)
    value_and_grad = jax.jit(jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1))
    value64, grad64 = value_and_grad(*problem.args())
    value32, grad32 = value_and_grad(
        *problem.astype(jnp.float32).args()
    )
    assert value32.dtype == jnp.float32 and grad32.dtype == jnp.float32
    np.testing.assert_allclose(value32, value64, rtol=1e-5)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-3, atol=1e-3 * np.abs(grad64).max())


def test_no_cubic_or_lifted_temporaries_in_the_gradient():
    """The gradient never forms an n×n×n tensor, and Isotropic noise never an (nD)×(nD) one."""
    problem = make_problem("curve", "isotropic", 1, 3, None, n=7)
    shapes = jaxpr_shapes(jax.grad(gg.precision_form_log_likelihood, argnums=(0, 1, 2, 3, 4)), *problem.args())
    assert (7, 7) in shapes
    assert not any(len(s) >= 3 and s.count(7) >= 3 for s in shapes), shapes
    assert (21, 21) not in shapes, "Isotropic noise must not build the lifted (nD x nD) matrix"


def test_gradients_are_not_silently_zero():
    """Every input of a generic problem gets a non-zero cotangent."""
    problem = make_problem("exp_squared", "dense", 2, 3, 2)
    grads = jax.grad(gg.precision_form_log_likelihood, argnums=ALL_ARGS)(*problem.args())
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.any(np.asarray(leaf) != 0)


def test_one_dimensional_data_accepts_vector_or_column_shapes(rtol):
    problem = make_problem("curve", "per_point", 4, 1, None)
    kernel, x, y, nz, mean = problem.args()
    as_vector = gg.precision_form_log_likelihood(kernel, x, y, nz, mean)
    as_column = gg.precision_form_log_likelihood(
        kernel, x, y[:, None], noise.PerPoint(jnp.reshape(nz.blocks, (-1, 1, 1))), mean[:, None]
    )
    np.testing.assert_allclose(as_vector, as_column, rtol=rtol)
    grad = jax.grad(gg.precision_form_log_likelihood, argnums=2)(kernel, x, y, nz, mean)
    assert grad.shape == y.shape


@pytest.mark.parametrize("solver", ["dense", "markov"])
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rank_deficient"])
def test_repeated_eager_calls_compile_nothing(solver, noise_kind, caplog):
    """An eager call with shapes seen before reuses its compiled programs: no eager loop or
    operation recompiles per call (the noise term's Jacobi SVD did, 0.23 s a call)."""
    kernel, x, y, nz, mean = make_problem("matern32", noise_kind, 5, 3, None, n=9).args()
    x_new = jnp.linspace(0.0, 3.0, 4, dtype=x.dtype)
    calls = [
        lambda: gg.log_marginal_likelihood(kernel, x, y, nz, mean, solver=solver),
        lambda: jax.grad(gg.log_marginal_likelihood, argnums=(0, 1, 3))(kernel, x, y, nz, mean, solver=solver),
        lambda: gg.index_gradient(kernel, x, y, nz, mean, solver=solver),
        lambda: gg.predict(kernel, x, y, nz, x_new, mean, solver=solver),
    ]
    for call in calls:
        jax.block_until_ready(call())
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        caplog.clear()
        for call in calls:
            jax.block_until_ready(call())
    compiled = [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]
    assert not compiled, compiled
