"""A long time series over several devices: the Markov solver in contiguous segments, one per device.

A quasi-periodic signal (``Matern32 × Cosine + Matern12``, the celerite kind) sampled at ``n``
irregular, sorted time stamps with per-point noise. The series is split along a mesh axis into
one contiguous segment per device; ``gg.solvers.Markov(mesh=mesh, axis="time")`` runs each
segment's Kalman recursions where its points are, and only the segments' summaries and their
boundary points move between devices (``gpgrad_jax/_solver/markov/segments.py``). Adam fits the
kernel's parameters with the closed-form gradient; the check at the end: the log density on one
device must be the mesh's.

Run:
    python examples/distributed_series.py --devices 4     # four forced host devices on a CPU

On a CPU the devices are forced host devices (``--xla_force_host_platform_device_count``); on a
machine with GPUs the script uses ``--devices`` of them unchanged, and on a cluster the mesh spans
every host after ``jax.distributed.initialize()`` (see ``examples/distributed_gplvm.py``). The
last line reads ``log density: VALUE (one device: VALUE)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="unused: no files are written")
    parser.add_argument("--quick", action="store_true", help="8000 points, 10 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.steps = 8000, 10
    return args


ARGS = _arguments(sys.argv[1:]) if __name__ == "__main__" else None
if ARGS is not None:
    # Read when JAX starts its CPU backend; a GPU machine's devices are unaffected.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def make_series(seed: int, n: int):
    """Sorted irregular time stamps over 0 … n/100, a quasi-periodic signal, per-point noise."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, n / 100.0, n))
    signal = np.sin(2 * np.pi * t / 1.3) * np.exp(-0.5 * ((t % 50.0) / 20.0) ** 2) + 0.3 * np.sin(0.07 * t)
    sigma = rng.uniform(0.05, 0.2, n)
    return t, signal + sigma * rng.normal(size=n), sigma


def kernel_of(params):
    amplitude, lengthscale, period, small, short = (jnp.exp(p) for p in params)
    return kernels.Matern32(amplitude, lengthscale) * kernels.Cosine(1.0, period) + kernels.Matern12(small, short)


def main(args) -> None:
    devices = jax.devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: this machine has {len(devices)} {jax.default_backend()} device(s)")
    if args.points % args.devices:
        raise SystemExit(f"--points must be a multiple of --devices ({args.devices}) to split the series evenly")
    mesh = Mesh(np.array(devices), ("time",))
    along = NamedSharding(mesh, PartitionSpec("time"))
    t, y, sigma = make_series(args.seed, args.points)
    t_d, y_d, blocks_d = jax.device_put((t, y, 1.0 / sigma), along)  # each device its segment
    solver = gg.solvers.Markov(mesh=mesh, axis="time")
    print(
        f"{args.points} time stamps over {len(devices)} {devices[0].platform} device(s), "
        f"{args.points // len(devices)} per segment; kernel Matern32 × Cosine + Matern12",
        flush=True,
    )

    def negative_density(params, t, y, blocks):
        return -gg.log_marginal_likelihood(kernel_of(params), t, y, noise.PerPoint(blocks), solver=solver) / t.shape[0]

    optimiser = optax.adam(args.learning_rate)

    @jax.jit
    def step(params, state, t, y, blocks):
        loss, grads = jax.value_and_grad(negative_density)(params, t, y, blocks)
        updates, state = optimiser.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    # On the mesh from the start (replicated): the steps' outputs are, and one program serves all.
    params = jax.device_put(tuple(np.log(v) for v in (0.5, 1.0, 1.2, 0.2, 0.5)), NamedSharding(mesh, PartitionSpec()))
    state = optimiser.init(params)
    begin = time.perf_counter()
    for i in range(1, args.steps + 1):
        params, state, loss = step(params, state, t_d, y_d, blocks_d)
        if i % max(1, args.steps // 5) == 0 or i == args.steps:
            print(f"step {i:4d}  −log density / n {float(loss):9.5f}  ({time.perf_counter() - begin:6.1f} s)", flush=True)

    value_and_index_grad = jax.jit(jax.value_and_grad(lambda t, p: -negative_density(p, t, y_d, blocks_d) * t.shape[0]))
    on_mesh, time_grad = value_and_index_grad(t_d, params)
    alone = gg.log_marginal_likelihood(kernel_of(params), t, y, noise.PerPoint(1.0 / sigma), solver="markov")
    learned = ", ".join(f"{name} {float(jnp.exp(p)):.3f}" for name, p in zip(("amplitude", "lengthscale", "period", "rough amplitude", "rough lengthscale"), params))
    print(f"learned: {learned}; ∂/∂t stays split like t: {time_grad.sharding.spec}")
    print(f"log density: {float(on_mesh):.8f} (one device: {float(alone):.8f})", flush=True)


if __name__ == "__main__":
    main(ARGS)
