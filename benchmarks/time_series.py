"""Benchmark of the time-series kernels on the O(n) path: ``Matern32 * Cosine + Matern12``.

    python benchmarks/time_series.py              # this machine: CPU, one thread, float64
    python benchmarks/time_series.py --quick      # small sizes, for a smoke test

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``. 1-D data, isotropic noise, sorted
indices, n = 10³ … 10⁶, timed interleaved in one process (``benchmarks/run.py``'s helpers):

* ``value`` — ``gg.log_marginal_likelihood(…, solver="markov")``;
* ``closed`` — its ``value_and_grad`` in ``x``: the generic closed-form rule (a Kronecker block
  and a kinked Matérn 1/2 block, neither with a slope identity);
* ``autodiff`` — JAX's reverse mode through the same filter (the baseline the rule replaces);
* ``tinygp_value``, ``tinygp_autodiff`` — tinygp's quasiseparable solver on the same kernel
  (``Matern32 * Cosine + 0.3 * Exp``), its value and its ``value_and_grad`` in ``x`` by autodiff
  (up to n = 10⁵; the value also at 10⁶).

Targets (issue 20): ``closed`` ≥ 10× faster than ``tinygp_autodiff`` at n = 10⁵, and
``closed`` ≤ 3× ``value``.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _compile, _measure, machine_info, parse_arguments, plain_autodiff_value, save_figure, save_report

ARGS = parse_arguments(__doc__, "time_series_cpu") if __name__ == "__main__" else None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402

SIGMA = 0.3


def problem(n, seed=0):
    """A quasi-periodic series with rough excursions on ``[0, n/10]`` (10 points per period)."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, n / 10.0, n))
    y = np.sin(2 * np.pi * x) * np.exp(-0.01 * x) + 0.3 * rng.normal(size=n)
    kernel = kernels.Matern32(1.0, 3.0) * kernels.Cosine(1.0, 1.0) + kernels.Matern12(0.3, 0.5)
    return kernel, jnp.asarray(x), jnp.asarray(y), noise.Isotropic(SIGMA)


def _tinygp_value(_kernel, x, y, _noise):  # the peer's own kernel, same values
    import tinygp
    from tinygp.kernels import quasisep

    kernel = quasisep.Matern32(scale=3.0) * quasisep.Cosine(scale=1.0) + 0.3 * quasisep.Exp(scale=0.5)
    return tinygp.GaussianProcess(kernel, x, diag=SIGMA**2).log_probability(y)


def bench(n, repeats, peers):
    args = problem(n)
    markov = functools.partial(gg.log_marginal_likelihood, solver="markov")
    functions = {
        "value": markov,
        "closed": jax.value_and_grad(markov, argnums=1),
        "autodiff": jax.value_and_grad(functools.partial(plain_autodiff_value, solver="markov"), argnums=1),
    }
    if peers:
        functions["tinygp_value"] = _tinygp_value
        if n <= 100_000:
            functions["tinygp_autodiff"] = jax.value_and_grad(_tinygp_value, argnums=1)
    runners, info, outputs = {}, {}, {}
    for name, fn in functions.items():
        runners[name], compile_s, temp, outputs[name] = _compile(fn, args)
        info[name] = {"compile_s": compile_s, "temp_bytes": temp}
    rows = _measure(runners, repeats)
    for name in rows:
        rows[name].update(info[name])
    closed = np.asarray(outputs["closed"][1])
    relative = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))  # noqa: E731
    checks = {"gradient_vs_autodiff": relative(outputs["autodiff"][1], closed)}
    if peers:
        checks["value_vs_tinygp"] = abs(float(outputs["value"]) - float(outputs["tinygp_value"])) / abs(
            float(outputs["tinygp_value"])
        )
        if "tinygp_autodiff" in outputs:
            checks["gradient_vs_tinygp"] = relative(outputs["tinygp_autodiff"][1], closed)
    base = rows["value"]["median_s"]
    return {
        "n": n,
        "series": rows,
        "ratio_to_value": {k: v["median_s"] / base for k, v in rows.items()},
        "speedup_closed_vs_autodiff": rows["autodiff"]["median_s"] / rows["closed"]["median_s"],
        "checks": checks,
    }


def run(args):
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000]
    repeats = lambda n: 3 if args.quick or n >= 1_000_000 else (5 if n >= 100_000 else args.repeats)  # noqa: E731
    peers = not args.no_peers and _importable("tinygp")
    report = {"machine": machine_info(args.label), "kernel": "Matern32 * Cosine + Matern12", "rows": []}
    for n in sizes:
        entry = bench(n, repeats(n), peers)
        report["rows"].append(entry)
        line = "  ".join(f"{k} {v['median_s'] * 1e3:9.2f} ms" for k, v in entry["series"].items())
        print(f"n={n:8d}  {line}  checks {entry['checks']}", flush=True)
    by_n = {e["n"]: e for e in report["rows"]}
    targets = {"closed_at_most_3x_value": all(e["ratio_to_value"]["closed"] <= 3.0 for e in report["rows"])}
    if peers and 100_000 in by_n:
        row = by_n[100_000]["series"]
        report["speedup_closed_vs_tinygp_autodiff_at_1e5"] = row["tinygp_autodiff"]["median_s"] / row["closed"]["median_s"]
        targets["closed_at_least_10x_faster_than_tinygp_autodiff_at_1e5"] = report["speedup_closed_vs_tinygp_autodiff_at_1e5"] >= 10.0
    report["targets"] = targets
    print(f"targets {targets}", flush=True)
    save_report(report, args, plot)
    return report


def _importable(name):
    import importlib.util

    if importlib.util.find_spec(name) is None:
        print(f"peer {name} not available; skipped", flush=True)
        return False
    return True


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    rows = report["rows"]
    for name, style in (
        ("value", "o-"),
        ("closed", "s-"),
        ("autodiff", "x--"),
        ("tinygp_value", "^-"),
        ("tinygp_autodiff", "v--"),
    ):
        points = [(e["n"], e["series"][name]["median_s"]) for e in rows if name in e["series"]]
        if points:
            ns, ts = zip(*points)
            left.loglog(ns, ts, style, label=name)
    ns = np.array([e["n"] for e in rows], float)
    left.loglog(ns, rows[0]["series"]["closed"]["median_s"] * ns / ns[0], "k:", alpha=0.5, label="∝ n")
    left.set_xlabel("n (points)")
    left.set_ylabel("median time [s]")
    left.set_title(f"{report['kernel']}, 1-D, isotropic noise: value_and_grad in x", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    names = ["closed", "autodiff", "tinygp_autodiff"]
    for name in names:
        points = [(e["n"], e["ratio_to_value"][name]) for e in rows if name in e["ratio_to_value"]]
        if points:
            ns_, ratios = zip(*points)
            right.semilogx(ns_, ratios, "o-", label=f"{name} / value")
    right.axhline(3.0, color="k", ls=":", alpha=0.5, label="target: closed ≤ 3× value")
    right.set_xlabel("n (points)")
    right.set_ylabel("time / our value's time")
    right.set_title("cost relative to one value", fontsize=10)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
