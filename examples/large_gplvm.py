"""A GPLVM of 100 000 points: latent positions, inducing inputs and kernel learned together.

The same kind of data as ``examples/gplvm.py`` — hidden 2-D positions ``t_i`` seen through a
smooth nonlinear map into R¹² plus noise — but ``n = 100 000`` points, where the exact
likelihood would need a 100 000² matrix (80 GB). ``gg.inducing_bound`` with ``m = 64`` inducing
inputs costs O(n m²) per step; Adam learns the latent positions ``x`` (``n × 2``), the inducing
inputs ``Z`` (``m × 2``), the ARD lengthscales, the kernel variance and the noise from a PCA start,
each gradient from the closed-form rule (row sums against ``grad_first`` for ``x`` and ``Z``).

The layout error is the Procrustes disparity to the hidden positions (0 = the same shape up to
rotation, reflection, translation and scale).

Run:  python examples/large_gplvm.py [--points 100000] [--inducing 64] [--steps 300] [--out DIR]
The last line reads ``layout error (Procrustes): BEFORE -> AFTER``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from gplvm import aligned, make_data, pca_start, procrustes_disparity  # noqa: E402  (examples/gplvm.py)

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


class Params(NamedTuple):
    latent: jax.Array  # (n, 2)
    inducing: jax.Array  # (m, 2)
    log_variance: jax.Array
    log_lengthscale: jax.Array  # (2,)
    log_sigma: jax.Array


def objective(params: Params, y):
    """− bound + ½‖x‖² (a N(0, I) prior on the latent positions), per point."""
    kernel = kernels.ExpSquared(jnp.exp(params.log_variance), jnp.exp(params.log_lengthscale))
    nz = noise.Isotropic(jnp.exp(params.log_sigma))
    bound = gg.inducing_bound(kernel, params.latent, y, nz, params.inducing)
    return (-bound + 0.5 * jnp.sum(params.latent**2)) / y.shape[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--inducing", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/large_gplvm")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5000 points, 32 inducing inputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.inducing, args.steps = 5000, 32, 300

    start = time.perf_counter()
    truth, y = make_data(args.seed, args.points)
    y = jnp.asarray(y)
    initial = pca_start(y)
    rng = np.random.default_rng(args.seed)
    params = Params(
        latent=jnp.asarray(initial),
        inducing=jnp.asarray(initial[rng.choice(args.points, args.inducing, replace=False)]),
        log_variance=jnp.array(0.0),
        log_lengthscale=jnp.zeros(2),
        log_sigma=jnp.array(np.log(0.3)),
    )
    print(
        f"data: {args.points} points, y of shape {tuple(y.shape)}, latent d = 2, m = {args.inducing} inducing inputs; "
        f"PCA start, layout error {procrustes_disparity(truth, initial):.4f}",
        flush=True,
    )
    solver = optax.adam(args.learning_rate)
    chunk = min(25, args.steps)

    @jax.jit
    def run_chunk(params, state):
        def step(carry, _):
            params, state = carry
            value, grad = jax.value_and_grad(objective)(params, y)
            updates, state = solver.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), value

        return jax.lax.scan(step, (params, state), length=chunk)

    state = solver.init(params)
    trace = []
    train_start = time.perf_counter()
    for done in range(0, args.steps, chunk):
        (params, state), values = run_chunk(params, state)
        trace.extend(np.asarray(values).tolist())
        print(
            f"iter {done + chunk:5d}  −bound/n {float(values[-1]):9.5f}  layout error "
            f"{procrustes_disparity(truth, params.latent):.4f}  ({time.perf_counter() - train_start:6.1f} s)",
            flush=True,
        )
    seconds = time.perf_counter() - train_start
    learned = np.asarray(params.latent)
    print(
        f"learned kernel: variance {float(jnp.exp(params.log_variance)):.3f}, lengthscales "
        f"{np.round(np.exp(np.asarray(params.log_lengthscale)), 3)}, noise {float(jnp.exp(params.log_sigma)):.4f} "
        f"(data noise 0.05); {seconds / args.steps * 1e3:.0f} ms per step"
    )
    if not args.no_plots:
        print(f"plot: {save_plot(args.out, truth, initial, learned, np.asarray(params.inducing), trace)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    before, after = procrustes_disparity(truth, initial), procrustes_disparity(truth, learned)
    print(f"layout error (Procrustes): {before:.4f} -> {after:.4f}")
    return before, after


def save_plot(out_dir, truth, initial, learned, inducing, trace, shown=6000):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    subset = np.random.default_rng(1).choice(len(truth), min(shown, len(truth)), replace=False)
    colour = truth[subset, 0] + 2 * truth[subset, 1]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.3))
    # the inducing inputs moved by the same similarity transform as the latent positions
    learned_aligned, inducing_aligned = aligned(truth, learned, also=inducing)
    panels = [
        ("hidden 2-D positions", truth),
        (f"PCA start, aligned (error {procrustes_disparity(truth, initial):.3f})", aligned(truth, initial)),
        (f"learned, aligned (error {procrustes_disparity(truth, learned):.3f})", learned_aligned),
    ]
    for ax, (title, points) in zip(axes, panels):
        ax.scatter(points[subset, 0], points[subset, 1], c=colour, cmap="viridis", s=2)
        ax.set_title(f"{title}\n({len(subset)} of {len(truth)} points shown)", fontsize=9)
        ax.set_aspect("equal")
    axes[2].scatter(inducing_aligned[:, 0], inducing_aligned[:, 1], marker="x", c="r", s=20, lw=1, label="inducing inputs")
    axes[2].legend(fontsize=8, loc="lower right")
    axes[3].plot(np.arange(1, len(trace) + 1), trace)
    axes[3].set(xlabel="iteration", ylabel="(− bound + prior) / n", title="objective (Adam)")
    fig.tight_layout()
    path = os.path.join(out_dir, "large_gplvm.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
