"""Recover the positions of points along a 3-D curve seen by calibrated cameras.

The scene: a smooth 3-D curve (a plant-stem-like helix), ``n`` points on it,
each seen by *one* of several pinhole cameras.  A 2-D observation back-projects
to a viewing ray, so each point's 3-D noise precision has rank 2 — nothing is
known along the ray — which is exactly ``noise.PerPoint`` with rank-deficient
blocks ``B_i = (I − d_i d_iᵀ)/σ_i``.

The unknowns are the indices ``x_i`` (arc-length positions).  They start as a
crude guess (even spacing over a length twice the truth) and are recovered by
maximising the GP marginal likelihood under the curve prior
``CubicSpline + Linear + Constant``: first a jit-compiled Adam loop, then
``optax.lbfgs`` with its zoom line search driven by ``value_and_grad``.  The
indices stay ordered and non-negative through ``x = cumsum(softplus(θ))``.

The kernel variances are first calibrated by maximum likelihood on a
*training* curve of the same family with known indices; ``--learn-kernel``
also learns the Linear and Constant variances jointly with the indices (the
cubic-spline variance fixes the unit of the index and cannot be learned
jointly: rescaling ``x`` and the variances together leaves ``L`` unchanged).

Run:  python examples/camera_rays.py [--out DIR] [--quick] [--learn-kernel]
The last line reads ``index error: BEFORE -> AFTER`` (RMS, arc-length units).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # the curve kernel grows like x³: use float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402

# ----------------------------------------------------------------- the scene


class Scene(NamedTuple):
    arc_length: np.ndarray  # (n,) true index of each point
    points: np.ndarray  # (n, 3) true 3-D points
    observed: np.ndarray  # (n, 3) a point on each observed ray (depth arbitrary)
    rays: np.ndarray  # (n, 3) observed unit ray directions
    blocks: np.ndarray  # (n, 3, 3) rank-2 precision square roots
    cameras: np.ndarray  # (c, 3) camera centres
    camera_of_point: np.ndarray  # (n,)
    dense_curve: np.ndarray  # (k, 3) the true curve, finely sampled
    dense_arc: np.ndarray  # (k,) its arc length


def make_scene(seed: int, n: int, angular_noise: float = 0.003) -> Scene:
    """A random helix-like curve, points on it, and one-camera observations of each."""
    rng = np.random.default_rng(seed)
    radius, turns, height = rng.uniform(0.8, 1.2), rng.uniform(2.5, 3.5), rng.uniform(1.5, 2.5)
    phase, wobble = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4)

    def curve(t):
        angle = turns * t + phase
        return np.stack(
            [radius * np.cos(angle), radius * np.sin(angle), height * t + wobble * np.sin(5 * t)], -1
        )

    t_dense = np.linspace(0.0, 1.0, 4001)
    dense = curve(t_dense)
    arc_dense = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    t = np.sort(rng.uniform(0.0, 1.0, n))
    start = 0.2  # the first point is a little way along the curve
    arc = np.interp(t, t_dense, arc_dense) + start
    points = curve(t)

    cameras = np.array([[4.0, 0.0, 1.0], [-2.0, 3.5, 1.0], [-2.0, -3.5, 1.5], [0.0, 0.5, 6.0]])
    which = rng.integers(0, len(cameras), n)
    offsets = points - cameras[which]
    depth = np.linalg.norm(offsets, axis=1)
    rays = offsets / depth[:, None] + angular_noise * rng.normal(size=(n, 3))
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    sigma = angular_noise * depth  # position noise across the ray, in world units
    blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / sigma[:, None, None]
    observed = cameras[which] + rays * depth.mean()  # any depth along the ray will do
    return Scene(arc, points, observed, rays, blocks, cameras, which, dense, arc_dense + start)


# ------------------------------------------------------------- the model


def curve_kernel(log_variances):
    variances = jnp.exp(log_variances)
    return (
        kernels.CubicSpline(variances[0])
        + kernels.Linear(variances[1])
        + kernels.Constant(variances[2])
    )


def indices_from(theta):
    """Ordered, non-negative indices: ``x = cumsum(softplus(θ))``."""
    return jnp.cumsum(jax.nn.softplus(theta))


def theta_from(indices):
    steps = np.diff(np.concatenate([[0.0], np.asarray(indices)]))
    return jnp.asarray(np.log(np.expm1(np.maximum(steps, 1e-9))))


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def calibrate_kernel(scene: Scene, steps: int) -> jax.Array:
    """ML kernel variances on a curve whose indices are known (L-BFGS on log-variances)."""
    x = jnp.asarray(scene.arc_length)
    y, nz = jnp.asarray(scene.observed), noise.PerPoint(jnp.asarray(scene.blocks))

    def objective(log_variances):
        return -gg.log_marginal_likelihood(curve_kernel(log_variances), x, y, nz)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def run(log_variances):
        def step(carry, _):
            params, state = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = solver.update(
                grad, state, params, value=value, grad=grad, value_fn=objective
            )
            return (optax.apply_updates(params, updates), state), value

        (params, _), _ = jax.lax.scan(step, (log_variances, solver.init(log_variances)), length=steps)
        return params

    return run(jnp.zeros(3))


class Params(NamedTuple):
    theta: jax.Array  # index reparameterisation
    # log-variances of the Linear and Constant parts (learned only with --learn-kernel).  The
    # cubic-spline variance stays fixed: it sets the unit of the index, since x → a·x with
    # σ²_cubic → σ²_cubic/a³ and σ²_linear → σ²_linear/a² leaves K, hence L, unchanged.
    log_variances_linear_constant: jax.Array


def make_objective(scene: Scene, learn_kernel: bool, calibrated):
    y, nz = jnp.asarray(scene.observed), noise.PerPoint(jnp.asarray(scene.blocks))

    def objective(params: Params):
        return -gg.log_marginal_likelihood(
            curve_kernel(kernel_log_variances(params, learn_kernel, calibrated)),
            indices_from(params.theta),
            y,
            nz,
        )

    return objective


def kernel_log_variances(params: Params, learn_kernel: bool, calibrated):
    if not learn_kernel:
        return calibrated
    return jnp.concatenate([calibrated[:1], params.log_variances_linear_constant])


def optimise(objective, params, solver, steps, chunk, label, truth, uses_line_search, log):
    """Run ``steps`` solver steps as jit-compiled chunks of ``lax.scan``, logging each chunk."""
    value_and_grad = (
        optax.value_and_grad_from_state(objective) if uses_line_search else jax.value_and_grad(objective)
    )

    @jax.jit
    def run_chunk(params, state):
        def step(carry, _):
            params, state = carry
            if uses_line_search:
                value, grad = value_and_grad(params, state=state)
                updates, state = solver.update(
                    grad, state, params, value=value, grad=grad, value_fn=objective
                )
            else:
                value, grad = value_and_grad(params)
                updates, state = solver.update(grad, state, params)
            grad_norm = optax.global_norm(grad)
            return (optax.apply_updates(params, updates), state), (value, grad_norm)

        (params, state), trace = jax.lax.scan(step, (params, state), length=chunk)
        return params, state, trace

    state = solver.init(params)
    values = []
    for done in range(0, steps, chunk):
        params, state, (chunk_values, grad_norms) = run_chunk(params, state)
        values.extend(np.asarray(chunk_values).tolist())
        error = rms(indices_from(params.theta), truth)
        log(
            f"{label:>6} iter {done + chunk:5d}  -log L {float(chunk_values[-1]):12.4f}  "
            f"|grad| {float(grad_norms[-1]):10.3e}  index RMS error {error:.4f}"
        )
    return params, values


# ------------------------------------------------------------------ pictures


def save_plots(out_dir, scene, x_before, x_after, kernel, trace, adam_steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    y, nz = jnp.asarray(scene.observed), noise.PerPoint(jnp.asarray(scene.blocks))
    grid = jnp.linspace(float(x_after.min()), float(x_after.max()), 300)
    mean_curve, _ = gg.predict(kernel, jnp.asarray(x_after), y, nz, grid)
    recon_points, _ = gg.predict(kernel, jnp.asarray(x_after), y, nz, jnp.asarray(x_after))

    fig = plt.figure(figsize=(13, 4.6))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    ax.plot(*scene.dense_curve.T, color="0.5", lw=5, alpha=0.5, label="true curve")
    for camera, point in zip(scene.cameras[scene.camera_of_point], scene.points):
        ax.plot(*np.stack([camera, camera + 1.15 * (point - camera)]).T, color="tab:orange", lw=0.3, alpha=0.5)
    ax.scatter(*scene.cameras.T, color="k", marker="^", s=40, label="cameras")
    ax.plot(*np.asarray(mean_curve).T, color="tab:blue", lw=1.5, label="posterior mean")
    ax.scatter(*np.asarray(recon_points).T, color="tab:blue", s=6)
    low, high = scene.dense_curve.min(axis=0) - 0.5, scene.dense_curve.max(axis=0) + 0.5
    ax.set_xlim(low[0], high[0]), ax.set_ylim(low[1], high[1]), ax.set_zlim(low[2], high[2])
    ax.set_title("curve, viewing rays, reconstruction")
    ax.legend(loc="upper left", fontsize=7)

    ax = fig.add_subplot(1, 3, 2)
    trace = np.asarray(trace)
    ax.plot(np.arange(1, len(trace) + 1), trace - trace.min() + 1e-3, color="tab:blue")
    ax.axvline(adam_steps, color="0.5", ls="--", lw=1)
    ax.set_yscale("log")
    ax.text(adam_steps, ax.get_ylim()[1], " L-BFGS", va="top", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"− log L − min   (min = {trace.min():.2f})")
    ax.set_title("objective (Adam, then L-BFGS)")

    ax = fig.add_subplot(1, 3, 3)
    ax.plot(scene.arc_length, x_before, ".", color="0.6", label=f"initial (RMS {rms(x_before, scene.arc_length):.3f})")
    ax.plot(scene.arc_length, x_after, ".", color="tab:blue", label=f"recovered (RMS {rms(x_after, scene.arc_length):.3f})")
    lim = [0, max(float(np.max(x_before)), float(np.max(scene.arc_length)))]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("true arc length")
    ax.set_ylabel("index")
    ax.set_title("indices")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "camera_rays.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=80, help="points on the curve")
    parser.add_argument("--adam-steps", type=int, default=400)
    parser.add_argument("--lbfgs-steps", type=int, default=150)
    parser.add_argument(
        "--learn-kernel",
        action="store_true",
        help="learn the Linear and Constant variances jointly with the indices",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/camera_rays", help="folder for the PNG plot")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small and short (for CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.adam_steps, args.lbfgs_steps = 40, 200, 50

    def log(message):
        print(message, flush=True)

    start = time.perf_counter()
    scene = make_scene(args.seed, args.points)
    training = make_scene(args.seed + 1000, args.points)
    log_variances = calibrate_kernel(training, steps=60)
    log(
        f"scene: {args.points} points, true curve length {scene.dense_arc[-1] - scene.dense_arc[0]:.3f}, "
        f"{len(scene.cameras)} cameras, one ray per point (rank-2 noise)"
    )
    log(f"kernel variances calibrated on a training curve: {np.round(np.exp(np.asarray(log_variances)), 4)}")

    # A crude guess: even spacing over twice the true total length.
    x_before = np.linspace(0.0, 2.0 * scene.arc_length[-1], args.points)
    log(f"initial indices: even spacing, index RMS error {rms(x_before, scene.arc_length):.4f}")

    params = Params(theta_from(x_before), log_variances[1:])
    objective = make_objective(scene, args.learn_kernel, log_variances)
    chunk = 25
    params, adam_trace = optimise(
        objective, params, optax.adam(0.05), args.adam_steps, chunk, "adam", scene.arc_length, False, log
    )
    params, lbfgs_trace = optimise(
        objective, params, optax.lbfgs(), args.lbfgs_steps, chunk, "lbfgs", scene.arc_length, True, log
    )
    x_after = np.asarray(indices_from(params.theta))
    kernel = curve_kernel(kernel_log_variances(params, args.learn_kernel, log_variances))
    if args.learn_kernel:
        learned = kernel_log_variances(params, True, log_variances)
        log(f"kernel variances after joint learning: {np.round(np.exp(np.asarray(learned)), 4)}")

    if not args.no_plots:
        path = save_plots(args.out, scene, x_before, x_after, kernel, adam_trace + lbfgs_trace, args.adam_steps)
        log(f"plot: {path}")
    log(f"total time {time.perf_counter() - start:.1f} s")
    before, after = rms(x_before, scene.arc_length), rms(x_after, scene.arc_length)
    log(f"index error: {before:.4f} -> {after:.4f}")
    return before, after


if __name__ == "__main__":
    main(sys.argv[1:])
