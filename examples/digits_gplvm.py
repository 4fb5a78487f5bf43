"""A GPLVM of the handwritten digits, by the exact likelihood and by the inducing-point bound.

scikit-learn's digits (1797 images of 8 × 8 pixels, shipped with the package: no download) are
1797 points in R⁶⁴. A GPLVM places each image at a latent position ``x_i ∈ R²`` (``d = 2``) so
that the 64 pixel intensities are smooth GP functions of it (``ExpSquared`` with ARD
lengthscales, shared by the 64 outputs, isotropic noise), starting from PCA. Two objectives:

* **exact**: ``gg.log_marginal_likelihood(..., solver="dense")`` — a 1797 × 1797 Cholesky per step;
* **bound**: ``gg.inducing_bound`` with ``m`` learned inducing inputs — O(n m²) per step.

Both learn the latent positions, the kernel and the noise (and the bound its inducing inputs)
with Adam, through the closed-form gradients. The layout is scored by how well a point's five
nearest latent neighbours predict its digit (leave-one-out 5-NN accuracy; the labels are not
used for fitting).

Run:  python examples/digits_gplvm.py [--steps 600] [--inducing 100] [--out DIR] [--quick]
The last line reads ``5-NN accuracy: PCA A -> exact B, bound (m = M) C``.
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
from gplvm import pca_start  # noqa: E402  (examples/gplvm.py)

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def load_digits(limit=None):
    """The images as ``(n, 64)`` intensities centred per pixel and scaled to unit overall
    variance, and their labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    y, labels = digits.data[:limit], digits.target[:limit]
    y = y - y.mean(0)
    return y / y.std(), labels


def knn_accuracy(points, labels, k=5):
    """Leave-one-out ``k``-nearest-neighbour accuracy of the labels in the latent space."""
    points = np.asarray(points)
    distances = np.sum((points[:, None, :] - points[None, :, :]) ** 2, axis=-1)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    votes = labels[neighbours]
    predicted = np.array([np.bincount(row, minlength=10).argmax() for row in votes])
    return float(np.mean(predicted == labels))


class Params(NamedTuple):
    latent: jax.Array  # (n, 2): the GP inputs being learned
    log_variance: jax.Array
    log_lengthscale: jax.Array  # (2,): ARD
    log_sigma: jax.Array
    inducing: jax.Array | None  # (m, 2) for the bound


def objective(params: Params, y, path: str):
    """− log p(y | x) (or its bound) + ½‖x‖²: the usual GPLVM with a N(0, I) prior on the latents."""
    kernel = kernels.ExpSquared(jnp.exp(params.log_variance), jnp.exp(params.log_lengthscale))
    nz = noise.Isotropic(jnp.exp(params.log_sigma))
    if path == "exact":
        fit = gg.log_marginal_likelihood(kernel, params.latent, y, nz, solver="dense")
    else:
        fit = gg.inducing_bound(kernel, params.latent, y, nz, params.inducing)
    return -fit + 0.5 * jnp.sum(params.latent**2)


def train(path, params, y, steps, learning_rate, labels, chunk):
    solver = optax.adam(learning_rate)

    @jax.jit
    def run_chunk(params, state):
        def step(carry, _):
            params, state = carry
            value, grad = jax.value_and_grad(objective)(params, y, path)
            updates, state = solver.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), value

        return jax.lax.scan(step, (params, state), length=chunk)

    state = solver.init(params)
    trace = []
    start = time.perf_counter()
    for done in range(0, steps, chunk):
        (params, state), values = run_chunk(params, state)
        trace.extend(np.asarray(values).tolist())
        print(
            f"{path:5s} iter {done + chunk:5d}  objective {float(values[-1]):12.2f}  "
            f"5-NN accuracy {knn_accuracy(params.latent, labels):.3f}  ({time.perf_counter() - start:6.1f} s)",
            flush=True,
        )
    return params, trace, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--inducing", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/digits_gplvm")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the first 400 images, 100 steps")
    args = parser.parse_args(argv)
    limit = None
    if args.quick:
        limit, args.steps, args.inducing = 400, 100, 32

    start = time.perf_counter()
    y, labels = load_digits(limit)
    y = jnp.asarray(y)
    n = y.shape[0]
    initial = pca_start(y)
    rng = np.random.default_rng(args.seed)
    inducing = initial[rng.choice(n, args.inducing, replace=False)]
    print(f"data: {n} digit images, y of shape {tuple(y.shape)}, latent d = 2; PCA start", flush=True)
    print(f"PCA layout: 5-NN accuracy {knn_accuracy(initial, labels):.3f}", flush=True)

    common = dict(
        latent=jnp.asarray(initial), log_variance=jnp.array(0.0), log_lengthscale=jnp.zeros(2), log_sigma=jnp.array(np.log(0.5))
    )
    chunk = min(50, args.steps)
    results = {}
    for path in ("exact", "bound"):
        params = Params(**common, inducing=jnp.asarray(inducing) if path == "bound" else None)
        learned, trace, seconds = train(path, params, y, args.steps, args.learning_rate, labels, chunk)
        results[path] = (learned, trace, seconds, knn_accuracy(learned.latent, labels))
        print(
            f"{path}: {seconds:.1f} s for {args.steps} steps ({seconds / args.steps * 1e3:.1f} ms/step); "
            f"noise {float(jnp.exp(learned.log_sigma)):.3f}, lengthscales {np.round(np.exp(np.asarray(learned.log_lengthscale)), 3)}",
            flush=True,
        )
    if not args.no_plots:
        print(f"plot: {save_plot(args.out, initial, labels, results, args.inducing)}")
    print(f"total time {time.perf_counter() - start:.1f} s")
    pca, exact, bound = knn_accuracy(initial, labels), results["exact"][3], results["bound"][3]
    print(f"5-NN accuracy: PCA {pca:.3f} -> exact {exact:.3f}, bound (m = {args.inducing}) {bound:.3f}")
    return pca, exact, bound


def save_plot(out_dir, initial, labels, results, m):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8), constrained_layout=True)
    panels = [("PCA start", initial, None, knn_accuracy(initial, labels))]
    panels += [
        (f"{name} ({seconds:.0f} s)", np.asarray(params.latent), params.inducing, accuracy)
        for name, (params, _, seconds, accuracy) in (("exact GPLVM", results["exact"]), (f"inducing bound, m = {m}", results["bound"]))
    ]
    for ax, (title, points, inducing, accuracy) in zip(axes, panels):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
        if inducing is not None:
            inducing = np.asarray(inducing)
            ax.scatter(inducing[:, 0], inducing[:, 1], marker="x", c="k", s=18, lw=0.8, label="inducing inputs")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{title}\n5-NN accuracy {accuracy:.3f}", fontsize=10)
        ax.set_aspect("equal")
    fig.colorbar(scatter, ax=axes[2], ticks=range(10), label="digit", shrink=0.9)
    for name, colour in (("exact", "C3"), ("bound", "C0")):
        trace = results[name][1]
        axes[3].plot(np.arange(1, len(trace) + 1), trace, color=colour, label=name)
    axes[3].set(xlabel="iteration", ylabel="objective", title="− log p (exact) or − bound, + prior")
    axes[3].legend()
    path = os.path.join(out_dir, "digits_gplvm.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
