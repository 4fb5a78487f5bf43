"""Float32 accuracy of the solvers: the state-space solvers' covariance and square-root forms, and
the dense solver against its condition estimate.

    python benchmarks/float32.py                  # this machine, one thread (about 25 minutes)
    python benchmarks/float32.py --quick          # small sizes, for a smoke test
    python benchmarks/float32.py --only dense     # the dense solver's section (about 15 minutes)

Writes ``<out>/float32_cpu.json`` and ``<out>/float32_cpu.png`` (a section alone:
``float32_<section>_cpu.*``). Every state-space problem is built from float32-representable
numbers and solved three times: in float32 by the covariance form (the filter and smoother up to
0.3), in float32 by the square-root form (the default for float32 since 0.4), and in float64 by
the square-root form — the reference, equal to the dense solver to 1e-9
(``tests/test_markov.py``). For each: the value's relative error, the gradient's in ``x``
(relative norm, and the worst element over the largest), and the rounding estimate
``eps · max spread`` on which the ``ConditioningWarning`` fires (above its level in
``gg.solvers.rounding_estimate``). The targets: gradient ≤ 1e-3, worst element ≤ 1e-2, value ≤ 1e-4.

Series:

* ``span``: the 3-D curve seen along one random camera ray per point (curve kernel, rank-2
  ``PerPoint`` blocks ``(I − rrᵀ)/0.01``), n = 2000 over spans 5 … 2000; a helix seen by 36
  cameras, 40 points, spans 3 … 1000 — the problems of issue 18.
* ``size``: the camera curve at 100 points per unit of index, n = 500 … 10⁵.
* ``estimate``: a random family (camera curves, helices, Matérn 3/2 and 5/2 with isotropic or
  rank-deficient noise; sizes, spans and noise scales drawn at random): how well the estimate
  predicts the error, and how often the warning fires without need.
* ``parallel``: ``"markov-parallel"`` on the n = 2000, span 20 problem (its associative scans
  compile for ~25 s per form on XLA:CPU).
* ``dense``: random problems for the dense solver (curve, Matérn 1/2 and 3/2, squared-exponential
  kernels; 20–200 points, D = 1 or 3, isotropic or rank-2 noise; spans 1–300, noise 0.003–0.3):
  the gradient's and the precision form's errors in float32 against ``eps · cond(U)``, the
  estimate its ``ConditioningWarning`` fires on (``gg.solvers.rounding_estimate(..., solver="dense")``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import machine_info, parse_arguments, save_figure, save_report  # imports JAX in float64


def _only(parser):
    parser.add_argument("--only", choices=["state-space", "dense"], help="run one section")


ARGS = parse_arguments(__doc__, "float32_cpu", _only) if __name__ == "__main__" else None
if ARGS is not None and ARGS.only is not None and ARGS.label == "float32_cpu":
    ARGS.label = f"float32_{ARGS.only.replace('-', '_')}_cpu"  # a section alone: its own files

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402


def _warning_level(solver):
    """The level above which ``solver`` warns in float32 (``gg.solvers.rounding_estimate``'s second part)."""
    x = jnp.linspace(0.0, 1.0, 4, dtype=jnp.float32)
    return float(gg.solvers.rounding_estimate(kernels.CubicSpline(1.0), x, x, noise.Isotropic(1.0), solver=solver)[1])


PRECISION_WARNING_LEVEL = _warning_level(gg.solvers.Markov(form="square-root"))
DENSE_WARNING_LEVEL = _warning_level("dense")

TARGETS = {"gradient": 1e-3, "worst": 1e-2, "value": 1e-4}
CURVE = kernels.CubicSpline(1.0) + kernels.Linear(1.0) + kernels.Constant(1.0)


def _rays(rng, n):
    rays = rng.normal(size=(n, 3))
    return rays / np.linalg.norm(rays, axis=1, keepdims=True)


def _projections(rays, sigma):
    return (np.eye(3) - rays[:, :, None] * rays[:, None, :]) / sigma


def camera_curve(n, span, sigma=0.01, seed=0):
    """A helix-like 3-D curve; each point seen along one random ray (rank-2 blocks)."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1) + sigma * rng.normal(size=(n, 3))
    return CURVE, x, y, _projections(_rays(rng, n), sigma)


def helix_cameras(n, span, sigma=0.01, seed=0, cameras=36):
    """A helix seen by a ring of cameras, one ray per point towards a random camera."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    curve = np.stack([np.cos(x), np.sin(x), 0.3 * x], axis=1)
    angles = np.linspace(0.0, 2 * np.pi, cameras, endpoint=False)
    centres = np.stack([5 * np.cos(angles), 5 * np.sin(angles), np.zeros(cameras)], axis=1)
    rays = curve - centres[rng.integers(0, cameras, n)]
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    return CURVE, x, curve + sigma * rng.normal(size=(n, 3)), _projections(rays, sigma)


def matern_series(n, span, smoothness, isotropic, sigma=0.01, seed=0):
    """A 3-D Matérn path, isotropic noise or one ray per point."""
    rng = np.random.default_rng(seed)
    x = np.sort(rng.uniform(0.0, span, n))
    y = np.stack([np.cos(x), np.sin(x), 0.3 * np.sin(0.5 * x)], axis=1) + sigma * rng.normal(size=(n, 3))
    kernel = (kernels.Matern52 if smoothness == 52 else kernels.Matern32)(1.0, 1.0)
    blocks = np.broadcast_to(np.eye(3) / sigma, (n, 3, 3)).copy() if isotropic else _projections(_rays(rng, n), sigma)
    return kernel, x, y, blocks


def _as(dtype, kernel, x, y, blocks):
    cast = lambda a: jnp.asarray(np.asarray(a, np.float32), dtype)  # noqa: E731  float32-representable
    return jax.tree_util.tree_map(cast, kernel), cast(x), cast(y), noise.PerPoint(cast(blocks))


@functools.cache
def _programs(parallel, square_root):
    solver = gg.solvers.Markov(form="square-root" if square_root else "covariance", parallel=parallel)
    estimator = gg.solvers.Markov(form="square-root", parallel=parallel)

    def value(kernel, x, y, nz):
        return gg.precision_form_log_likelihood(kernel, x, y, nz, solver=solver)

    def estimate(kernel, x, y, nz):  # eps · max spread, as the warning computes it
        return gg.solvers.rounding_estimate(kernel, x, y, nz, solver=estimator)[0]

    return jax.jit(jax.value_and_grad(value, argnums=1)), jax.jit(estimate)


def _errors(approximate, reference):
    (v, g), (v_ref, g_ref) = approximate, reference
    v, g = float(v), np.asarray(g, np.float64)
    v_ref, g_ref = float(v_ref), np.asarray(g_ref, np.float64)
    if not (np.isfinite(v) and np.all(np.isfinite(g))):
        return {"value": float("inf"), "gradient": float("inf"), "worst": float("inf"), "finite": False}
    return {
        "value": abs(v - v_ref) / abs(v_ref),
        "gradient": float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)),
        "worst": float(np.max(np.abs(g - g_ref)) / np.max(np.abs(g_ref))),
        "finite": True,
    }


