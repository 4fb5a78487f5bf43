"""Benchmark: value alone, the closed-form value-and-gradient, plain autodiff, and peers.

    python benchmarks/run.py                 # full suite on this machine (CPU, one thread)
    python benchmarks/run.py --quick         # small sizes, for a smoke test
    python benchmarks/run.py --label h100    # any backend JAX sees (see benchmarks/gpu.sh)

Writes ``<out>/<label>.json`` and ``<out>/<label>.png`` (log-log time against n).

Series, all timed in this one process so their ratios are comparable:

* ``value``     — ``jit(precision_form_log_likelihood)``: build ``U``, one Cholesky, one solve
  (what the solvers compute; ``log_marginal_likelihood`` adds a noise-only term);
* ``closed``    — ``jit(value_and_grad(precision_form_log_likelihood, argnums=x))``, the custom VJP;
* ``autodiff``  — ``jit(value_and_grad(...))`` of the *same* forward code with JAX's own
  reverse mode (no custom rule): the baseline the closed form must beat;
* peers for the squared-exponential kernel with isotropic noise: ``tinygp`` (autodiff of
  its log probability in the inputs) and ``GPy`` (its hand-derived ``gradients_X`` after
  inference, NumPy/LAPACK), where installed.

Every series is compiled first (compile time reported separately), warmed up, then the
series of one row are run ``--repeats`` times *interleaved* (round-robin, so that drift in the
machine's speed hits them alike) with ``block_until_ready``; medians, min and max are reported, with XLA's
temporary memory (``compiled.memory_analysis().temp_size_in_bytes``) and the gradient's
agreement with autodiff.  The curve kernel uses indices of order 1–10 (``cond(U)`` grows like
``x³``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

THREAD_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


def parse_arguments(doc, default_label, add_arguments=None):
    """The options of the benchmark scripts (``add_arguments(parser)`` adds a script's own).
    Unless ``--all-threads``, pins the CPU threads to one — before JAX starts its backend,
    which is when it reads ``XLA_FLAGS``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--label", default=default_label, help="file name stem and device label")
    parser.add_argument("--all-threads", action="store_true", help="do not pin CPU threads to one")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    if not args.all_threads:
        for key, value in THREAD_ENV.items():
            os.environ.setdefault(key, value)
    return args


ARGS = parse_arguments(__doc__, "cpu") if __name__ == "__main__" else None

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def plain_autodiff_value(kernel, x, y, nz, solver="dense"):
    """The same forward computation as the library's value (``solver``), with no custom rule."""
    return gg.reference.plain_log_marginal_likelihood(kernel, x, y, nz, solver=solver)


def dense_value(kernel, x, y, nz):
    return gg.precision_form_log_likelihood(kernel, x, y, nz, solver="dense")


def curve_problem(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, 10.0, n))
    kernel = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)
    if dim == 1:
        y = np.sin(x) + 0.1 * rng.normal(size=n)
        blocks = rng.uniform(2.0, 10.0, n)
        blocks[rng.uniform(size=n) < 0.1] = 0.0  # unobserved points
    else:
        y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) + 0.1 * rng.normal(size=(n, 3))
        rays = rng.normal(size=(n, 3))
        rays /= np.linalg.norm(rays, axis=1, keepdims=True)
        blocks = (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / 0.1  # rank 2: one camera
    return kernel, jnp.asarray(x), jnp.asarray(y), noise.PerPoint(jnp.asarray(blocks))


def se_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, 10.0, n))
    y = np.sin(x) + 0.1 * rng.normal(size=n)
    return kernels.ExpSquared(1.0, 0.7), jnp.asarray(x), jnp.asarray(y), noise.Isotropic(0.3)


def _summary(samples):
    return {
        "median_s": float(np.median(samples)),
        "min_s": float(np.min(samples)),
        "max_s": float(np.max(samples)),
        "repeats": len(samples),
    }


