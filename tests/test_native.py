"""The native passes (C++ custom calls) against their reference, the JAX scans: the same problems,
the same properties, in both forms (covariance, square root) — value and every cotangent to 1e-12
in float64, under jit, vmap and second order; the fallback when the native part is missing."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from problems import (
    FULL,
    MARKOV_NOISES,
    STATE_SPACE_KERNELS,
    assert_trees_close,
    data_dims,
    seeds,
    state_space_problem,
)

import gpgrad_jax as gg
from gpgrad_jax import kernels, noise, testing
from gpgrad_jax._solver.markov import native

ALL_ARGS = (0, 1, 2, 3, 4)

pytestmark = pytest.mark.skipif(not native.available(), reason="the native part is not built")

NATIVE = gg.solvers.Markov(form="covariance", native=True)
SCAN = gg.solvers.Markov(form="covariance", native=False)
FORMS = ("covariance", "square-root")


@functools.partial(jax.jit, static_argnums=0)
def _value_and_cotangents(solver, kernel, x, y, nz, mean):
    f = functools.partial(gg.log_marginal_likelihood, solver=solver)
    return jax.value_and_grad(f, argnums=ALL_ARGS)(kernel, x, y, nz, mean), gg.index_gradient(
        kernel, x, y, nz, mean, solver=solver
    )


def _cases():
    names = sorted(STATE_SPACE_KERNELS)
    pairs = [(k, MARKOV_NOISES[i % len(MARKOV_NOISES)]) for i, k in enumerate(names)]
    fast = {"quasi_periodic"}
    return [pytest.param(k, nk, marks=() if k in fast else pytest.mark.slow) for k, nk in pairs]


@pytest.mark.float32
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kernel_name, noise_kind", _cases())
@settings(max_examples=min(3, settings.default.max_examples))
@given(seed=seeds, dim=data_dims)
def test_native_passes_equal_the_jax_scans(form, kernel_name, noise_kind, seed, dim, x64):
    """Unsorted indices with ties, rank-deficient and zero blocks, every state-space kernel: value,
    every cotangent and ``index_gradient`` of either form, native against JAX — 1e-12 in float64,
    1e-4 in float32 (the same arithmetic in another order)."""
    problem = state_space_problem(kernel_name, noise_kind, seed, dim)
    got = _value_and_cotangents(gg.solvers.Markov(form=form, native=True), *problem.args())
    want = _value_and_cotangents(gg.solvers.Markov(form=form, native=False), *problem.args())
    assert_trees_close(got, want, 1e-12 if x64 else 1e-4, f"{kernel_name} {form} native")


def test_the_native_passes_run_in_the_compiled_program():
    """The default Markov solver on the CPU lowers to the custom calls of its dtype's form (the
    filter and the smoother: two calls per value-and-gradient); the scans' solvers to none."""
    kernel, x, y, nz, mean = state_space_problem("quasi_periodic", "isotropic", 0, 1).args()
    f = jax.jit(jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver="markov"), argnums=1))
    text = f.lower(kernel, x, y, nz, mean).as_text()
    form, suffix = ("covariance", "f64") if jnp.zeros(()).dtype == jnp.float64 else ("square_root", "f32")
    assert f"gpgrad_jax_{form}_filter_{suffix}" in text and f"gpgrad_jax_{form}_smooth_{suffix}" in text
    for form in FORMS:
        scan = gg.solvers.Markov(form=form, native=False)
        g = jax.jit(jax.value_and_grad(functools.partial(gg.log_marginal_likelihood, solver=scan), argnums=1))
        assert "gpgrad_jax_" not in g.lower(kernel, x, y, nz, mean).as_text()


@pytest.mark.parametrize("form", FORMS)
def test_vmap_of_the_native_passes(form, x64):
    """A batch of problems (vmap: the batch is a loop in the call) equals each problem alone."""
    problems = [state_space_problem("quasi_periodic", "per_point_rank_deficient", s, 3) for s in range(3)]
    kernel, _, _, nz, mean = problems[0].args()
    xs, ys = jnp.stack([p.x for p in problems]), jnp.stack([p.y for p in problems])
    f = functools.partial(gg.log_marginal_likelihood, solver=gg.solvers.Markov(form=form, native=True))
    batched = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(None, 0, 0, None, None)))(
        kernel, xs, ys, nz, mean
    )
    for i in range(3):
        want = jax.value_and_grad(f, argnums=(0, 1))(kernel, xs[i], ys[i], nz, mean)
        assert_trees_close(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], batched), want, 1e-12 if x64 else 1e-4)


@pytest.mark.skipif(not FULL, reason="second order compiles for several seconds: full profile")
@pytest.mark.parametrize("form", FORMS)
def test_second_order_through_the_native_passes(form, x64):
    """The passes' derivatives are the JAX scans': ``jax.hessian`` in ``x`` equals the scans'."""
    if not x64:
        pytest.skip("float64 comparison")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.permutation(rng.uniform(0, 3, 6)))
    y = jnp.asarray(rng.normal(size=6))
    kernel = STATE_SPACE_KERNELS["quasi_periodic"](rng)
    hessians = [
        jax.hessian(lambda x_, s=s: gg.log_marginal_likelihood(kernel, x_, y, noise.Isotropic(0.5), solver=s))(x)
        for s in (gg.solvers.Markov(form=form, native=True), gg.solvers.Markov(form=form, native=False))
    ]
    assert_trees_close(hessians[0], hessians[1], 1e-10, "hessian")


def test_without_the_native_part_the_scans_run_after_one_warning(monkeypatch):
    """A missing native library is never a silent slowdown: one warning, the JAX scans, the same
    result; asking for it explicitly is an error."""
    monkeypatch.setattr(native, "available", lambda: False)
    testing.reset_warnings()
    x = jnp.linspace(0.0, 3.0, 40)
    args = (kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = gg.log_marginal_likelihood(*args, solver=gg.solvers.Markov(form="covariance"))
        gg.log_marginal_likelihood(*args, solver=gg.solvers.Markov(form="covariance"))
    assert [str(w.message) for w in caught] == [native.MISSING]
    np.testing.assert_allclose(value, gg.log_marginal_likelihood(*args, solver=SCAN), rtol=1e-12)
    with pytest.raises(ValueError, match="native part"):
        gg.solvers.Markov(native=True)