def _meets(errors):
    return all(errors[k] <= bound for k, bound in TARGETS.items())


def evaluate(problem, parallel=False):
    """Errors of both float32 forms against the float64 square-root form, and the estimate."""
    vg_sqrt, estimate = _programs(parallel, True)
    vg_cov, _ = _programs(parallel, False)
    single, double = _as(jnp.float32, *problem), _as(jnp.float64, *problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.ConditioningWarning)
        reference = jax.block_until_ready(vg_sqrt(*double))
        row = {
            "square_root": _errors(vg_sqrt(*single), reference),
            "covariance": _errors(vg_cov(*single), reference),
            "estimate": float(estimate(*single)),
        }
    row["warned"] = row["estimate"] > PRECISION_WARNING_LEVEL
    row["square_root"]["meets_targets"] = _meets(row["square_root"])
    row["covariance"]["meets_targets"] = _meets(row["covariance"])
    return row


def _line(name, row):
    s, c = row["square_root"], row["covariance"]
    return (
        f"{name:34s} square root: grad {s['gradient']:.1e} worst {s['worst']:.1e} value {s['value']:.1e}"
        f" | covariance: grad {c['gradient']:.1e} worst {c['worst']:.1e}"
        f" | estimate {row['estimate']:.1e}{' (warns)' if row['warned'] else ''}"
    )


