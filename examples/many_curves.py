"""Many curves at once: one jit-compiled optax step over a ``jax.vmap``-ed batch of curves.

A batch of independent camera-ray scenes (see ``camera_rays.py``), each with its
own points, rays and rank-2 per-point noise, is optimised together: the loss is
``vmap(log_marginal_likelihood)`` summed over the batch, so one compiled Adam
step updates every curve's indices.  Curves do not interact (the gradient of a
sum of independent terms), and the batch runs faster than a Python loop over
the curves.

With ``--devices N`` the batch axis is sharded over N devices (a ``jax.sharding.Mesh``
with one axis, ``NamedSharding(mesh, P("batch"))`` on every per-curve array): the same
``jit``-ed step then runs each device's curves on that device, with nothing but the
summed loss crossing devices.  On a CPU, ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
gives four host devices.

Run:  python examples/many_curves.py [--curves B] [--devices N] [--out DIR] [--quick]
The last line reads ``index error: BEFORE -> AFTER`` (mean over curves, RMS per curve).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import noise  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from camera_rays import calibrate_kernel, curve_kernel, indices_from, make_scene, theta_from  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", type=int, default=16)
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--devices", type=int, default=1, help="shard the batch over this many devices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/many_curves")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.curves, args.points, args.steps = 8, 40, 200

    if args.devices > jax.device_count():
        parser.error(
            f"--devices {args.devices}: only {jax.device_count()} {jax.default_backend()} device(s); on a CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}"
        )
    if args.curves % args.devices:
        parser.error(f"--curves {args.curves} must be a multiple of --devices {args.devices}")

    start = time.perf_counter()
    scenes = [make_scene(args.seed + i, args.points) for i in range(args.curves)]
    log_variances = calibrate_kernel(make_scene(args.seed + 1000, args.points), steps=60)
    kernel = curve_kernel(log_variances)
    truth = np.stack([s.arc_length for s in scenes])  # (B, n)
    observed = jnp.asarray(np.stack([s.observed for s in scenes]))  # (B, n, 3)
    blocks = jnp.asarray(np.stack([s.blocks for s in scenes]))  # (B, n, 3, 3)
    # Crude guess per curve: even spacing over twice its true length.
    initial = np.stack([np.linspace(0.0, 2.0 * t[-1], args.points) for t in truth])
    theta = jnp.stack([theta_from(x) for x in initial])
    # The batch axis of every per-curve array is split over the devices; the kernel is shared.
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("batch",))
    theta, observed, blocks = jax.device_put((theta, observed, blocks), NamedSharding(mesh, P("batch")))

    def curve_loss(theta_one, y_one, blocks_one):
        return -gg.log_marginal_likelihood(kernel, indices_from(theta_one), y_one, noise.PerPoint(blocks_one))

    solver = optax.adam(0.05)

    @jax.jit
    def step(theta, state, observed, blocks):
        # Per-curve values and gradients (the gradient of the summed loss, curve by curve) and
        # Adam's elementwise update: nothing in the step crosses devices.
        values, grad = jax.vmap(jax.value_and_grad(curve_loss))(theta, observed, blocks)
        updates, state = solver.update(grad, state, theta)
        return optax.apply_updates(theta, updates), state, values

    def errors(theta):
        return np.sqrt(np.mean((np.asarray(jax.vmap(indices_from)(theta)) - truth) ** 2, axis=1))

    # One batched, compiled step (median of several) against a Python loop of single-curve steps.
    state = solver.init(theta)
    compiled = step.lower(theta, state, observed, blocks).compile()
    crossing = [op for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute") if op in compiled.as_text()]
    print(f"collectives in the compiled step: {', '.join(crossing) or 'none'}")
    jax.block_until_ready(compiled(theta, state, observed, blocks))
    step_s = np.median([_seconds(lambda: compiled(theta, state, observed, blocks)) for _ in range(9)])
    single = jax.jit(jax.value_and_grad(curve_loss))
    one = [jax.device_put(a[0], jax.devices()[0]) for a in (theta, observed, blocks)]
    jax.block_until_ready(single(*one))
    single_s = np.median([_seconds(lambda: single(*one)) for _ in range(9)])
    print(
        f"{args.curves} curves × {args.points} points on {args.devices} device(s) "
        f"({args.curves // args.devices} per device): one step {step_s * 1e3:.2f} ms; "
        f"{args.curves} single-curve gradients one by one {single_s * args.curves * 1e3:.2f} ms",
        flush=True,
    )

    before = errors(theta)
    for i in range(args.steps):
        theta, state, values = compiled(theta, state, observed, blocks)
        if (i + 1) % 50 == 0:
            print(
                f"iter {i + 1:5d}  summed -log L {float(np.sum(values)):12.3f}  "
                f"mean index RMS error {errors(theta).mean():.4f}",
                flush=True,
            )
    after = errors(theta)
    if not args.no_plots:
        print(f"plot: {save_plot(args.out, before, after)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    print(f"index error: {before.mean():.4f} -> {after.mean():.4f}")
    return before.mean(), after.mean()


def _seconds(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def save_plot(out_dir, before, after):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    index = np.arange(len(before))
    ax.bar(index - 0.2, before, 0.4, label="initial", color="0.6")
    ax.bar(index + 0.2, after, 0.4, label="recovered", color="tab:blue")
    ax.set_xlabel("curve")
    ax.set_ylabel("index RMS error (arc length)")
    ax.set_title("many curves, one vmapped jit step")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "many_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
