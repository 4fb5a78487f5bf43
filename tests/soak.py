"""The hang soak: every public function × solver × transformation × precision, at the sizes of the
reported deadlock (64 problems of 100 3-D points under ``vmap``), as sequences of calls in fresh
processes, two at a time, each watched for progress.

    python tests/soak.py                 # everything (CI runs it as its own step)
    python tests/soak.py --quick         # one case per solver and transformation, float64 only

A worker process prints a line when each call starts and ends; one that prints nothing for
``--stall`` seconds is taken to hang: its native stacks (gdb, else py-spy, else Python's
faulthandler) are printed, it is killed, and the run fails. Every call runs three times (the
deadlock of jaxlib 0.10.2's batched LAPACK kernels often let the first call through). The
programs are those of ``tests/programs.py``, which the LAPACK check lowers — all of them but the
``"markov-parallel"`` solver's derivatives of ``index_gradient``, ``predict`` and
``sample_posterior`` (autodiff through its associative scans: 75–116 s of compilation each on
this 2-core machine, against 11–18 s for its other programs); ``"markov"`` runs those.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRANSFORMS = ("eager", "jit", "vmap", "grad", "vmap_grad")
BATCH, POINTS, DIM = 64, 100, 3
REPEATS = 3


def _groups(quick: bool) -> list[tuple[str, str, list]]:
    """``(dtype, name, [(function, solver, transform), …])``: what one worker process runs."""
    sys.path.insert(0, HERE)
    from programs import CASES

    groups = []
    for dtype in ("float64",) if quick else ("float64", "float32"):
        for solver in ("dense", "markov", "markov-parallel", "inducing"):
            functions = [f for f, s in CASES if s == solver]
            calls = [(f, solver, t) for t in TRANSFORMS for f in (functions[:1] if quick else functions)]
            if solver == "markov-parallel":
                calls = [(f, s, t) for f, s, t in calls if not (t.endswith("grad") and f in _THROUGH_SCANS)]
            groups.append((dtype, solver, calls))
    # The reported "markov-parallel" hang came in a process that had run the other solvers first:
    # every solver's batched programs in one process, twice over.
    mixed = [("log_marginal_likelihood", s, t) for s in ("dense", "markov", "markov-parallel") for t in ("vmap", "vmap_grad")]
    if not quick:
        groups.append(("float64", "every solver in one process", mixed * 2))
    return groups


#: Functions whose derivative differentiates the parallel solver's scans by autodiff (see above).
_THROUGH_SCANS = ("index_gradient", "predict", "predict_covariance", "sample_posterior")


# ------------------------------------------------------------------------------------ worker


def _worker(dtype: str, name: str, calls: list) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's fallback for stacks
    import jax

    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, HERE)
    from programs import problem, program

    single = problem(POINTS, DIM, dtype)
    batch = problem(POINTS, DIM, dtype, BATCH)
    for function, solver, transform in calls:
        fn = program((function, solver), transform)
        args = batch if transform.startswith("vmap") else single
        for repeat in range(REPEATS):
            print(f"start {function} {solver} {transform} {dtype} #{repeat}", flush=True)
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            print(f"end {time.perf_counter() - start:.2f} s", flush=True)
    print("worker finished", flush=True)


# ------------------------------------------------------------------------------------ parent


def native_stacks(pid: int) -> str:
    """Every thread's native stack of process ``pid``: gdb if installed, else py-spy, else the
    Python stacks faulthandler prints to the worker's output."""
    if shutil.which("gdb"):
        command = ["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"]
    elif shutil.which("py-spy"):
        command = ["py-spy", "dump", "--native", "--pid", str(pid)]
    else:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(2.0)
        return "(neither gdb nor py-spy: faulthandler's Python stacks are in the worker's output)"
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return f"({command[0]} did not answer in 120 s)"


class Run:
    """One worker process: its output, collected by a thread, and the time of its last line."""

    def __init__(self, dtype, name, calls):
        self.name = f"{name} {dtype}"
        env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # default threads
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([dtype, name, calls])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.last = time.monotonic()
        self.started = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self.last = time.monotonic()

    def timings(self) -> list[tuple[float, str]]:
        """``(seconds, call)`` of every finished call."""
        pairs = zip(self.lines, self.lines[1:])
        return [(float(end.split()[1]), start[len("start ") :]) for start, end in pairs if start.startswith("start ") and end.startswith("end ")]

    def current(self) -> str:
        starts = [line for line in self.lines if line.startswith("start ")]
        return starts[-1][len("start ") :] if starts else "(importing)"


def soak(quick: bool, stall: float, parallel: int) -> int:
    pending = list(_groups(quick))
    running: list[Run] = []
    failures: list[str] = []
    timings: list[tuple[float, str]] = []
    total_calls = sum(len(calls) for _, _, calls in pending) * REPEATS
    began = time.monotonic()
    while pending or running:
        while pending and len(running) < parallel:
            running.append(Run(*pending.pop(0)))
        time.sleep(1.0)
        for run in list(running):
            if run.process.poll() is not None:
                run.reader.join(timeout=10)
                running.remove(run)
                ok = run.process.returncode == 0 and run.lines and run.lines[-1] == "worker finished"
                took = time.monotonic() - run.started
                print(f"{'ok' if ok else 'FAILED'}: {run.name} in {took:.0f} s", flush=True)
                timings.extend(run.timings())
                if not ok:
                    failures.append(f"{run.name}: exit {run.process.returncode}\n" + "\n".join(run.lines[-40:]))
            elif time.monotonic() - run.last > stall:
                stacks = native_stacks(run.process.pid)
                run.process.kill()
                run.process.wait()
                run.reader.join(timeout=10)
                running.remove(run)
                failures.append(
                    f"{run.name}: no progress for {stall:.0f} s in '{run.current()}' — a hang.\n"
                    f"native stacks:\n{stacks}\nlast output:\n" + "\n".join(run.lines[-20:])
                )
                print(f"HUNG: {run.name} in '{run.current()}'", flush=True)
    print(f"soak: {total_calls} calls in {len(_groups(quick))} processes, {time.monotonic() - began:.0f} s", flush=True)
    print("slowest calls (the first of each includes compilation):", flush=True)
    for seconds, call in sorted(timings, reverse=True)[:10]:
        print(f"  {seconds:7.1f} s  {call}", flush=True)
    for failure in failures:
        print("\n" + "=" * 100 + "\n" + failure, flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one function per solver and transformation, float64")
    parser.add_argument("--stall", type=float, default=300.0, help="seconds without progress that count as a hang")
    parser.add_argument("--parallel", type=int, default=2, help="worker processes at a time")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*json.loads(args.worker))
        return 0
    return soak(args.quick, args.stall, args.parallel)


if __name__ == "__main__":
    sys.exit(main())