def dense_problem(rng):
    """A random problem for the dense solver: ``(description, kernel, x, y, noise)``."""
    kind = str(rng.choice(["curve", "matern12", "matern32", "exp_squared"]))
    n, dim = int(rng.choice([20, 50, 100, 200])), int(rng.choice([1, 3]))
    span, sigma = float(10 ** rng.uniform(0.0, 2.5)), float(10 ** rng.uniform(-2.5, -0.5))
    x = np.sort(rng.uniform(0.0, span, n))
    if kind == "curve":
        kernel = CURVE
        y = np.stack([np.cos(x), np.sin(x), 0.3 * x][:dim], axis=1)
    else:
        lengthscale = span / rng.uniform(2.0, 20.0)
        kernel = {"matern12": kernels.Matern12, "matern32": kernels.Matern32, "exp_squared": kernels.ExpSquared}[kind](1.0, lengthscale)
        y = np.stack([np.sin(3 * x / lengthscale), np.cos(2 * x / lengthscale), np.sin(x / lengthscale)][:dim], axis=1)
    y = y + sigma * rng.normal(size=y.shape)
    isotropic = dim == 1 or bool(rng.integers(2))
    blocks = np.broadcast_to(np.eye(dim) / sigma, (n, dim, dim)).copy() if isotropic else _projections(_rays(rng, n), sigma)
    return dict(family=kind, n=n, dim=dim, span=span, sigma=sigma, isotropic=isotropic), (kernel, x, y, blocks)


@functools.cache
def _dense_programs():
    def value(kernel, x, y, nz):  # the precision form: its noise term's rank is not in question
        return gg.precision_form_log_likelihood(kernel, x, y, nz, solver="dense")

    def estimate(kernel, x, y, nz):  # eps · cond(U), as the warning computes it
        return gg.solvers.rounding_estimate(kernel, x, y, nz, solver="dense")[0]

    return jax.jit(jax.value_and_grad(value, argnums=1)), jax.jit(estimate)


def evaluate_dense(problem):
    value_and_grad, estimate = _dense_programs()
    single, double = _as(jnp.float32, *problem), _as(jnp.float64, *problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gg.ConditioningWarning)
        errors = _errors(value_and_grad(*single), value_and_grad(*double))
        row = {"dense": errors, "estimate": float(estimate(*single))}
    row["warned"] = row["estimate"] > DENSE_WARNING_LEVEL
    row["dense"]["meets_targets"] = _meets(errors)
    return row


def run_dense(report, quick):
    rng = np.random.default_rng(11)
    report["dense"] = []
    for _ in range(12 if quick else 120):
        description, problem = dense_problem(rng)
        row = dict(description, **evaluate_dense(problem))
        report["dense"].append(row)
        e = row["dense"]
        print(
            f"dense {row['family']:11s} n={row['n']:4d} D={row['dim']} span {row['span']:7.1f} σ={row['sigma']:.4f}: "
            f"grad {e['gradient']:.1e} worst {e['worst']:.1e} value {e['value']:.1e} | estimate {row['estimate']:.1e}"
            f"{' (warns)' if row['warned'] else ''}",
            flush=True,
        )
    rows = report["dense"]
    finite = [r for r in rows if r["dense"]["finite"]]
    missed = [r for r in finite if not r["dense"]["meets_targets"]]
    report["dense_summary"] = {
        "warning_level": DENSE_WARNING_LEVEL,
        "problems": len(rows),
        "not_finite_in_float32": len(rows) - len(finite),
        "missing_targets": len(missed),
        "missed_and_warned": sum(r["warned"] for r in missed),
        "warned_without_need": sum(r["warned"] and r["dense"]["meets_targets"] for r in finite),
        "error_over_estimate": [
            min(r["dense"]["gradient"] / r["estimate"] for r in finite),
            max(r["dense"]["gradient"] / r["estimate"] for r in finite),
        ],
        "smallest_estimate_of_a_miss": min([r["estimate"] for r in missed] or [float("inf")]),
        "largest_unwarned_gradient_error": max([r["dense"]["gradient"] for r in finite if not r["warned"]] or [0.0]),
    }
    print(f"dense {json.dumps(report['dense_summary'])}", flush=True)


