"""Weak scaling of a sharded batch of curves: the per-device batch fixed, the devices 1, 2, 4, ….

    python benchmarks/sharding.py --host-devices 2          # CPU: two forced host devices
    python benchmarks/sharding.py --label sharding_gpu      # every GPU of the machine

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``.  For each device count ``d`` (powers
of two up to the machine's devices) a batch of ``d × per-device`` independent 3-D camera-ray
curves (``run.py``'s problem, a different seed per curve) is sharded along its batch axis
(``NamedSharding(Mesh(devices, ("batch",)), P("batch"))``) and one ``jax.jit(jax.vmap(
jax.value_and_grad(...)))`` in the indices is timed — ``closed`` (the library's rule) and
``autodiff`` (JAX's reverse mode through the same forward code) — for the Markov solver
(``--points``, default 1000) and the dense one (60 points; not on forced host devices, where
XLA:CPU deadlocks in repeated batched triangular solves).  Reported: medians, the weak-scaling
efficiency ``t(1 device) / t(d devices)`` (1 is ideal), the collectives in the compiled program
(none expected: the curves are independent) and the largest difference from the single-device
run.

On a CPU the threads are pinned (unless ``--all-threads``), so each forced host device computes
on one core: 1 → 2 devices on a 2-core machine is then a fair weak-scaling figure for the cores,
though not for separate accelerators with their own memory; on several GPUs it is the real one.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import (
    _compile,
    _measure,
    curve_problem,
    machine_info,
    parse_arguments,
    plain_autodiff_value,
    save_figure,
    save_report,
)


def _arguments(parser):
    parser.add_argument("--host-devices", type=int, default=0, help="force this many CPU devices")
    parser.add_argument("--per-device", type=int, default=16, help="curves per device")
    parser.add_argument("--points", type=int, default=1000, help="points per curve (Markov series)")


ARGS = parse_arguments(__doc__, "sharding_cpu", _arguments) if __name__ == "__main__" else None
if ARGS is not None and ARGS.host_devices:
    # Read when JAX starts its backend (in run(); importing starts none).  The device count goes
    # first: XLA stops reading flags at a word without "--", such as intra_op_parallelism_threads=1.
    # With the threads pinned (parse_arguments, unless --all-threads) each device gets one core.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={ARGS.host_devices} {os.environ.get('XLA_FLAGS', '')}"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gpgrad_jax as gg  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def batch(size, n):
    """``size`` curves of ``n`` points, stacked: a shared kernel, per-curve x, y and noise."""
    problems = [curve_problem(n, 3, seed=seed) for seed in range(size)]
    kernel = problems[0][0]
    stacked = [jax.tree_util.tree_map(lambda *a: np.stack(a), *parts) for parts in zip(*(p[1:] for p in problems))]
    return kernel, *stacked


def _vmapped(value_fn):
    grad = jax.value_and_grad(value_fn, argnums=1)
    return jax.vmap(grad, in_axes=(None, 0, 0, 0))


def bench(devices, per_device, n, solver, repeats):
    kernel, x, y, nz = batch(devices * per_device, n)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:devices]), ("batch",)), P("batch"))
    args = (kernel, *jax.device_put((x, y, nz), sharding))
    functions = {
        "closed": _vmapped(lambda k, x, y, nz: gg.precision_form_log_likelihood(k, x, y, nz, solver=solver)),
        "autodiff": _vmapped(lambda k, x, y, nz: plain_autodiff_value(k, x, y, nz, solver)),
    }
    runners, outputs, collectives = {}, {}, {}
    for name, fn in functions.items():
        runners[name], _, _, outputs[name] = _compile(fn, args)
        text = jax.jit(fn).lower(*args).compile().as_text()
        collectives[name] = {op: text.count(op) for op in COLLECTIVES if op in text}
    single = jax.block_until_ready(jax.jit(functions["closed"])(kernel, x, y, nz))  # the batch on one device
    difference = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1e-300))
        for a, b in zip(jax.tree_util.tree_leaves(outputs["closed"]), jax.tree_util.tree_leaves(single))
    )
    return {
        "devices": devices,
        "curves": devices * per_device,
        "series": _measure(runners, repeats),
        "collectives": collectives,
        "max_relative_difference_vs_one_device": difference,
    }


def run(args):
    count = jax.device_count()
    counts = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= count]
    report = {"machine": machine_info(args.label), "device_count": count, "per_device": args.per_device}
    print(json.dumps(report["machine"], indent=1), flush=True)
    if count == 1:
        print("one device only: on a CPU pass --host-devices 2 (or more)", flush=True)
    sizes = {"markov": 100 if args.quick else args.points, "dense": 20 if args.quick else 60}
    if jax.default_backend() == "cpu" and count > 1:
        # XLA:CPU (jaxlib 0.10.2) deadlocks, all threads idle, when a program with batched
        # triangular solves runs repeatedly across forced host devices; the Markov series is unaffected.
        report["dense_skipped"] = "forced host devices: XLA:CPU deadlock in repeated batched triangular solves"
        del sizes["dense"]
    repeats = 3 if args.quick else args.repeats
    for solver, n in sizes.items():
        rows = [bench(d, args.per_device, n, solver, repeats) for d in counts]
        base = rows[0]["series"]["closed"]["median_s"]
        for row in rows:
            row["efficiency"] = base / row["series"]["closed"]["median_s"]
            times = "  ".join(f"{k} {v['median_s'] * 1e3:8.2f} ms" for k, v in row["series"].items())
            print(
                f"{solver:6s} n={n:5d} devices {row['devices']:2d} ({row['curves']:4d} curves)  {times}  "
                f"efficiency {row['efficiency']:.2f}  collectives {row['collectives']['closed'] or 'none'}  "
                f"vs one device {row['max_relative_difference_vs_one_device']:.1e}",
                flush=True,
            )
        report[solver] = {"n": n, "rows": rows}

    save_report(report, args, plot)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = [solver for solver in ("markov", "dense") if solver in report]
    fig, axes = plt.subplots(1, len(solvers), figsize=(5.5 * len(solvers), 4.2), squeeze=False)
    for ax, solver in zip(axes[0], solvers):
        rows = report[solver]["rows"]
        devices = [r["devices"] for r in rows]
        for series, style in (("closed", "o-"), ("autodiff", "s--")):
            ax.plot(devices, [r["series"][series]["median_s"] * 1e3 for r in rows], style, label=series)
        for r in rows:
            ax.annotate(f"{r['efficiency']:.2f}", (r["devices"], r["series"]["closed"]["median_s"] * 1e3),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(devices, [str(d) for d in devices])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("devices (batch per device fixed)")
        ax.set_ylabel("median step time [ms]")
        ax.set_title(f"solver={solver!r}, {report['per_device']} curves × {report[solver]['n']} points per device",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"weak scaling, value_and_grad in x — {machine['device']} ({machine['backend']}), "
                 "labels: efficiency t(1)/t(d)", fontsize=10)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
