"""GPLVM-style latent positions: recover a 2-D layout from 12-D observations.

Each of ``n`` observations ``y_i ∈ R^12`` is a smooth nonlinear function of a
hidden 2-D position ``t_i``.  Treating the positions as GP *inputs*
``x_i ∈ R^2`` (``d = 2``) with an ``ExpSquared`` kernel shared by the 12 output
coordinates, the positions are found by maximising the marginal likelihood from
a PCA start — the closed-form index gradient at ``d > 1``:
``∇L_{i,c} = Σ_j (z_i·z_j − M_ij) ∂k(x_i, x_j)/∂x_{i,c}``.  Kernel variance,
lengthscale and noise are learned jointly (log-parameterised).

A GPLVM layout is identifiable only up to rotation, reflection, translation and
scale, so the layout error is the Procrustes disparity to the truth (0 = same
shape, 1 = unrelated).

Run:  python examples/gplvm.py [--out DIR] [--quick]
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

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def make_data(seed: int, n: int, outputs: int = 12, noise_std: float = 0.05):
    """Hidden 2-D positions and smooth 12-D observations of them."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(-1.0, 1.0, size=(n, 2))
    # A random two-layer smooth map R² → R¹²: curved, not linear, so PCA is not enough.
    w1, b1 = rng.normal(size=(2, 8)) * 3.0, rng.uniform(-1, 1, 8)
    w2 = rng.normal(size=(8, outputs))
    y = np.tanh(t @ w1 + b1) @ w2
    y = (y - y.mean(0)) / y.std(0)
    return t, y + noise_std * rng.normal(size=y.shape)


def procrustes_disparity(a, b):
    """1 − (best similarity-transform fit of ``b`` to ``a``)² after centring and unit scaling."""
    a = np.asarray(a) - np.mean(a, 0)
    b = np.asarray(b) - np.mean(b, 0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    singular_values = np.linalg.svd(a.T @ b, compute_uv=False)
    return float(1.0 - singular_values.sum() ** 2)


def aligned(reference, b, also=None):
    """``b`` moved onto ``reference`` by the best rotation/reflection, translation and scale;
    with ``also`` (points in ``b``'s frame, e.g. inducing inputs), ``(b, also)`` both moved."""
    ref_mean, b_mean = np.mean(reference, 0), np.mean(b, 0)
    a0, b0 = np.asarray(reference) - ref_mean, np.asarray(b) - b_mean
    u, s, vt = np.linalg.svd(b0.T @ a0)
    rotation = u @ vt
    scale = s.sum() / np.sum(b0**2)
    move = lambda points: scale * (np.asarray(points) - b_mean) @ rotation + ref_mean  # noqa: E731
    return move(b) if also is None else (move(b), move(also))


def pca_start(y, dims=2):
    """The usual GPLVM start: the leading principal components of ``y``, scaled to unit variance."""
    y = np.asarray(y)
    centred = y - y.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    initial = centred @ vt[:dims].T
    return initial / initial.std(0)


class Params(NamedTuple):
    latent: jax.Array  # (n, 2) latent positions: the GP inputs being optimised
    log_variance: jax.Array
    log_lengthscale: jax.Array
    log_sigma: jax.Array


def negative_lml(params: Params, y):
    kernel = kernels.ExpSquared(jnp.exp(params.log_variance), jnp.exp(params.log_lengthscale))
    nz = noise.Isotropic(jnp.exp(params.log_sigma))
    # The noise is learned too: log_marginal_likelihood is the Gaussian log density, safe for it.
    log_likelihood = gg.log_marginal_likelihood(kernel, params.latent, y, nz)
    # A weak N(0, I) prior on the latent positions fixes their scale, as in the usual GPLVM.
    return -log_likelihood + 0.5 * jnp.sum(params.latent**2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=150)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/gplvm")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.steps = 120, 600

    start = time.perf_counter()
    truth, y = make_data(args.seed, args.points)
    y = jnp.asarray(y)
    initial = pca_start(y)
    params = Params(jnp.asarray(initial), jnp.array(0.0), jnp.array(0.0), jnp.array(np.log(0.3)))
    print(f"data: {args.points} points, y of shape {tuple(y.shape)}, latent d = 2; PCA start", flush=True)

    solver = optax.adam(0.02)
    chunk = 100

    @jax.jit
    def run_chunk(params, state):
        def step(carry, _):
            params, state = carry
            value, grad = jax.value_and_grad(negative_lml)(params, y)
            updates, state = solver.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), (value, optax.global_norm(grad))

        return jax.lax.scan(step, (params, state), length=chunk)

    state = solver.init(params)
    trace = []
    for done in range(0, args.steps, chunk):
        (params, state), (values, grad_norms) = run_chunk(params, state)
        trace.extend(np.asarray(values).tolist())
        print(
            f"iter {done + chunk:5d}  objective {float(values[-1]):12.4f}  |grad| {float(grad_norms[-1]):9.3e}  "
            f"layout error {procrustes_disparity(truth, params.latent):.4f}",
            flush=True,
        )
    learned = np.asarray(params.latent)
    print(
        f"learned kernel: variance {float(jnp.exp(params.log_variance)):.3f}, lengthscale "
        f"{float(jnp.exp(params.log_lengthscale)):.3f}, noise {float(jnp.exp(params.log_sigma)):.3f}"
    )
    if not args.no_plots:
        print(f"plot: {save_plot(args.out, truth, initial, learned, trace)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    before, after = procrustes_disparity(truth, initial), procrustes_disparity(truth, learned)
    print(f"layout error (Procrustes): {before:.4f} -> {after:.4f}")
    return before, after


def save_plot(out_dir, truth, initial, learned, trace):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    colour = truth[:, 0] + 2 * truth[:, 1]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.9))
    panels = [
        ("hidden 2-D positions", truth),
        (f"PCA start, aligned (error {procrustes_disparity(truth, initial):.3f})", aligned(truth, initial)),
        (f"learned, aligned (error {procrustes_disparity(truth, learned):.3f})", aligned(truth, learned)),
    ]
    for ax, (title, points) in zip(axes, panels):
        ax.scatter(points[:, 0], points[:, 1], c=colour, cmap="viridis", s=12)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    axes[3].plot(np.arange(1, len(trace) + 1), trace)
    axes[3].set_xlabel("iteration")
    axes[3].set_ylabel("− log p(y) + prior")
    axes[3].set_title("objective (Adam)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "gplvm.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