def run(args):
    quick = args.quick
    report = {"machine": dict(machine_info(args.label), dtype="float32 against float64"), "targets": TARGETS}
    report["warning_level"] = PRECISION_WARNING_LEVEL
    print(json.dumps(report["machine"], indent=1), flush=True)
    if args.only == "dense":
        run_dense(report, quick)
        save_report(report, args, plot)
        return report

    camera_n = 200 if quick else 2000
    spans = {
        f"camera n={camera_n}": [(s, camera_curve(camera_n, s)) for s in ([20, 200] if quick else [5, 20, 50, 200, 500, 2000])],
        "helix n=40": [(s, helix_cameras(40, s)) for s in ([3, 30] if quick else [3, 10, 30, 100, 300, 1000])],
    }
    report["span"] = {}
    for family, cases in spans.items():
        report["span"][family] = []
        for span, problem in cases:
            row = dict(span=span, **evaluate(problem))
            report["span"][family].append(row)
            print(_line(f"{family} span {span}", row), flush=True)
    report["issue_20000"] = []
    for span in [] if quick else [200, 2000]:
        row = dict(n=20_000, span=span, **evaluate(camera_curve(20_000, span)))
        report["issue_20000"].append(row)
        print(_line(f"camera n=20000 span {span}", row), flush=True)

    report["size"] = []
    for n in [500, 2000] if quick else [500, 2000, 5000, 20_000, 100_000]:
        row = dict(n=n, span=n / 100, **evaluate(camera_curve(n, n / 100)))
        report["size"].append(row)
        print(_line(f"camera n={n} span {n / 100:g}", row), flush=True)

    rng = np.random.default_rng(7)
    report["estimate"] = []
    for index in range(12 if quick else 120):
        family = ["camera", "helix", "matern"][index % 3]
        sigma = float(rng.choice([0.001, 0.003, 0.01, 0.03, 0.1, 0.3]))
        seed = int(rng.integers(1 << 30))
        span = float(rng.choice([1, 3, 10, 30, 100, 300, 1000, 3000]))
        if family == "camera":
            n = int(rng.choice([100, 300, 1000]))
            problem = camera_curve(n, span, sigma, seed)
        elif family == "helix":
            n = int(rng.choice([20, 40, 80]))
            problem = helix_cameras(n, span, sigma, seed)
        else:
            n, smoothness, isotropic = int(rng.choice([200, 1000])), int(rng.choice([32, 52])), bool(rng.integers(2))
            family = f"matern{smoothness}{'-isotropic' if isotropic else '-rays'}"
            problem = matern_series(n, span, smoothness, isotropic, sigma, seed)
        row = dict(family=family, n=n, span=span, sigma=sigma, **evaluate(problem))
        report["estimate"].append(row)
        print(_line(f"{family} n={n} span {span:g} σ={sigma:g}", row), flush=True)
    rows = report["estimate"]
    missed = [r for r in rows if not r["square_root"]["meets_targets"]]
    report["estimate_summary"] = {
        "problems": len(rows),
        "square_root_missing_targets": len(missed),
        "missed_and_warned": sum(r["warned"] for r in missed),
        "warned_without_need": sum(r["warned"] and r["square_root"]["meets_targets"] for r in rows),
        "covariance_missing_targets": sum(not r["covariance"]["meets_targets"] for r in rows),
        "error_over_estimate": [
            min(r["square_root"]["gradient"] / r["estimate"] for r in rows),
            max(r["square_root"]["gradient"] / r["estimate"] for r in rows),
        ],
        "largest_unwarned_gradient_error": max([r["square_root"]["gradient"] for r in rows if not r["warned"]] or [0.0]),
    }
    print(f"estimate {json.dumps(report['estimate_summary'])}", flush=True)

    report["parallel"] = []
    if not quick:
        row = dict(n=2000, span=20, **evaluate(camera_curve(2000, 20.0), parallel=True))
        report["parallel"].append(row)
        print(_line("markov-parallel camera n=2000 span 20", row), flush=True)

    issue_rows = [r for family in report["span"].values() for r in family if r["span"] <= 300]
    issue_rows += [r for r in report["issue_20000"] if r["span"] <= 200] + report["parallel"]
    report["target_checks"] = {
        "square_root_meets_targets_on_issue_problems": all(r["square_root"]["meets_targets"] for r in issue_rows),
        "every_miss_is_warned": all(r["warned"] for r in missed),
    }
    print(f"targets {json.dumps(report['target_checks'])}", flush=True)
    if args.only is None:
        run_dense(report, quick)
    save_report(report, args, plot)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state_space = "span" in report
    panels = (3 if state_space else 0) + ("dense" in report)
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    floor = 1e-8  # exact agreement drawn at the bottom of the log axis
    clip = lambda v: min(max(v, floor), 1e2)  # noqa: E731  NaN gradients (inf) drawn at the top
    if state_space:
        span_ax, size_ax, estimate_ax = axes[:3]
        for (family, rows), colour in zip(report["span"].items(), ("C0", "C3")):
            spans = [r["span"] for r in rows]
            for form, style in (("square_root", "o-"), ("covariance", "x--")):
                span_ax.loglog(spans, [clip(r[form]["gradient"]) for r in rows], style, color=colour, label=f"{family}, {form.replace('_', ' ')}")
        span_ax.set_xlabel("span of x")
        span_ax.set_title("gradient error against span (NaN drawn at 100)", fontsize=10)
        rows = report["size"]
        ns = [r["n"] for r in rows]
        for form, style in (("square_root", "o-"), ("covariance", "x--")):
            size_ax.loglog(ns, [clip(r[form]["gradient"]) for r in rows], style, label=f"{form.replace('_', ' ')}: gradient")
            size_ax.loglog(ns, [clip(r[form]["value"]) for r in rows], style, alpha=0.4, label=f"{form.replace('_', ' ')}: value")
        size_ax.set_xlabel("n (camera curve, 100 points per unit of x)")
        size_ax.set_title("error against n", fontsize=10)
        rows = report["estimate"]
        families = sorted({r["family"] for r in rows})
        for family, marker in zip(families, "osD^v<>"):
            chosen = [r for r in rows if r["family"] == family]
            estimate_ax.loglog([r["estimate"] for r in chosen], [clip(r["square_root"]["gradient"]) for r in chosen], marker, alpha=0.7, label=family)
        estimate_ax.axvline(report["warning_level"], color="k", ls=":", label="warning level")
        estimate_ax.set_xlabel("estimate eps · max spread")
        estimate_ax.set_title("square-root form: error against its estimate", fontsize=10)
    if "dense" in report:
        dense_ax = axes[-1]
        rows = [r for r in report["dense"] if r["dense"]["finite"]]
        for family, marker in zip(sorted({r["family"] for r in rows}), "osD^v<>"):
            chosen = [r for r in rows if r["family"] == family]
            dense_ax.loglog([r["estimate"] for r in chosen], [clip(r["dense"]["gradient"]) for r in chosen], marker, alpha=0.7, label=family)
        dense_ax.axvline(report["dense_summary"]["warning_level"], color="k", ls=":", label="warning level")
        dense_ax.set_xlabel("estimate eps · cond(U)")
        dense_ax.set_title("dense solver: gradient error against its estimate", fontsize=10)
    for ax in axes:
        ax.axhline(report["targets"]["gradient"], color="grey", ls="-.", lw=1, label="target (gradient)")
        ax.set_ylabel("relative error (float32 vs float64)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gpgrad_jax in float32 — {report['machine']['cpu']}", fontsize=10)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
