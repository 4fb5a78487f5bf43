"""Benchmark of the native passes against the JAX scans, both forms, both precisions.

    python benchmarks/native.py              # this machine: CPU, one thread, n = 10⁴ and 10⁵
    python benchmarks/native.py --quick      # n = 2000, for a smoke test

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``. The 3-D camera-ray curve of ``run.py``
(curve kernel, rank-2 ``PerPoint`` blocks: 6 states, 3 observation rows), ``value`` and
``value_and_grad`` in ``x`` (``vg``), timed interleaved in one process: float64 in the covariance
and the square-root form, float32 in the square-root form (its default), each with the native
passes (``gg.solvers.Markov(form=..., native=True)``) and with the JAX scans
(``native=False``). Reported: native over scans per series, and float32's square-root ``vg``
over float64's covariance ``vg`` (issue 28's target: ≤ 1.5×).
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _compile, _measure, curve_problem, machine_info, parse_arguments, save_figure, save_report

ARGS = parse_arguments(__doc__, "native_cpu") if __name__ == "__main__" else None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gpgrad_jax as gg  # noqa: E402

CASES = (("float64", "covariance"), ("float64", "square-root"), ("float32", "square-root"))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def bench(n, repeats):
    problem = curve_problem(n, 3)
    runners, names = {}, []
    for dtype, form in CASES:
        args = _cast(problem, jnp.dtype(dtype))
        for native in (True, False):
            solver = gg.solvers.Markov(form=form, native=native)

            def value(kernel, x, y, nz, solver=solver):
                return gg.log_marginal_likelihood(kernel, x, y, nz, solver=solver)

            for kind, fn in (("value", value), ("vg", jax.value_and_grad(value, argnums=1))):
                name = f"{dtype} {form} {'native' if native else 'scans'} {kind}"
                runners[name] = _compile(fn, args)[0]
                names.append(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.ConditioningWarning)
        rows = _measure(runners, repeats)
    ms = {name: rows[name]["median_s"] * 1e3 for name in names}
    speedups = {
        f"{dtype} {form} {kind}": ms[f"{dtype} {form} scans {kind}"] / ms[f"{dtype} {form} native {kind}"]
        for dtype, form in CASES
        for kind in ("value", "vg")
    }
    float32_over_float64 = ms["float32 square-root native vg"] / ms["float64 covariance native vg"]
    return {"n": n, "series": rows, "native_speedup": speedups, "float32_vg_over_float64_vg": float32_over_float64}


def run(args):
    sizes = [2000] if args.quick else [10_000, 100_000]
    report = {"machine": machine_info(args.label), "problem": "3-D camera-ray curve", "rows": []}
    for n in sizes:
        entry = bench(n, 3 if args.quick else 7)
        report["rows"].append(entry)
        for name, row in entry["series"].items():
            print(f"n={n:7d}  {name:40s} {row['median_s'] * 1e3:9.2f} ms", flush=True)
        print(f"n={n:7d}  native speed-up {entry['native_speedup']}", flush=True)
        print(f"n={n:7d}  float32 vg / float64 vg {entry['float32_vg_over_float64_vg']:.2f}", flush=True)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entry = report["rows"][-1]
    labels = [f"{dtype}\n{form}" for dtype, form in CASES]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("value", "vg")):
        at = np.arange(len(CASES))
        for offset, how in ((-0.2, "native"), (0.2, "scans")):
            heights = [entry["series"][f"{d} {f} {how} {kind}"]["median_s"] * 1e3 for d, f in CASES]
            ax.bar(at + offset, heights, width=0.4, label="native passes" if how == "native" else "JAX scans")
        ax.set_xticks(at, labels)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{'value' if kind == 'value' else 'value_and_grad in x'}, n = {entry['n']:,}", fontsize=10)
        ax.legend()
    fig.suptitle(f"3-D camera-ray curve, one thread ({report['machine'].get('label', '')})", fontsize=10)
    return save_figure(fig, path)


if __name__ == "__main__":
    save_report(run(ARGS), ARGS, plot)
