"""Benchmark: the dense solver on a batch of problems — what the LAPACK-free batches cost.

    python benchmarks/batched.py             # this machine, one thread (about 5 minutes)
    python benchmarks/batched.py --quick     # small sizes, for a smoke test

Writes ``<out>/batched_cpu.json`` and ``<out>/batched_cpu.png``. ``jit(vmap(value_and_grad))`` in
``x`` of the dense solver's log density, 3-D curves seen along one camera ray per point (rank-2
``PerPoint`` blocks), ``B`` problems of ``n`` points, three ways, interleaved in this one process:

* ``written out`` — the library: under ``vmap`` its factorisations are the written-out blocked
  Cholesky of ``gpgrad_jax._linalg`` (matrix products; no LAPACK);
* ``LAPACK batched`` — the same program with jaxlib's batched LAPACK calls, as the library ran
  before (``gpgrad_jax._linalg``'s batch rule replaced by LAPACK here, in the benchmark only). It
  runs in a child process under a timeout: jaxlib 0.10.2 splits a large enough batch over its
  thread pool, and this benchmark's own first full run hung there (B = 8, n = 100, both pool
  threads waiting in a batched triangular solve, ``--xla_cpu_multi_thread_eigen=false`` or not) —
  the reason for the change. A row whose child does not finish records the series as hung;
* ``LAPACK one at a time`` — ``lax.map`` over the problems, each an unbatched LAPACK call: the
  other remedy (a batching rule that maps problems one after another).

Unbatched (``B = 1`` without ``vmap``) the library runs LAPACK as before: that series is the
reference for the cost per problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _compile, _measure, curve_problem, machine_info, parse_arguments, save_figure, save_report  # float64

ARGS = parse_arguments(__doc__, "batched_cpu") if __name__ == "__main__" and "--child" not in sys.argv else None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import gpgrad_jax as gg  # noqa: E402
from gpgrad_jax import _linalg  # noqa: E402


def _value_and_grad(kernel):
    def one(x, y, blocks):
        return jax.value_and_grad(gg.precision_form_log_likelihood, argnums=1)(
            kernel, x, y, gg.noise.PerPoint(blocks), solver="dense"
        )

    return one


def _batch(batch, n):
    problems = [curve_problem(n, 3, seed) for seed in range(batch)]
    kernel = problems[0][0]
    stack = lambda *a: jnp.stack(a)  # noqa: E731
    x, y, blocks = (stack(*parts) for parts in zip(*((p[1], p[2], p[3].blocks) for p in problems)))
    return kernel, x, y, blocks


class _LapackBatches:
    """Within the block, ``gpgrad_jax._linalg``'s batches run jaxlib's batched LAPACK calls."""

    def __enter__(self):
        self.saved = _linalg._factor, _linalg._solve_dispatch
        _linalg._factor = _linalg._lapack_factor  # potrf and the inverse by products, as before
        _linalg._solve_dispatch = _linalg._lapack_solve
        jax.clear_caches()

    def __exit__(self, *exc):
        _linalg._factor, _linalg._solve_dispatch = self.saved
        jax.clear_caches()


def bench(batch, n, repeats):
    kernel, x, y, blocks = _batch(batch, n)
    one = _value_and_grad(kernel)
    runners, info, outputs = {}, {}, {}
    series = {
        "written out": jax.vmap(one),
        "LAPACK one at a time": lambda x, y, b: jax.lax.map(lambda a: one(*a), (x, y, b)),
    }
    for name, fn in series.items():
        runners[name], compile_s, _, outputs[name] = _compile(fn, (x, y, blocks))
        info[name] = compile_s
    runners["single problem (LAPACK)"], info["single problem (LAPACK)"], _, _ = _compile(one, (x[0], y[0], blocks[0]))
    rows = _measure(runners, repeats)
    for name in rows:
        rows[name]["compile_s"] = info[name]
    rows["LAPACK batched"] = _lapack_batched_in_a_child(batch, n, repeats)
    reference = outputs["LAPACK one at a time"][1]
    agreement = {"written out": float(jnp.max(jnp.abs(outputs["written out"][1] - reference)) / jnp.max(jnp.abs(reference)))}
    return rows, agreement


#: Seconds the child measuring batched LAPACK may take (compilation included) before it counts as hung.
CHILD_TIMEOUT = 300


def _lapack_batched_in_a_child(batch, n, repeats):
    """The batched-LAPACK series, measured by this script in a child process (``--child``)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", f"{batch},{n},{repeats}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"hung": True, "timeout_s": CHILD_TIMEOUT}
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(spec):
    batch, n, repeats = (int(v) for v in spec.split(","))
    kernel, x, y, blocks = _batch(batch, n)
    with _LapackBatches():
        runner, compile_s, _, _ = _compile(jax.vmap(_value_and_grad(kernel)), (x, y, blocks))
        row = _measure({"LAPACK batched": runner}, repeats)["LAPACK batched"]
    print(json.dumps(dict(row, compile_s=compile_s)), flush=True)


def _describe(name, row):
    return f"{name} hung" if "hung" in row else f"{name} {row['median_s'] * 1e3:.2f} ms"


def run(args):
    cases = [(8, 20), (8, 50)] if args.quick else [(8, 20), (64, 20), (8, 50), (64, 50), (8, 100), (64, 100)]
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    report = {"machine": machine_info(args.label), "results": []}
    print(json.dumps(report["machine"], indent=1), flush=True)
    for batch, n in cases:
        rows, agreement = bench(batch, n, repeats)
        lapack = rows["LAPACK batched"].get("median_s")
        entry = {
            "batch": batch,
            "n": n,
            "series": rows,
            "ratio_to_lapack_batched": {k: v["median_s"] / lapack for k, v in rows.items() if lapack and "median_s" in v},
            "per_problem_over_single": rows["written out"]["median_s"] / batch / rows["single problem (LAPACK)"]["median_s"],
            "gradient_relative_difference": agreement,
        }
        report["results"].append(entry)
        times = "  ".join(
            _describe(k, v) for k, v in rows.items()
        )
        print(f"B={batch:3d} n={n:4d}  {times}  agreement {agreement}", flush=True)
    save_report(report, args, plot)
    return report


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, batch in zip(axes, sorted({r["batch"] for r in report["results"]})):
        rows = [r for r in report["results"] if r["batch"] == batch]
        ns = [r["n"] for r in rows]
        for name, style in (("written out", "o-"), ("LAPACK batched", "s--"), ("LAPACK one at a time", "x:")):
            done = [(r["n"], r["series"][name]["median_s"] * 1e3) for r in rows if "median_s" in r["series"][name]]
            ax.loglog([d[0] for d in done], [d[1] for d in done], style, label=name)
            for r in rows:
                if "hung" in r["series"][name]:
                    ax.annotate("hung", (r["n"], r["series"]["written out"]["median_s"] * 1e3), color="C1", fontsize=8)
        ax.loglog(ns, [batch * r["series"]["single problem (LAPACK)"]["median_s"] * 1e3 for r in rows], "k-", alpha=0.3, label=f"{batch} × one problem")
        ax.set_xlabel("n (points per problem, D = 3)")
        ax.set_ylabel("jit(vmap(value_and_grad)) median, ms")
        ax.set_title(f"dense solver, B = {batch} problems", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpgrad_jax batches without LAPACK — {report['machine']['cpu']}, one thread", fontsize=10)
    return save_figure(fig, path)


if __name__ == "__main__":
    if "--child" in sys.argv:
        _child(sys.argv[sys.argv.index("--child") + 1])
    else:
        run(ARGS)
