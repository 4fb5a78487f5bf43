"""No program the library builds holds a *batched* LAPACK call on the CPU, and the reported hang
stays gone.

jaxlib 0.10.2's batched CPU LAPACK kernels split their batch over the intra-op thread pool and
wait for it; two of them running at once could each wait for work queued behind the other, forever
(``vmap(value_and_grad)`` of the dense solver, 64 problems of 100 3-D points: 5 of 5 fresh
processes hung). A single matrix runs inline, so one problem's factorisation may use LAPACK; a
batch — a ``vmap``, or leading axes — takes the written-out routines of ``gpgrad_jax._linalg``
(``gpgrad_jax._smallmatrix`` for the state-space solvers' small matrices). These tests keep it that
way for every public function, solver and transformation (``tests/programs.py``); ``tests/soak.py``
(a CI step of its own) runs them in fresh processes, two at a time, at the reported sizes.
"""

from __future__ import annotations

import re

import jax
import pytest
from problems import FULL
from programs import CASES, TRANSFORMS, problem, program

LAPACK = re.compile(r"custom_call @(\w*lapack\w*)\(.*")
BATCH_DIMS = re.compile(r'num_batch_dims = "(\d+)"')
LAYOUT = re.compile(r"operand_layouts = \[dense<\[([0-9, ]*)\]>")


def batched_lapack_calls(fn, *args) -> set:
    """The batched LAPACK custom calls in the program ``fn`` lowers to on this (CPU) backend: those
    with batch dimensions (or, where the call does not say, a first operand of rank above 2)."""
    found = set()
    for match in LAPACK.finditer(fn.lower(*args).as_text()):
        line = match.group(0)
        dims = BATCH_DIMS.search(line)
        if dims is not None:
            batched = int(dims.group(1)) > 0
        else:
            layout = LAYOUT.search(line)
            batched = layout is None or len(layout.group(1).split(",")) > 2
        if batched:
            found.add(match.group(1))
    return found


def _fast(case, transform):
    """The fast profile lowers the batched gradient programs (where the hazard was; they hold the
    value's too) of every case but the parallel solver's (slow to trace, small-matrix algebra
    only), and the batched values of the dense solver and the bound (a factorisation without its
    inverse); the full profile every case and transformation, with and without recursion in the
    dense factorisation."""
    if case[1] == "markov-parallel":
        return False
    return transform == "vmap_grad" or (transform == "vmap" and case[1] in ("dense", "inducing"))


_CASES = [
    pytest.param(case, transform, marks=() if _fast(case, transform) else pytest.mark.slow, id=f"{'-'.join(case)}-{transform}")
    for case in CASES
    for transform in TRANSFORMS
    if transform != "eager"
]


@pytest.mark.float32
@pytest.mark.skipif(not FULL and not jax.config.jax_enable_x64, reason="the fast profile checks the float64 programs")
@pytest.mark.parametrize("case, transform", _CASES)
def test_no_program_calls_lapack(case, transform, x64):
    dtype = "float64" if x64 else "float32"
    batch = 2 if transform.startswith("vmap") else None
    for n in (12, 50) if FULL and case[1] == "dense" else (12,):  # n D = 150 > LEAF: the recursion
        args = problem(n, 3, dtype, batch)
        assert not batched_lapack_calls(program(case, transform), *args), f"{case} {transform} n={n}"


@pytest.mark.parametrize("transform", ["vmap", "vmap_grad"] if not FULL else ["jit", "vmap", "vmap_grad", "hessian"])
@pytest.mark.parametrize("function", ["log_marginal_likelihood", "predict", "sample_posterior"])
def test_dense_noise_programs_call_no_lapack(function, transform, x64):
    """``Dense`` noise: its pseudo-determinant by the round-robin Jacobi method."""
    args = problem(6, 3, "float64" if x64 else "float32", 2 if transform.startswith("vmap") else None, noise_kind="dense")
    assert not batched_lapack_calls(program((function, "dense"), transform), *args)


def test_the_check_sees_batched_lapack():
    """The check itself: JAX's own factorisation under vmap is a batched LAPACK call on the CPU,
    on one matrix an unbatched one."""
    batch = jax.numpy.eye(3)[None].repeat(2, 0)
    assert batched_lapack_calls(jax.jit(jax.vmap(jax.numpy.linalg.cholesky)), batch) == {"lapack_dpotrf_ffi" if batch.dtype == "float64" else "lapack_spotrf_ffi"}
    assert batched_lapack_calls(jax.jit(jax.numpy.linalg.cholesky), batch[0]) == set()