def _compile(fn, args, memory_limit=None):
    """Compile ``fn`` for ``args``: (a zero-argument runner, compile seconds, temp bytes, output).
    A program whose temporary memory exceeds ``memory_limit`` bytes is not run: runner and output
    are then ``None``."""
    jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = int(memory.temp_size_in_bytes) if memory is not None else None
    if memory_limit is not None and temp is not None and temp > memory_limit:
        return None, compile_s, temp, None
    output = jax.block_until_ready(compiled(*args))  # also the warm-up
    return (lambda: jax.block_until_ready(compiled(*args))), compile_s, temp, output


def _measure(runners, repeats):
    """Time every runner ``repeats`` times, interleaved round-robin.

    Interleaving gives each series the same share of the machine's drift (this shared
    machine's speed wanders by ±10 % over minutes), so ratios within a row are fair.
    """
    samples = {name: [] for name in runners}
    for runner in runners.values():
        runner()  # warm up
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner()
            samples[name].append(time.perf_counter() - start)
    return {name: _summary(times) for name, times in samples.items()}


def _grad_x(fn):
    return jax.value_and_grad(fn, argnums=1)


def _bench(args, functions, repeats, extra_runners=None):
    runners, info, outputs = {}, {}, {}
    for name, fn in functions.items():
        runners[name], compile_s, temp, outputs[name] = _compile(fn, args)
        info[name] = {"compile_s": compile_s, "temp_bytes": temp}
    for name, runner in (extra_runners or {}).items():
        runners[name] = runner
        info[name] = {"compile_s": 0.0, "temp_bytes": None}
    rows = _measure(runners, repeats)
    for name in rows:
        rows[name].update(info[name])
    return rows, outputs


def _relative_difference(a, b, scale):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))) / scale)


# The dense solver's series (the Markov solver has benchmarks/markov.py).
DENSE_FUNCTIONS = {
    "value": dense_value,
    "closed": _grad_x(dense_value),
    "autodiff": _grad_x(plain_autodiff_value),
}


def bench_curve(n, dim, repeats):
    args = curve_problem(n, dim)
    rows, outputs = _bench(args, DENSE_FUNCTIONS, repeats)
    g_closed, g_auto = outputs["closed"][1], outputs["autodiff"][1]
    return rows, _relative_difference(g_closed, g_auto, float(jnp.max(jnp.abs(g_auto))))


def bench_se(n, repeats, peers):
    kernel, x, y, nz = se_problem(n)
    args = (kernel, x, y, nz)
    functions = dict(DENSE_FUNCTIONS)
    extra = {}
    if "tinygp" in peers:
        import tinygp

        peer_kernel = tinygp.kernels.ExpSquared(scale=0.7)

        def tinygp_lml(_kernel, x_, y_, _noise):  # the peer's own kernel and noise, same values
            return tinygp.GaussianProcess(peer_kernel, x_, diag=0.3**2).log_probability(y_)

        functions["tinygp"] = _grad_x(tinygp_lml)
    if "GPy" in peers:
        import GPy

        x_np, y_np = np.asarray(x)[:, None], np.asarray(y)[:, None]
        model = GPy.models.GPRegression(
            x_np, y_np, GPy.kern.RBF(1, variance=1.0, lengthscale=0.7), noise_var=0.3**2
        )

        def gpy_value_and_grad():
            model.set_XY(x_np, y_np)  # runs GPy's exact inference (Cholesky via LAPACK)
            return model.log_likelihood(), model.kern.gradients_X(model.grad_dict["dL_dK"], x_np)

        extra["GPy"] = gpy_value_and_grad
    rows, outputs = _bench(args, functions, repeats, extra)
    g_closed = outputs["closed"][1]
    scale = float(jnp.max(jnp.abs(g_closed)))
    agreement = {"autodiff": _relative_difference(g_closed, outputs["autodiff"][1], scale)}
    if "tinygp" in outputs:
        agreement["tinygp"] = _relative_difference(g_closed, outputs["tinygp"][1], scale)
    if "GPy" in extra:
        agreement["GPy"] = _relative_difference(g_closed, extra["GPy"]()[1][:, 0], scale)
    return rows, agreement


