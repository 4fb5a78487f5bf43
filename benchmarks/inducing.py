"""Benchmark of the inducing-point bound on a GPLVM-shaped problem: ``d = 2``, ``D = 10``,
``ExpSquared`` with ARD lengthscales, isotropic noise, ``m = 64`` and ``256`` inducing inputs.

    python benchmarks/inducing.py              # this machine: CPU, one thread, float64
    python benchmarks/inducing.py --quick      # small sizes, for a smoke test
    python benchmarks/inducing.py --max-n 100000

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``. Timed interleaved in one process
(``benchmarks/run.py``'s helpers), n = 10³ … 10⁶:

* ``value`` — ``gg.inducing_bound``;
* ``closed`` — its ``value_and_grad`` in (kernel, ``x``, ``Z``): the closed-form rule;
* ``autodiff`` — JAX's reverse mode through the same forward code (the baseline);
* ``dense_exact`` — ``value_and_grad`` in ``x`` of the exact density by the dense solver, where
  it fits (n ≤ 2000);
* ``GPy`` — ``GPy.models.SparseGPRegression`` (the same bound, VarDTC, NumPy) on the same problem:
  its ``log_likelihood`` and gradients in the kernel, ``Z`` (computed by GPy's
  ``parameters_changed``) and ``x`` (``kern.gradients_X`` of its ``dL_dKnm`` plus the diagonal
  term), up to n = 10⁵; values and gradients compared with ours.

Peak memory is XLA's temporary allocation of the compiled program
(``memory_analysis().temp_size_in_bytes``). Targets (issue 21): ``closed`` ≤ 2.5× ``value``,
linear in n, no slower and no hungrier than ``autodiff``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _compile, _measure, machine_info, parse_arguments, save_figure, save_report


def _options(parser):
    parser.add_argument("--max-n", type=int, default=1_000_000, help="largest n")


ARGS = parse_arguments(__doc__, "inducing_cpu", _options) if __name__ == "__main__" else None

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402

SIGMA = 0.3
LATENT, OBSERVED = 2, 10
LENGTHSCALES = (0.8, 1.3)


def problem(n, m, seed=0):
    """Latent points on a noisy 2-D sheet, observed through 10 smooth random features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, LATENT))
    weights = rng.normal(size=(LATENT, OBSERVED))
    y = np.sin(x @ weights) + SIGMA * rng.normal(size=(n, OBSERVED))
    z = x[rng.choice(n, m, replace=False)] + 0.05 * rng.normal(size=(m, LATENT))
    kernel = kernels.ExpSquared(1.0, jnp.asarray(LENGTHSCALES))
    return kernel, jnp.asarray(x), jnp.asarray(y), noise.Isotropic(SIGMA), jnp.asarray(z)


def value(kernel, x, y, nz, z):
    return gg.inducing_bound(kernel, x, y, nz, z)


def plain_value(kernel, x, y, nz, z):
    """The same forward code, no custom rule (what the closed form replaces)."""
    return gg.reference.plain_log_marginal_likelihood(kernel, x, y, nz, solver=gg.solvers.Inducing(z))


def dense_exact(kernel, x, y, nz, z):
    return gg.log_marginal_likelihood(kernel, x, y, nz, solver="dense")


GRAD_ARGS = (0, 1, 4)  # kernel, x, Z
MEMORY_LIMIT = 10 * 2**30  # series whose compiled program needs more temporary memory are skipped


def _gpy_runner(kernel, x, y, z):
    import GPy

    x_np, y_np, z_np = (np.asarray(a) for a in (x, y, z))
    gpy_kernel = GPy.kern.RBF(LATENT, variance=1.0, lengthscale=np.asarray(LENGTHSCALES), ARD=True)
    model = GPy.models.SparseGPRegression(x_np, y_np, kernel=gpy_kernel, Z=z_np.copy())
    model.likelihood.variance = SIGMA**2

    def run():
        model.set_XY(x_np, y_np)  # VarDTC inference and GPy's hand-derived gradients (kernel, Z)
        grads = model.grad_dict
        grad_x = model.kern.gradients_X(grads["dL_dKnm"], x_np, z_np) + model.kern.gradients_X_diag(grads["dL_dKdiag"], x_np)
        return model.log_likelihood(), grad_x, np.array(model.Z.gradient), np.array(model.kern.lengthscale.gradient)

    return run


