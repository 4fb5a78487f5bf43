"""One problem over 1, 2, 4, … devices: time and per-device memory of the inducing bound and of the
Markov path in segments.

    python benchmarks/distributed.py --host-devices 4           # CPU: four forced host devices
    python benchmarks/distributed.py --label distributed_gpu    # every GPU of the machine

Writes ``<out>/<label>.json`` and ``<out>/<label>.png``. For each problem size ``n`` and device
count ``d`` (powers of two up to the machine's devices, on sub-meshes of one process) the points
of **one** problem are split over a mesh axis and one ``jax.jit(jax.value_and_grad(...))`` is timed
(medians, interleaved), after a **control**: a batch of independent matrix products split over
the same devices, what the machine gives when nothing is shared:

* ``inducing`` — a GPLVM's bound, ``n`` points with 2-D latent positions and 12 outputs,
  ``m = 64`` inducing inputs; the gradient in the latent positions, the inducing inputs and the
  kernel (``inducing_bound(..., mesh=, axis=)``);
* ``markov`` — a sorted series (``Matern32 × Cosine + Matern12``, per-point noise) in ``d``
  contiguous segments, the gradient in the time stamps and the kernel
  (``solvers.Markov(mesh=, axis=)``); beside it the one-device solver without a mesh (``plain``:
  the native passes where built) — the cost of the segmented form on one device.

Reported per row: the median, the speed-up ``t(1 device) / t(d devices)`` of the same program,
XLA's temporary memory per device (``memory_analysis``: the per-device program), the largest
collective in the compiled program (elements) and the largest difference from one device.

On a CPU the forced host devices share its cores (the threads are pinned: one per device, unless
``--all-threads``): with fewer cores than devices the time cannot drop further; the memory per
device is the figure that carries over to GPUs and hosts.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _measure, machine_info, parse_arguments, save_figure, save_report


def _arguments(parser):
    parser.add_argument("--host-devices", type=int, default=0, help="force this many CPU devices")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="problem sizes n")
    parser.add_argument("--inducing", type=int, default=64)


ARGS = parse_arguments(__doc__, "distributed_cpu", _arguments) if __name__ == "__main__" else None
if ARGS is not None and ARGS.host_devices:
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={ARGS.host_devices} {os.environ.get('XLA_FLAGS', '')}"
    ).strip()

import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import kernels, noise  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def gplvm_problem(n, m, seed=0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    y = np.tanh(latent @ rng.normal(size=(2, 8))) @ rng.normal(size=(8, 12)) + 0.05 * rng.normal(size=(n, 12))
    z = latent[rng.choice(n, m, replace=False)]
    return kernels.ExpSquared(1.0, jnp.ones(2)), latent, y, noise.Isotropic(0.1), z


def series_problem(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, n / 100.0, n))
    y = np.sin(2 * np.pi * t / 1.3) + 0.1 * rng.normal(size=n)
    kernel = kernels.Matern32(1.0, 2.0) * kernels.Cosine(1.0, 1.3) + kernels.Matern12(0.3, 0.5)
    return kernel, t, y, 1.0 / rng.uniform(0.05, 0.2, n)


def _largest_collective(text):
    largest = 0
    for line in text.splitlines():
        ops = [op for op in COLLECTIVES if f" {op}(" in line]
        if " = " not in line or not ops:
            continue
        shapes = line.split(" = ", 1)[1].split(f" {ops[0]}(", 1)[0]  # a shape or a tuple of shapes
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shapes):
            largest = max(largest, int(np.prod([int(d) for d in dims.split(",") if d])))
    return largest


def _compiled(fn, args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    output = jax.block_until_ready(compiled(*args))
    info = {
        "compile_s": compile_s,
        "temp_bytes_per_device": int(memory.temp_size_in_bytes) if memory is not None else None,
        "largest_collective_elements": _largest_collective(compiled.as_text()),
    }
    return (lambda: jax.block_until_ready(compiled(*args))), info, output


def _difference(a, b):
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / max(float(np.max(np.abs(np.asarray(v)))), 1e-300))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def _split(mesh, *arrays):
    """The arrays' points (leading axis) split over the mesh's axis."""
    return jax.device_put(arrays, NamedSharding(mesh, PartitionSpec("points")))


def bench(problem, n, counts, repeats, m):
    """Every device count for one problem and size: rows of times, memory, collectives."""
    runners, infos, outputs = {}, {}, {}
    if problem == "inducing":
        kernel, latent, y, nz, z = gplvm_problem(n, m)

        for d in counts:
            mesh = Mesh(np.array(jax.devices()[:d]), ("points",))
            latent_d, y_d = _split(mesh, latent, y)

            def loss(k, x, z, mesh=mesh, y_d=y_d):
                return gg.inducing_bound(k, x, y_d, nz, z, mesh=mesh, axis="points")

            runners[d], infos[d], outputs[d] = _compiled(jax.value_and_grad(loss, argnums=(0, 1, 2)), (kernel, latent_d, z))
    else:
        kernel, t, y, blocks = series_problem(n)
        for d in ["plain", *counts]:
            mesh = None if d == "plain" else Mesh(np.array(jax.devices()[:d]), ("points",))
            solver = gg.solvers.Markov() if mesh is None else gg.solvers.Markov(mesh=mesh, axis="points")
            t_d, y_d, blocks_d = (jnp.asarray(a) for a in (t, y, blocks)) if mesh is None else _split(mesh, t, y, blocks)

            def loss(k, t, solver=solver, y_d=y_d, blocks_d=blocks_d):
                return gg.log_marginal_likelihood(k, t, y_d, noise.PerPoint(blocks_d), solver=solver)

            runners[d], infos[d], outputs[d] = _compiled(jax.value_and_grad(loss, argnums=(0, 1)), (kernel, t_d))
    series = _measure(runners, repeats)
    rows = []
    for d in runners:
        row = {"devices": d, **series[d], **infos[d], "max_relative_difference_vs_one_device": _difference(outputs[d], outputs[counts[0]])}
        if d != "plain":
            row["speedup"] = series[counts[0]]["median_s"] / series[d]["median_s"]
        rows.append(row)
    return rows


def control(counts, repeats):
    """An embarrassingly parallel program — a batch of 384 × 384 matrix products split over the
    devices — timed like the problems: what the machine's devices give when nothing is shared."""
    batch = np.random.default_rng(0).normal(size=(2 * counts[-1], 384, 384))
    product = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a @ a)))
    runners = {}
    for d in counts:
        (placed,) = _split(Mesh(np.array(jax.devices()[:d]), ("points",)), batch)
        runners[d] = lambda placed=placed: jax.block_until_ready(product(placed))
    series = _measure(runners, repeats)
    return [{"devices": d, **series[d], "speedup": series[counts[0]]["median_s"] / series[d]["median_s"]} for d in counts]


