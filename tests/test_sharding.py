"""A batch of problems sharded over devices gives the single-device results, without gathering.

The device count is fixed when JAX starts, so on a machine with fewer than four devices the
launcher test reruns this file in a subprocess with four forced host (CPU) devices.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gpgrad_jax as gg
from tests.problems import make_markov_problem, rerun_on_host_devices

DEVICES = 4
BATCH = 8
N_POINTS = 12
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")

enough_devices = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason=f"needs {DEVICES} devices (run by test_on_forced_host_devices)"
)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() >= DEVICES, reason="this process has the devices itself")
def test_on_forced_host_devices():
    rerun_on_host_devices(__file__, DEVICES, timeout=900)


def _mesh():
    # Mesh(...) axes are automatic: jit's partitioner places each problem's work on its device.
    return Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))


def _batch(noise_kind):
    """One shared kernel; per-problem indices (unsorted, with ties), data, noise and mean."""
    problems = [make_markov_problem("curve", noise_kind, seed, dim=3, n=N_POINTS) for seed in range(BATCH)]
    stack = lambda *leaves: jnp.stack(leaves)  # noqa: E731
    batched = [jax.tree_util.tree_map(stack, *parts) for parts in zip(*(p.args()[1:] for p in problems))]
    return problems[0].kernel, *batched


def _per_problem(solver):
    x_new = jnp.linspace(0.0, 3.0, 5)

    def one(kernel, x, y, nz, mean):
        value_grads = jax.value_and_grad(gg.precision_form_log_likelihood, argnums=(0, 1, 2, 3, 4))(
            kernel, x, y, nz, mean, solver=solver
        )
        index = gg.index_gradient(kernel, x, y, nz, mean, solver=solver)
        prediction = gg.predict(kernel, x, y, nz, x_new, mean, solver=solver)
        return value_grads, index, prediction

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))


def _assert_same(sharded, single, rtol):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree_util.tree_leaves(single)):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.max(np.abs(b))), 1e-300)
        assert np.max(np.abs(a - b)) <= rtol * scale, f"{jax.tree_util.keystr(path)}: {a} != {b}"


def _rtol(x64):
    # Per-device batches change how XLA blocks the batched matrix products: float64 agrees to
    # 1e-12; in float32 a cancelling kernel-parameter cotangent moved by 2.5e-5 relative.
    return 1e-12 if x64 else 1e-3


def _collectives(compiled) -> dict:
    text = compiled.as_text()
    return {name: text.count(name) for name in COLLECTIVES if name in text}


@enough_devices
@pytest.mark.parametrize("noise_kind", ["isotropic", "per_point_rank_deficient"])
@pytest.mark.parametrize("solver", ["dense", "markov", "markov-parallel"])
def test_sharded_batch_matches_single_device(solver, noise_kind, x64):
    if solver == "markov-parallel" and noise_kind == "isotropic":
        pytest.skip("one noise suffices for the parallel solver (its compile is slow on CPU)")
    kernel, x, y, nz, mean = _batch(noise_kind)
    sharding = NamedSharding(_mesh(), P("batch"))
    batched = jax.device_put((x, y, nz, mean), sharding)
    fn = _per_problem(solver)

    compiled = fn.lower(kernel, *batched).compile()
    assert _collectives(compiled) == {}, "independent problems must not communicate"
    sharded = compiled(kernel, *batched)
    single = fn(kernel, x, y, nz, mean)  # the same program on one device

    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding)
    _assert_same(sharded, single, rtol=_rtol(x64))


@enough_devices
def test_optax_step_on_a_sharded_batch(x64):
    kernel, x, y, nz, mean = _batch("per_point_rank_deficient")
    mesh = _mesh()
    sharding = NamedSharding(mesh, P("batch"))
    optimiser = optax.adam(0.05)

    def loss(params, y, nz, mean):
        kernel, x = params
        values = jax.vmap(gg.precision_form_log_likelihood, in_axes=(None, 0, 0, 0, 0))(kernel, x, y, nz, mean)
        return -jnp.sum(values)

    @jax.jit
    def step(params, state, y, nz, mean):
        value, grads = jax.value_and_grad(loss)(params, y, nz, mean)
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = (kernel, x)
    state = optimiser.init(params)
    sharded_params = (jax.device_put(kernel, NamedSharding(mesh, P())), jax.device_put(x, sharding))
    sharded_args = (sharded_params, optimiser.init(sharded_params), *jax.device_put((y, nz, mean), sharding))

    compiled = step.lower(*sharded_args).compile()
    # Only the summed loss and the shared kernel's gradient are reduced over the batch.
    assert set(_collectives(compiled)) <= {"all-reduce"}, _collectives(compiled)
    (new_kernel, new_x), _, value = compiled(*sharded_args)
    (ref_kernel, ref_x), _, ref_value = step(params, state, y, nz, mean)

    assert new_x.sharding.is_equivalent_to(sharding, new_x.ndim)
    assert not np.allclose(np.asarray(new_x), np.asarray(x)), "the step moved nothing"
    _assert_same((new_kernel, new_x, value), (ref_kernel, ref_x, ref_value), rtol=_rtol(x64))


@enough_devices
def test_explicit_mesh_axes(x64):
    """Under explicit axes the recipe (``auto_axes``) works and a bare call names it."""
    kernel, x, y, nz, mean = _batch("per_point_rank_deficient")
    mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    batched = jax.device_put((x, y, nz, mean), NamedSharding(mesh, P("batch")))
    vmapped = jax.vmap(jax.value_and_grad(gg.precision_form_log_likelihood, argnums=(0, 1)), in_axes=(None, 0, 0, 0, 0))
    with jax.set_mesh(mesh):
        recipe = jax.jit(jax.sharding.auto_axes(vmapped, out_sharding=P("batch")))
        assert _collectives(recipe.lower(kernel, *batched).compile()) == {}
        value, (kernel_grad, x_grad) = recipe(kernel, *batched)
        assert x_grad.sharding.spec[0] == "batch"
        try:  # JAX 0.10 cannot batch every solver's operations under explicit axes
            bare = jax.jit(vmapped)(kernel, *batched)
        except TypeError as err:
            assert "auto_axes" in str(err) and "README" in str(err), err
            bare = None
    single = vmapped(kernel, x, y, nz, mean)
    _assert_same((value, kernel_grad, x_grad), single, rtol=_rtol(x64))
    if bare is not None:
        _assert_same(bare, single, rtol=_rtol(x64))


@enough_devices
@pytest.mark.parametrize("solver", ["dense", "markov", "markov-parallel"])
def test_sharded_programs_hold_no_batched_lapack_call(solver, x64):
    """The sharded programs of every solver and of the inducing bound: no batched LAPACK call
    (jaxlib 0.10.2's can deadlock across devices), checked on what each device compiles."""
    from test_no_lapack import batched_lapack_calls

    kernel, x, y, nz, mean = _batch("per_point_rank_deficient")
    batched = jax.device_put((x, y, nz, mean), NamedSharding(_mesh(), P("batch")))
    assert not batched_lapack_calls(_per_problem(solver), kernel, *batched)
    if solver == "dense":
        z = jnp.linspace(0.1, 2.9, 4, dtype=x.dtype)
        bound = jax.jit(jax.vmap(jax.value_and_grad(gg.inducing_bound, argnums=(1, 4)), in_axes=(None, 0, 0, 0, None, 0)))
        assert not batched_lapack_calls(bound, kernel, batched[0], batched[1], batched[2], z, batched[3])


@enough_devices
def test_dense_solver_across_devices_repeats_without_a_hang(x64):
    """The dense solver vmapped over a batch sharded across forced host devices: with jaxlib
    0.10.2's batched LAPACK calls, every device's thread could wait in a batched triangular solve
    for work queued behind the others (a few dozen repetitions showed it). Its batches now take
    the written-out factorisation: plain ``vmap``, repeated, communicates nothing and gives the
    single-device results."""
    kernel, x, y, nz, mean = _batch("per_point_rank_deficient")
    mesh = _mesh()

    def one(x, y, nz, mean):  # in x only: the shared kernel's cotangent would be summed over devices
        return jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1)(kernel, x, y, nz, mean, solver="dense")

    batched_fn = jax.jit(jax.vmap(one))
    batched = jax.device_put((x, y, nz, mean), NamedSharding(mesh, P("batch")))
    assert _collectives(batched_fn.lower(*batched).compile()) == {}
    for _ in range(50):  # the deadlock needed a few dozen repetitions to show
        result = jax.block_until_ready(batched_fn(*batched))
    _assert_same(result, jax.vmap(one)(x, y, nz, mean), rtol=_rtol(x64))
