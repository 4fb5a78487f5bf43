"""The state-space solvers call no LAPACK kernel on the CPU, and finish in fresh processes.

jaxlib 0.10.2's batched CPU LAPACK kernels split their batch over the intra-op thread pool and
wait for it; two of them running at once (the associative-scan combination solved two systems
in one program) could each wait for work queued behind the other, forever. The solvers' small
matrices are now written out (``gpgrad_jax._smallmatrix``); these tests keep it that way.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from problems import FULL, make_markov_problem

import gpgrad_jax as gg
from gpgrad_jax import noise

MARKOV_SOLVERS = ("markov", pytest.param("markov-parallel", marks=pytest.mark.slow))


def _custom_calls(fn, *args):
    return set(re.findall(r'custom_call_target="([^"]+)"', jax.jit(fn).lower(*args).compile().as_text()))


@pytest.mark.float32
@pytest.mark.skipif(
    not FULL and jax.config.jax_enable_x64, reason="the fast profile checks the float32 programs (float32 pass)"
)
@pytest.mark.parametrize("solver", MARKOV_SOLVERS)
@pytest.mark.parametrize(
    "kernel_name, noise_kind",
    [("scaled_sum", "per_point_rank_deficient"), pytest.param("curve", "isotropic", marks=pytest.mark.slow)],
)
def test_compiled_state_space_solvers_call_no_lapack(solver, kernel_name, noise_kind):
    """Value, every cotangent, the explicit gradient, predictions and draws, in the precision of
    the pass (float64 in the default one, float32 in the float32 pass)."""
    kernel, x, y, nz, mean = make_markov_problem(kernel_name, noise_kind, 1, 3).args()
    x_new = jnp.linspace(0.0, 3.0, 7, dtype=x.dtype)
    key = jax.random.key(0)
    programs = {
        "value": (functools.partial(gg.log_marginal_likelihood, solver=solver), kernel, x, y, nz, mean),
        "precision form": (functools.partial(gg.precision_form_log_likelihood, solver=solver), kernel, x, y, nz, mean),
        "cotangents": (  # the solver's rule and the noise term's (the Jacobi SVD of the blocks)
            jax.grad(functools.partial(gg.log_marginal_likelihood, solver=solver), argnums=(0, 1, 2, 3, 4)),
            kernel,
            x,
            y,
            nz,
            mean,
        ),
        "index_gradient": (functools.partial(gg.index_gradient, solver=solver), kernel, x, y, nz, mean),
        "predict": (lambda *a: gg.predict(*a, solver=solver), kernel, x, y, nz, x_new, mean),
        "sample_posterior": (
            lambda k, *a: gg.sample_posterior(k, *a, 3, solver=solver, noise_new=noise.Isotropic(0.5)),
            key,
            kernel,
            x,
            y,
            nz,
            x_new,
        ),
    }
    for name, (fn, *args) in programs.items():
        lapack = {target for target in _custom_calls(fn, *args) if "lapack" in target}
        assert not lapack, f"{solver} {name} calls {lapack}"


_RUN = textwrap.dedent(
    """
    import sys
    import jax
    if sys.argv[2] == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np
    import gpgrad_jax as gg
    from gpgrad_jax import kernels, noise
    solver, n = sys.argv[1], int(sys.argv[3])
    dtype = jnp.dtype(sys.argv[2])
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0.0, 20.0, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) + 0.01 * rng.normal(size=(n, 3))
    rays = rng.normal(size=(n, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / 0.01
    cast = lambda a: jnp.asarray(a, dtype)
    kernel = jax.tree_util.tree_map(cast, kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0))
    fn = jax.jit(jax.value_and_grad(
        lambda k, x, y, b: gg.log_marginal_likelihood(k, x, y, noise.PerPoint(b), solver=solver), argnums=(0, 1, 2, 3)
    ))
    for _ in range(3):
        value, _ = jax.block_until_ready(fn(kernel, cast(x), cast(y), cast(blocks)))
    print("finished", float(value))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("solver, n", [("markov", 2000), ("markov-parallel", 500)])
def test_fresh_processes_two_at_a_time_finish(solver, n, dtype):
    """The reported hang: ``value_and_grad`` in separate processes, every thread idle on a futex.
    Two processes at once on this 2-core machine, jaxlib's default threading, under a timeout."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # default threads
    command = [sys.executable, "-c", _RUN, solver, dtype, str(n)]
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    for process in processes:
        try:
            out, err = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"{solver} {dtype}: a process did not finish in 300 s")
        assert process.returncode == 0 and "finished" in out, err[-3000:]