def bench(n, m, repeats, peers):
    args = problem(n, m)
    functions = {
        "value": value,
        "closed": jax.value_and_grad(value, argnums=GRAD_ARGS),
        "autodiff": jax.value_and_grad(plain_value, argnums=GRAD_ARGS),
    }
    if n <= 2000:
        functions["dense_exact"] = jax.value_and_grad(dense_exact, argnums=1)
    runners, info, outputs, skipped = {}, {}, {}, {}
    for name, fn in functions.items():
        runner, compile_s, temp, output = _compile(fn, args, memory_limit=MEMORY_LIMIT)
        if runner is None:  # would not fit next to the others on this machine
            skipped[name] = f"needs {temp / 2**30:.1f} GiB of temporary memory"
            continue
        runners[name], outputs[name] = runner, output
        info[name] = {"compile_s": compile_s, "temp_bytes": temp}
    gpy = None
    if "GPy" in peers and n <= 100_000:
        gpy = _gpy_runner(args[0], args[1], args[2], args[4])
        runners["GPy"] = gpy
        info["GPy"] = {"compile_s": 0.0, "temp_bytes": None}
    rows = _measure(runners, repeats)
    for name in rows:
        rows[name].update(info[name])
    closed_value, (k_bar, x_bar, z_bar) = outputs["closed"]
    relative = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))  # noqa: E731
    checks = {}
    if "autodiff" in outputs:
        auto_value, (k_auto, x_auto, z_auto) = outputs["autodiff"]
        checks = {
            "value_vs_autodiff": abs(float(closed_value) - float(auto_value)) / abs(float(auto_value)),
            "grad_x_vs_autodiff": relative(x_bar, x_auto),
            "grad_z_vs_autodiff": relative(z_bar, z_auto),
            "grad_lengthscale_vs_autodiff": relative(k_bar.lengthscale, k_auto.lengthscale),
        }
    if "dense_exact" in outputs:
        checks["exact_minus_bound"] = float(outputs["dense_exact"][0]) - float(closed_value)
    if gpy is not None:
        gpy_value, gpy_x, gpy_z, gpy_lengthscale = gpy()
        gpy_value = float(np.squeeze(gpy_value))
        checks["value_vs_GPy"] = abs(float(closed_value) - gpy_value) / abs(gpy_value)
        checks["grad_x_vs_GPy"] = relative(x_bar, gpy_x)
        checks["grad_z_vs_GPy"] = relative(z_bar, gpy_z)
        checks["grad_lengthscale_vs_GPy"] = relative(k_bar.lengthscale, gpy_lengthscale)
    base = rows["value"]["median_s"]
    entry = {"n": n, "m": m, "series": rows, "ratio_to_value": {k: v["median_s"] / base for k, v in rows.items()}}
    if "autodiff" in rows:
        entry["speedup_closed_vs_autodiff"] = rows["autodiff"]["median_s"] / rows["closed"]["median_s"]
        entry["memory_closed_over_autodiff"] = rows["closed"]["temp_bytes"] / rows["autodiff"]["temp_bytes"]
    return {**entry, "skipped": skipped, "checks": checks}


def run(args):
    sizes = [1000, 4000] if args.quick else [n for n in (1000, 10_000, 100_000, 1_000_000) if n <= args.max_n]
    inducing = [16, 64] if args.quick else [64, 256]
    peers = [] if args.no_peers else [name for name in ("GPy",) if _importable(name)]
    report = {
        "machine": machine_info(args.label),
        "problem": f"GPLVM-shaped: d = {LATENT}, D = {OBSERVED}, ExpSquared ARD, isotropic noise",
        "rows": [],
    }
    for m in inducing:
        for n in sizes:
            repeats = 3 if args.quick or n >= 1_000_000 else (5 if n >= 100_000 else args.repeats)
            entry = bench(n, m, repeats, peers)
            report["rows"].append(entry)
            line = "  ".join(f"{k} {v['median_s'] * 1e3:9.2f} ms" for k, v in entry["series"].items())
            memory = entry.get("memory_closed_over_autodiff", float("nan"))
            print(
                f"m={m:4d} n={n:8d}  {line}  memory closed/autodiff {memory:.2f}  skipped {entry['skipped']}  "
                f"checks {entry['checks']}",
                flush=True,
            )
    rows = report["rows"]
    compared = [e for e in rows if "speedup_closed_vs_autodiff" in e]
    report["targets"] = {
        "closed_at_most_2.5x_value": all(e["ratio_to_value"]["closed"] <= 2.5 for e in rows),
        "closed_not_slower_than_autodiff": all(e["speedup_closed_vs_autodiff"] >= 1.0 for e in compared),
        "closed_not_hungrier_than_autodiff": all(e["memory_closed_over_autodiff"] <= 1.0 for e in compared),
    }
    print(f"targets {report['targets']}", flush=True)
    save_report(report, args, plot)
    return report


def _importable(name):
    try:
        __import__(name)
        return True
    except Exception:
        print(f"peer {name} not available; skipped", flush=True)
        return False


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_ratio, ax_memory) = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = {"value": "k", "closed": "C0", "autodiff": "C3", "dense_exact": "C2", "GPy": "C1"}
    styles = {}
    for e in report["rows"]:
        styles.setdefault(e["m"], "-" if not styles else "--")
    for m, style in styles.items():
        entries = [e for e in report["rows"] if e["m"] == m]
        ns = [e["n"] for e in entries]
        for name, colour in colours.items():
            points = [(e["n"], e["series"][name]["median_s"]) for e in entries if name in e["series"]]
            if points:
                ax_time.loglog(*zip(*points), style, marker="o", color=colour, label=f"{name}, m = {m}")
        ax_ratio.semilogx(ns, [e["ratio_to_value"]["closed"] for e in entries], style, marker="o", color="C0", label=f"closed / value, m = {m}")
        auto = [(e["n"], e["ratio_to_value"]["autodiff"]) for e in entries if "autodiff" in e["series"]]
        ax_ratio.semilogx(*zip(*auto), style, marker="o", color="C3", label=f"autodiff / value, m = {m}")
        for name, colour in (("closed", "C0"), ("autodiff", "C3")):
            points = [(e["n"], e["series"][name]["temp_bytes"] / 2**20) for e in entries if name in e["series"]]
            ax_memory.loglog(*zip(*points), style, marker="o", color=colour, label=f"{name}, m = {m}")
    ax_time.set(xlabel="n", ylabel="median time [s]", title=report["problem"])
    ax_ratio.axhline(2.5, color="grey", lw=0.8, ls=":")
    ax_ratio.set(xlabel="n", ylabel="time / value", title="value_and_grad in (kernel, x, Z) / value")
    ax_memory.set(xlabel="n", ylabel="XLA temporary memory [MiB]", title="peak temporary memory")
    for ax in (ax_time, ax_ratio, ax_memory):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
