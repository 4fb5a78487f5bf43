"""One problem over many devices: the inducing bound's points and a series' segments split over a
mesh give the one-device value and cotangents, moving only small summaries between devices.

Four forced host (CPU) devices in a subprocess (the launcher test, as in ``test_sharding.py``), and
two real processes on localhost through ``jax.distributed`` (``two_processes.py``). Full profile.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from problems import STATE_SPACE_KERNELS, assert_trees_close, make_markov_problem, make_problem, rerun_on_host_devices

import gpgrad_jax as gg

DEVICES = 4
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

enough_devices = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason=f"needs {DEVICES} devices (run by test_on_forced_host_devices)"
)


@pytest.mark.slow  # float64 only in CI (its budget); JAX_ENABLE_X64=0 runs it in float32 (2e-3)
@pytest.mark.skipif(jax.device_count() >= DEVICES, reason="this process has the devices itself")
def test_on_forced_host_devices():
    rerun_on_host_devices(__file__, DEVICES, timeout=1500)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes():
    """Two processes on localhost, each holding half the points: the one-process results."""
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "two_processes.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    processes = [
        subprocess.Popen([sys.executable, worker, str(i), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-4000:]
            outputs.append(out)
    finally:
        for process in processes:
            process.kill()
    for out in outputs:
        report = json.loads(out.strip().splitlines()[-1])
        assert report["devices"] == 2, report
        for name in ("inducing", "markov-covariance", "markov-square-root"):
            assert report[name] <= 1e-10, (name, report)


# ------------------------------------------------------------------ on four devices


def _mesh():
    return Mesh(np.array(jax.devices()[:DEVICES]), ("points",))


def _place(tree, mesh, n):
    """Every array of ``tree`` with a leading points axis split over the mesh, the rest replicated
    (with ``n`` not a multiple of the devices, as given: the solver lays them out)."""
    if n % DEVICES:
        return tree
    along, whole = NamedSharding(mesh, PartitionSpec("points")), NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, along if jnp.ndim(a) and jnp.shape(a)[0] == n else whole), tree)


def _rtol():
    return 1e-10 if jax.config.jax_enable_x64 else 2e-3


def _collective_sizes(compiled) -> list[tuple[str, int]]:
    """``(kind, elements)`` of every collective in the compiled program."""
    sizes = []
    for line in compiled.as_text().splitlines():
        for kind in COLLECTIVES:
            if f" {kind}(" in line and " = " in line:
                shapes = line.split(" = ", 1)[1].split(f" {kind}(")[0]
                count = 0
                for part in shapes.replace("(", " ").replace(")", " ").split():
                    if "[" in part:
                        dims = part.split("[", 1)[1].split("]")[0]
                        count += int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                sizes.append((kind, count))
    return sizes


def _assert_no_points_moved(compiled, n):
    """No collective carries anything of the points axis' size: only summaries and scalars (and
    a neighbouring point at each segment boundary)."""
    sizes = _collective_sizes(compiled)
    assert sizes, "expected the reductions across devices"
    big = [(kind, size) for kind, size in sizes if size >= n // DEVICES]
    assert not big, f"collectives as large as a device's points (n = {n}): {big}"


BOUND_NOISES = ("isotropic", "per_point_rank_deficient")


# Compiled once per structure and layout: hypothesis' examples reuse the programs.
@functools.partial(jax.jit, static_argnames=("mesh",))
def _bound_grads(kernel, x, y, nz, z, mean, mesh=None):
    grad = jax.value_and_grad(gg.inducing_bound, argnums=(0, 1, 2, 3, 4, 5))
    return grad(kernel, x, y, nz, z, mean, mesh=mesh, axis=None if mesh is None else "points")


@functools.partial(jax.jit, static_argnames=("solver",))
def _index_gradient(kernel, x, y, nz, mean, solver):
    return gg.index_gradient(kernel, x, y, nz, mean, solver=solver)


@functools.partial(jax.jit, static_argnames=("solver",))
def _density_grads(kernel, x, y, nz, mean, solver):
    return jax.value_and_grad(gg.log_marginal_likelihood, argnums=(0, 1, 2, 3, 4))(kernel, x, y, nz, mean, solver=solver)


@enough_devices
@pytest.mark.parametrize("noise_kind", BOUND_NOISES)
@pytest.mark.parametrize("index_dim", [None, 2])
@settings(max_examples=min(4, settings.default.max_examples))  # sharded programs: compile-bound (CI's budget)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([24, 22]))
def test_inducing_bound_over_a_mesh(noise_kind, index_dim, seed, n):
    """Value and every cotangent (kernel, x, y, noise, Z, mean) of the bound with the points over
    four devices — 24 points laid out by the caller, or 22: padded to 24 — equal the one-device
    ones."""
    problem = make_problem("exp_squared", noise_kind, seed, dim=3, index_dim=index_dim, n=n)
    # Spread-out inducing inputs, as users place them: with two nearly equal ones K_zz's
    # condition number (up to 1/jitter = 1e8) amplifies the rounding of the sums' order past 1e-10.
    rng = np.random.default_rng(seed)
    spread = np.linspace(0.05, 3.0, 5) if index_dim is None else np.array([[0, 0], [1, 1], [-1, 1], [1, -1], [-1, -1]])
    z = jnp.asarray(spread + 0.1 * rng.normal(size=spread.shape), problem.x.dtype)
    mesh = _mesh()
    single = _bound_grads(*problem.args()[:4], z, problem.mean)
    kernel, x, y, nz, mean = _place(problem.args(), mesh, n)
    assert_trees_close(_bound_grads(kernel, x, y, nz, z, mean, mesh=mesh), single, _rtol(), "the bound over a mesh")


@enough_devices
@pytest.mark.parametrize("noise_kind", BOUND_NOISES)
def test_inducing_bound_moves_no_points(noise_kind):
    """One reduction of m p × m p statistics per pass; the x cotangent stays split like x."""
    n = 4096
    problem = make_problem("exp_squared", noise_kind, 0, dim=3, index_dim=2, n=n)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(8, 2)), problem.x.dtype)
    mesh = _mesh()
    kernel, x, y, nz, _ = _place(problem.args(), mesh, n)
    grad = jax.jit(jax.value_and_grad(lambda k, x, nz, z: gg.inducing_bound(k, x, y, nz, z, mesh=mesh), argnums=(0, 1, 2, 3)))
    compiled = grad.lower(kernel, x, nz, z).compile()
    _assert_no_points_moved(compiled, n)
    assert not [kind for kind, _ in _collective_sizes(compiled) if kind != "all-reduce"]
    _, (_, x_bar, _, _) = compiled(kernel, x, nz, z)
    assert x_bar.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("points")), 2)


@enough_devices
def test_inducing_posterior_over_a_mesh():
    problem = make_problem("exp_squared", "per_point_rank_deficient", 3, dim=3, index_dim=None, n=24)
    z = jnp.linspace(0.0, 3.0, 6, dtype=problem.x.dtype)
    x_new = jnp.linspace(-0.5, 3.5, 9, dtype=problem.x.dtype)
    on_mesh = gg.solvers.Inducing(z, mesh=_mesh(), axis="points")
    args = _place(problem.args(), _mesh(), 24)
    mean, variance = gg.predict(*args[:4], x_new, args[4], solver=on_mesh)
    expected = gg.predict(*problem.args()[:4], x_new, problem.mean, inducing=z)
    assert_trees_close((mean, variance), expected, _rtol(), "predict")
    key = jax.random.key(1)
    draws = gg.sample_posterior(key, *args[:4], x_new, 3, args[4], solver=on_mesh)
    assert_trees_close(draws, gg.sample_posterior(key, *problem.args()[:4], x_new, 3, problem.mean, inducing=z), _rtol(), "draws")


def _sorted(problem, n):
    """The problem with its points in ascending order (ties kept)."""
    order = np.argsort(np.asarray(problem.x), kind="stable")
    permute = lambda a: a[order] if jnp.ndim(a) and jnp.shape(a)[0] == n else a  # noqa: E731
    return jax.tree_util.tree_map(permute, problem.args())


MESH_KERNELS = ["matern32", "curve", "quasi_periodic"]


@enough_devices
@pytest.mark.parametrize("form", ["covariance", "square-root"])
@pytest.mark.parametrize("kernel_name", [k for k in MESH_KERNELS if k in STATE_SPACE_KERNELS])
@settings(max_examples=min(4, settings.default.max_examples))  # sharded programs: compile-bound (CI's budget)
@given(seed=st.integers(0, 2**16), noise_kind=st.sampled_from(["isotropic", "per_point_rank_deficient"]))
def test_markov_over_a_mesh(form, kernel_name, seed, noise_kind):
    """A sorted series of 24 points with ties, in four segments: the one-device value and every
    cotangent (kernel, x, y, noise, mean), in both forms."""
    n = 24
    problem = make_markov_problem(kernel_name, noise_kind, seed, dim=3, n=n, kernel_table=STATE_SPACE_KERNELS, ties=3)
    args = _sorted(problem, n)
    one = gg.solvers.Markov(form=form, native=False)
    many = gg.solvers.Markov(form=form, mesh=_mesh(), axis="points")
    single = _density_grads(*args, solver=one)
    split = _density_grads(*_place(args, _mesh(), n), solver=many)
    assert_trees_close(split, single, _rtol(), f"{kernel_name} over a mesh, {form}")
    index = _index_gradient(*_place(args, _mesh(), n), solver=many)
    assert_trees_close(index, _index_gradient(*args, solver=one), _rtol(), f"{kernel_name}: index_gradient over a mesh")


@enough_devices
@pytest.mark.parametrize("form", ["covariance", "square-root"])
def test_markov_moves_no_points(form):
    n = 4096
    problem = make_markov_problem("quasi_periodic", "per_point_rank_deficient", 0, dim=3, n=n, kernel_table=STATE_SPACE_KERNELS)
    mesh = _mesh()
    kernel, x, y, nz, mean = _place(_sorted(problem, n), mesh, n)
    solver = gg.solvers.Markov(form=form, mesh=mesh)
    grad = jax.jit(jax.value_and_grad(lambda k, x, nz: gg.log_marginal_likelihood(k, x, y, nz, mean, solver=solver), argnums=(0, 1, 2)))
    compiled = grad.lower(kernel, x, nz).compile()
    _assert_no_points_moved(compiled, n)
    _, (_, x_bar, _) = compiled(kernel, x, nz)
    assert x_bar.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec("points")), 1)


@enough_devices
def test_markov_over_a_mesh_refuses_what_it_cannot_do():
    problem = make_markov_problem("matern32", "isotropic", 0, dim=3, n=24, kernel_table=STATE_SPACE_KERNELS)
    kernel, x, y, nz, _ = problem.args()
    solver = gg.solvers.Markov(mesh=_mesh())
    with pytest.raises(ValueError, match="`x` must be sorted"):
        gg.log_marginal_likelihood(kernel, x[::-1], y, nz, solver=solver)
    with pytest.raises(ValueError, match="4 equal segments"):
        gg.log_marginal_likelihood(kernel, jnp.sort(x)[:22], y[:22], nz, solver=solver)
    with pytest.raises(NotImplementedError, match="over a `mesh`"):
        gg.predict(kernel, jnp.sort(x), y, nz, jnp.ones(2), solver=solver)
    with pytest.raises(NotImplementedError, match="over a `mesh`"):
        gg.predict(kernel, jnp.sort(x), y, nz, jnp.ones(2), solver=solver, full_covariance=True)
    with pytest.raises(NotImplementedError, match="over a `mesh`"):
        gg.sample_posterior(jax.random.key(0), kernel, jnp.sort(x), y, nz, jnp.ones(2), 2, solver=solver)
    with pytest.raises(ValueError, match="`axis` must name axes"):
        gg.solvers.Markov(mesh=_mesh(), axis="time")
    with pytest.raises(ValueError, match="parallel=True"):
        gg.solvers.Markov(mesh=_mesh(), parallel=True)
    with pytest.raises(ValueError, match="`axis` must name axes"):
        gg.inducing_bound(kernel, x, y, nz, x[:4], mesh=_mesh(), axis="time")
    with pytest.raises(TypeError, match=r"jax\.sharding\.Mesh"):
        gg.inducing_bound(kernel, x, y, nz, x[:4], mesh="points")