def run(args):
    count = jax.device_count()
    counts = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= count]
    report = {"machine": machine_info(args.label), "device_count": count, "inducing_m": args.inducing}
    print(json.dumps(report["machine"], indent=1), flush=True)
    report["control"] = control(counts, 3 if args.quick else args.repeats)
    for row in report["control"]:
        print(f"control (independent matrix products) devices {row['devices']}  {row['median_s'] * 1e3:8.1f} ms  speed-up {row['speedup']:4.2f}", flush=True)
    sizes = args.sizes or ([4096] if args.quick else [100_000, 1_000_000])
    repeats = 3 if args.quick else args.repeats
    for problem in ("inducing", "markov"):
        report[problem] = []
        for n in sizes:
            rows = bench(problem, n, counts, repeats, args.inducing)
            report[problem].append({"n": n, "rows": rows})
            for row in rows:
                memory = row["temp_bytes_per_device"]
                print(
                    f"{problem:8s} n={n:8d} devices {row['devices']!s:>5}  {row['median_s'] * 1e3:9.1f} ms  "
                    f"speed-up {row.get('speedup', float('nan')):4.2f}  temp/device {memory / 2**20 if memory else float('nan'):8.1f} MiB  "
                    f"largest collective {row['largest_collective_elements']:7d}  vs one device {row['max_relative_difference_vs_one_device']:.1e}",
                    flush=True,
                )
    save_report(report, args, plot)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for problem, style in (("inducing", "o-"), ("markov", "s--")):
        for entry in report[problem]:
            rows = [r for r in entry["rows"] if r["devices"] != "plain"]
            devices = [r["devices"] for r in rows]
            label = f"{problem}, n = {entry['n']:,}"
            axes[0].plot(devices, [r["median_s"] * 1e3 for r in rows], style, label=label)
            axes[1].plot(devices, [r["temp_bytes_per_device"] / 2**20 for r in rows], style, label=label)
    control_rows = report.get("control", [])
    if control_rows:
        axes[0].plot([r["devices"] for r in control_rows], [r["median_s"] * 1e3 for r in control_rows], "k:", label="control: independent matrix products")
    for ax, title, unit in ((axes[0], "value_and_grad of one problem", "ms"), (axes[1], "XLA temporary memory per device", "MiB")):
        ax.set(xscale="log", yscale="log", xlabel="devices", ylabel=unit, title=title)
        ax.set_xticks(sorted({r["devices"] for p in ("inducing", "markov") for e in report[p] for r in e["rows"] if r["devices"] != "plain"}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    machine = report["machine"]
    where = machine["cpu"] if machine["backend"] == "cpu" else machine["device"]
    fig.suptitle(f"{where} ({machine['backend']}), {report['device_count']} devices, {machine['date'][:10]}", fontsize=9)
    return save_figure(fig, path)


if __name__ == "__main__":
    run(ARGS)
