"""A GPLVM fitted across processes: the inducing bound with the data split over a JAX cluster.

Each process holds its share of the points — observations ``y`` (``n × 12``), their latent
positions ``x`` (``n × 2``) and Adam's state for them — and never sees the others'.
``gg.inducing_bound(..., mesh=mesh, axis="points")`` runs the bound and its closed-form gradient on
every device's own points; the ``m × m`` statistics, the inducing inputs' and the kernel's
gradients are summed across the cluster (one all-reduce per pass). At the end the learned
positions are gathered once, for the check: the bound on one device, on all the data, must be the
cluster's.

Run:
    python examples/distributed_gplvm.py --processes 2        # two processes on this machine

It launches its own processes on localhost (each with ``--process-id``). On a cluster, start one
process per host yourself with the same ``--processes`` and a reachable ``--coordinator``
(``HOST:PORT`` of process 0), e.g. through your scheduler; on GPUs each process uses its local GPUs,
unchanged. The last line reads ``bound: VALUE (one process: VALUE)``.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from gplvm import make_data, pca_start, procrustes_disparity  # noqa: E402  (examples/gplvm.py)
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def _launch(args) -> int:
    """Start ``--processes`` copies of this script on localhost; relay process 0's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = sys.argv[1:]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"],
            stdout=None if i == 0 else subprocess.DEVNULL,
        )
        for i in range(args.processes)
    ]
    try:
        codes = [child.wait(timeout=args.timeout) for child in children]
    finally:
        for child in children:
            child.kill()
    return max(codes)


def _objective(params, y, mesh):
    """− bound + ½‖x‖² (a N(0, I) prior on the latent positions), per point."""
    latent, inducing, log_variance, log_lengthscale, log_sigma = params
    kernel = kernels.ExpSquared(jnp.exp(log_variance), jnp.exp(log_lengthscale))
    bound = gg.inducing_bound(kernel, latent, y, noise.Isotropic(jnp.exp(log_sigma)), inducing, mesh=mesh, axis="points")
    return (-bound + 0.5 * jnp.sum(latent**2)) / y.shape[0], bound


def run(args) -> None:
    if args.processes > 1:
        jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)
    mesh = Mesh(np.array(jax.devices()), ("points",))
    along = NamedSharding(mesh, PartitionSpec("points"))
    leader = jax.process_index() == 0
    say = print if leader else (lambda *a, **k: None)

    # Every process draws the same data and keeps its share: on a cluster each loads only its own.
    truth, y_all = make_data(args.seed, args.points)
    start = pca_start(y_all)
    share = slice(*(args.points * np.array([jax.process_index(), jax.process_index() + 1]) // jax.process_count()))

    def global_points(a):
        return jax.make_array_from_process_local_data(along, np.asarray(a)[share], np.shape(a))

    y = global_points(y_all)
    rng = np.random.default_rng(args.seed)
    # The shared parameters replicated on the mesh from the start: the steps' outputs are, and
    # one compiled program serves every step.
    shared = jax.device_put(
        (start[rng.choice(args.points, args.inducing, replace=False)], np.float64(0.0), np.zeros(2), np.log(0.3)),
        NamedSharding(mesh, PartitionSpec()),
    )
    params = (global_points(start), *shared)
    say(
        f"{jax.process_count()} process(es), {jax.device_count()} device(s) ({jax.devices()[0].platform}): "
        f"{args.points} points × 12, m = {args.inducing} inducing inputs, {args.points // jax.device_count()} points per device",
        flush=True,
    )
    optimiser = optax.adam(args.learning_rate)

    @jax.jit
    def step(params, state, y):  # y an argument: a global array is never closed over
        (loss, _), grads = jax.value_and_grad(_objective, has_aux=True)(params, y, mesh)
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = optimiser.init(params)
    begin = time.perf_counter()
    for i in range(1, args.steps + 1):
        params, state, loss = step(params, state, y)
        if i % max(1, args.steps // 5) == 0 or i == args.steps:
            say(f"step {i:4d}  −bound/n + prior {float(loss):9.5f}  ({time.perf_counter() - begin:6.1f} s)", flush=True)

    cluster_bound = float(jax.jit(lambda p, y: _objective(p, y, mesh)[1])(params, y))
    # The check: the learned parameters gathered once, the bound on this process's device alone.
    latent = multihost_utils.process_allgather(params[0], tiled=True)
    kernel = kernels.ExpSquared(jnp.exp(params[2]), jnp.exp(params[3]))
    alone = float(gg.inducing_bound(kernel, latent, y_all, noise.Isotropic(jnp.exp(params[4])), params[1]))
    say(f"layout error (Procrustes): {procrustes_disparity(truth, start):.4f} -> {procrustes_disparity(truth, latent):.4f}")
    say(f"bound: {cluster_bound:.10f} (one process: {alone:.10f})", flush=True)
    if args.processes > 1:
        jax.distributed.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--process-id", type=int, default=None, help="set by the launcher (or your scheduler)")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (set by the launcher)")
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--inducing", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the launcher waits")
    parser.add_argument("--out", default=None, help="unused: no files are written")
    parser.add_argument("--quick", action="store_true", help="2000 points, 16 inducing inputs, 30 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.inducing, args.steps = 2000, 16, 30
    if args.processes > 1 and args.process_id is None:
        sys.exit(_launch(args))
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
