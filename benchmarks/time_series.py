"""Benchmark of the time-series kernels on the O(n) path: ``Matern32 * Cosine + Matern12``.

    python benchmarks/time_series.py              # this machine: CPU, one thread, float64
    python benchmarks/time_series.py --quick      # small sizes, for a smoke test

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``. 1-D data, isotropic noise, sorted
indices, n = 10³ … 10⁶, timed interleaved in one process (``benchmarks/run.py``'s helpers):

* ``value`` — ``gg.log_marginal_likelihood(…, solver="markov")``;
* ``closed`` — its ``value_and_grad`` in ``x``: the generic closed-form rule (a Kronecker block
  and a kinked Matérn 1/2 block, neither with a slope identity);
* ``value_jax``, ``closed_jax`` — the same with ``gg.solvers.Markov(native=False)``: the JAX
  scans instead of the native passes (C++ custom calls) of the covariance form;
* ``autodiff`` — JAX's reverse mode through the same filter (the baseline the rule replaces);
* ``tinygp_value``, ``tinygp_autodiff`` — tinygp's quasiseparable solver on the same kernel
  (``Matern32 * Cosine + 0.3 * Exp``), its value and its ``value_and_grad`` in ``x`` by autodiff
  (up to n = 10⁵; the value also at 10⁶);
* ``celerite2_value``, ``celerite2_vg`` — celerite2's C++ semiseparable solver (``celerite2.jax``,
  CPU only) on the same kernel, its value and its jitted ``value_and_grad`` in ``x`` (JAX's reverse
  mode through celerite2's hand-written reverse ops), the value up to n = 10⁶, ``celerite2_vg`` up
  to 10⁵. The kernel is exact: ``celerite2_matern32`` (below) writes Matérn 3/2 as a rank-2
  celerite term, ``e^{-w(tᵢ-tⱼ)}[(1 + w tᵢ)·1 − w·tⱼ]``, in place of celerite2's
  ``Matern32Term``, a limit in its ``eps``; times ``ComplexTerm(a=1, b=0, c=0, d=2π)`` (the
  cosine) plus ``RealTerm(a=0.3, c=2)`` (the Matérn 1/2): J = 5 columns.
  Caveat: celerite2 0.3.3's gradient is wrong for J > 4 — in the dynamic-size branch of its XLA
  ops (``UNWRAP_CASES_FEW``'s default) the work array ``S`` of shape (N, J²) is mapped with
  ``SIZE * SIZE`` = (−1)² = 1 column, so ``factor``'s reverse pass reads garbage where it uses
  ``S`` (the cotangents of ``t``, ``c`` and ``U``); values are right. ``celerite2_vg`` then times
  celerite2's cost with a wrong output: ``checks["gradient_vs_celerite2"]`` shows it, and the
  report's ``celerite2_gradient_valid`` is false (its gradient agrees with ours to ~1e-13 on
  ``Matern32 * Cosine`` alone, J = 4).

Targets (issue 20): ``closed`` ≥ 10× faster than ``tinygp_autodiff`` at n = 10⁵, and
``closed`` ≤ 3× ``value``. Reported, no target: ``closed_over_celerite2_vg`` per row.
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


@functools.cache
def _celerite2_matern32_class():
    from celerite2.jax import terms

    class ExactMatern32(terms.Term):
        """``σ² (1 + wτ) e^{-wτ}``, ``w = √3/ρ``, exactly: for ``tᵢ ≥ tⱼ`` it is
        ``e^{-w(tᵢ-tⱼ)} σ² [(1 + w tᵢ)·1 + (−w)·tⱼ]``, semiseparable of rank 2 (celerite2's own
        ``Matern32Term`` is a limit, ``ComplexTerm(σ², σ²w/ε, w, ε)`` as ε → 0)."""

        def __init__(self, *, sigma, rho):
            self.sigma = jnp.float64(sigma)
            self.w = jnp.sqrt(3.0) / jnp.float64(rho)

        def get_value(self, tau):
            tau = jnp.abs(jnp.atleast_1d(tau))
            return self.sigma**2 * (1.0 + self.w * tau) * jnp.exp(-self.w * tau)

        def get_celerite_matrices(self, x, diag, **kwargs):
            x, diag = jnp.atleast_1d(x), jnp.atleast_1d(diag)
            s2, w, ones = self.sigma**2, self.w, jnp.ones_like(x)
            U = jnp.stack([s2 * (1.0 + w * x), -s2 * w * ones], axis=1)
            V = jnp.stack([ones, x], axis=1)
            return jnp.stack([w, w]), diag + s2, U, V

    return ExactMatern32


def celerite2_matern32(sigma, rho):
    """Matérn 3/2 (standard deviation ``sigma``, length scale ``rho``) as an exact celerite2 term."""
    return _celerite2_matern32_class()(sigma=sigma, rho=rho)


def _celerite2_value(_kernel, x, y, _noise):  # the peer's own kernel, same values
    import celerite2.jax
    from celerite2.jax import terms

    kernel = celerite2_matern32(1.0, 3.0) * terms.ComplexTerm(a=1.0, b=0.0, c=0.0, d=2 * np.pi) + terms.RealTerm(
        a=0.3, c=1 / 0.5
    )
    return celerite2.jax.GaussianProcess(kernel, x, diag=jnp.full_like(x, SIGMA**2)).log_likelihood(y)


def bench(n, repeats, peers):
    args = problem(n)
    markov = functools.partial(gg.log_marginal_likelihood, solver="markov")
    scans = functools.partial(gg.log_marginal_likelihood, solver=gg.solvers.Markov(native=False))
    functions = {
        "value": markov,
        "closed": jax.value_and_grad(markov, argnums=1),
        # The same solver with the JAX scans instead of the native passes (the reference; GPU path).
        "value_jax": scans,
        "closed_jax": jax.value_and_grad(scans, argnums=1),
        "autodiff": jax.value_and_grad(functools.partial(plain_autodiff_value, solver="markov"), argnums=1),
    }
    if "tinygp" in peers:
        functions["tinygp_value"] = _tinygp_value
        if n <= 100_000:
            functions["tinygp_autodiff"] = jax.value_and_grad(_tinygp_value, argnums=1)
    if "celerite2" in peers:
        functions["celerite2_value"] = _celerite2_value
        if n <= 100_000:
            functions["celerite2_vg"] = jax.value_and_grad(_celerite2_value, argnums=1)
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
    if "tinygp" in peers:
        checks["value_vs_tinygp"] = abs(float(outputs["value"]) - float(outputs["tinygp_value"])) / abs(
            float(outputs["tinygp_value"])
        )
        if "tinygp_autodiff" in outputs:
            checks["gradient_vs_tinygp"] = relative(outputs["tinygp_autodiff"][1], closed)
    if "celerite2" in peers:
        checks["value_vs_celerite2"] = abs(float(outputs["value"]) - float(outputs["celerite2_value"])) / abs(
            float(outputs["celerite2_value"])
        )
        if "celerite2_vg" in outputs:
            checks["gradient_vs_celerite2"] = relative(outputs["celerite2_vg"][1], closed)
    base = rows["value"]["median_s"]
    entry = {
        "n": n,
        "series": rows,
        "ratio_to_value": {k: v["median_s"] / base for k, v in rows.items()},
        "speedup_closed_vs_autodiff": rows["autodiff"]["median_s"] / rows["closed"]["median_s"],
        "checks": checks,
    }
    if "celerite2_vg" in rows:
        entry["closed_over_celerite2_vg"] = rows["closed"]["median_s"] / rows["celerite2_vg"]["median_s"]
    return entry


def run(args):
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000, 1_000_000]
    repeats = lambda n: 3 if args.quick or n >= 1_000_000 else (5 if n >= 100_000 else args.repeats)  # noqa: E731
    peers = [] if args.no_peers else [p for p in ("tinygp", "celerite2") if _importable(p)]
    if "celerite2" in peers and jax.default_backend() != "cpu":
        print("peer celerite2 runs on the CPU only; skipped", flush=True)
        peers.remove("celerite2")
    report = {"machine": machine_info(args.label), "kernel": "Matern32 * Cosine + Matern12", "rows": []}
    for n in sizes:
        entry = bench(n, repeats(n), peers)
        report["rows"].append(entry)
        line = "  ".join(f"{k} {v['median_s'] * 1e3:9.2f} ms" for k, v in entry["series"].items())
        if "closed_over_celerite2_vg" in entry:
            line += f"  closed/celerite2_vg {entry['closed_over_celerite2_vg']:.3f}"
        print(f"n={n:8d}  {line}  checks {entry['checks']}", flush=True)
    by_n = {e["n"]: e for e in report["rows"]}
    targets = {"closed_at_most_3x_value": all(e["ratio_to_value"]["closed"] <= 3.0 for e in report["rows"])}
    if "celerite2" in peers:
        report["closed_over_celerite2_vg"] = {
            str(e["n"]): e["closed_over_celerite2_vg"] for e in report["rows"] if "closed_over_celerite2_vg" in e
        }
        # celerite2 0.3.3's reverse pass is wrong for J > 4 (see the module docstring).
        gradient_checks = [
            e["checks"]["gradient_vs_celerite2"] for e in report["rows"] if "gradient_vs_celerite2" in e["checks"]
        ]
        report["celerite2_gradient_valid"] = all(c <= 1e-6 for c in gradient_checks)
        if not report["celerite2_gradient_valid"]:
            print("celerite2_vg: celerite2's gradient disagrees with ours (its J > 4 bug); timed only", flush=True)
    if "tinygp" in peers and 100_000 in by_n:
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
        ("closed_jax", "s:"),
        ("autodiff", "x--"),
        ("tinygp_value", "^-"),
        ("tinygp_autodiff", "v--"),
        ("celerite2_value", "D-"),
        ("celerite2_vg", "d--"),
    ):
        points = [(e["n"], e["series"][name]["median_s"]) for e in rows if name in e["series"]]
        if points:
            ns, ts = zip(*points)
            left.loglog(ns, ts, style, label=_label(report, name))
    ns = np.array([e["n"] for e in rows], float)
    left.loglog(ns, rows[0]["series"]["closed"]["median_s"] * ns / ns[0], "k:", alpha=0.5, label="∝ n")
    left.set_xlabel("n (points)")
    left.set_ylabel("median time [s]")
    left.set_title(f"{report['kernel']}, 1-D, isotropic noise: value_and_grad in x", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    names = ["closed", "autodiff", "tinygp_autodiff", "celerite2_value", "celerite2_vg"]
    for name in names:
        points = [(e["n"], e["ratio_to_value"][name]) for e in rows if name in e["ratio_to_value"]]
        if points:
            ns_, ratios = zip(*points)
            right.semilogx(ns_, ratios, "o-", label=f"{_label(report, name)} / value")
    right.axhline(3.0, color="k", ls=":", alpha=0.5, label="target: closed ≤ 3× value")
    right.set_xlabel("n (points)")
    right.set_ylabel("time / our value's time")
    right.set_title("cost relative to one value", fontsize=10)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    return save_figure(fig, path)


def _label(report, name):
    if name == "celerite2_vg" and report.get("celerite2_gradient_valid") is False:
        return "celerite2_vg (gradient wrong: J > 4 bug)"
    return name


if __name__ == "__main__":
    run(ARGS)