def _available_peers(skip):
    peers = []
    if skip:
        return peers
    # GPy is NumPy on the CPU: next to a GPU run its times would compare different machines.
    for name in ("tinygp", "GPy") if jax.default_backend() == "cpu" else ("tinygp",):
        try:
            __import__(name)
            peers.append(name)
        except Exception:
            print(f"peer {name} not available; skipped", flush=True)
    return peers


def machine_info(label):
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "label": label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "dtype": "float64",
        "threads": {key: os.environ.get(key) for key in THREAD_ENV},
    }


def run(args):
    if args.quick:
        sizes = {"curve_1d": [100, 200], "curve_3d": [50, 100], "se_1d": [100, 200]}
        repeats = min(args.repeats, 3)
    else:
        sizes = {
            "curve_1d": [250, 500, 1000, 1500, 2000],
            "curve_3d": [100, 250, 500, 1000],
            "se_1d": [250, 500, 1000, 2000],
        }
        repeats = args.repeats
    peers = _available_peers(args.no_peers)
    report = {"machine": machine_info(args.label), "results": []}
    print(json.dumps(report["machine"], indent=1), flush=True)
    for case, ns in sizes.items():
        for n in ns:
            if case == "se_1d":
                rows, agreement = bench_se(n, repeats, peers)
            else:
                rows, agreement = bench_curve(n, 1 if case == "curve_1d" else 3, repeats)
            base = rows["value"]["median_s"]
            entry = {
                "case": case,
                "n": n,
                "m": n * (3 if case == "curve_3d" else 1),
                "series": rows,
                "ratio_to_value": {k: v["median_s"] / base for k, v in rows.items()},
                "speedup_closed_vs_autodiff": rows["autodiff"]["median_s"] / rows["closed"]["median_s"],
                "memory_closed_over_autodiff": rows["closed"]["temp_bytes"] / rows["autodiff"]["temp_bytes"],
                "gradient_max_relative_difference": agreement,
            }
            report["results"].append(entry)
            ratios = "  ".join(f"{k} {v:5.2f}x" for k, v in entry["ratio_to_value"].items())
            print(
                f"{case:9s} n={n:5d}  value {base * 1e3:9.2f} ms  {ratios}  "
                f"memory closed/autodiff {entry['memory_closed_over_autodiff']:.2f}  "
                f"grad agreement {agreement}",
                flush=True,
            )
    save_report(report, args, plot)
    return report


def save_report(report, args, plot):
    """Write ``<out>/<label>.json`` and the plot ``plot(report, path)`` draws, ``<out>/<label>.png``."""
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{args.label}.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    png_path = plot(report, os.path.join(args.out, f"{args.label}.png"))
    print(f"wrote {json_path} and {png_path}")


def save_figure(fig, path):
    """Lay out ``fig``, write it to ``path`` as a PNG and close it: every benchmark's last step."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = ["curve_1d", "curve_3d", "se_1d"]
    titles = {
        "curve_1d": "curve kernel, 1-D data, PerPoint noise",
        "curve_3d": "curve kernel, 3-D data, rank-2 PerPoint noise",
        "se_1d": "squared exponential, 1-D, isotropic (peers)",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, case in zip(axes, cases):
        entries = [e for e in report["results"] if e["case"] == case]
        if not entries:
            continue
        for series in entries[0]["series"]:
            ns = [e["n"] for e in entries]
            ts = [e["series"][series]["median_s"] for e in entries]
            ax.loglog(ns, ts, "o-", label=series)
        ax.set_title(titles[case], fontsize=10)
        ax.set_xlabel("n (points)")
        ax.set_ylabel("median time [s]")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"gpgrad_jax — {machine['device']} ({machine['backend']}), {machine['cpu']}, float64", fontsize=10)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
