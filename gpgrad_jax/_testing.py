"""Checks for users' own test suites (``gpgrad_jax.testing``): no ``hypothesis`` needed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax import _kernels as kernel_classes
from gpgrad_jax import _noise as noise_classes
from gpgrad_jax._arguments import as_float_array, check_registered
from gpgrad_jax._likelihood import precision_form_log_likelihood
from gpgrad_jax.reference import precision_form_log_likelihood as reference_log_likelihood

Array = Any


# ------------------------------------------------------------------ checks


def check_kernel(kernel: kernel_classes.Kernel, x: Array, *, rtol: float | None = None) -> None:
    """Assert that ``kernel`` is a usable covariance with a correct ``grad_first``.

    Checks, on every pair ``(x_i, x_j)`` including ``i == j``:

    * ``grad_first(a, b)`` is finite and equals the derivative of ``evaluate`` in ``a``: by
      autodiff for ``a != b`` (by differences where autodiff is not finite), and at ``a == b``
      by symmetric differences — **the mean of the one-sided derivatives**, the convention for
      kernels with a kink there (Matérn 1/2: 0, where autodiff would report one side);
    * ``evaluate`` is symmetric and its Gram matrix positive semi-definite;
    * the whole rule: ``jax.grad`` of the likelihood (its precision form, whose gradient in ``x``
      and the kernel is that of [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood]) in ``x`` and in the
      kernel's parameters equals plain autodiff through the dense reference, on random data —
      in ``x`` by symmetric differences of the reference when ``x`` has repeated points (the
      likelihood of a kinked kernel has a kink there too; the same convention).

    Args:
        kernel: a kernel (built in, composed or a custom class declared with
            [``gpgrad_jax.kernels.register``][gpgrad_jax.kernels.register]).
        x: index points, shape ``(n,)`` or ``(n, d)``; include the values your problems use
            (and repeated points, if your problems have them).
        rtol: relative tolerance; default ``1e-6`` in float64, ``1e-2`` in float32. Relative to
            the largest value of each compared quantity; for ``grad_first`` at least to the
            kernel's largest value over the extent of ``x`` (so that pairs at stationary points,
            where the derivative is rounding noise, do not collapse the tolerance).

    Raises:
        AssertionError: naming the check, the worst pair ``(i, j)``, the points and both values.

    Examples:
        >>> import jax.numpy as jnp
        >>> from gpgrad_jax import kernels, testing
        >>> testing.check_kernel(kernels.Matern32(1.0, 0.5), jnp.linspace(0.0, 2.0, 6))
    """
    if not isinstance(kernel, kernel_classes.Kernel):
        raise TypeError(f"`kernel` must be a gpgrad_jax.kernels.Kernel, got {type(kernel).__name__}")
    check_registered(kernel)
    x = as_float_array("x", x)
    if x.ndim not in (1, 2) or x.shape[0] < 1:
        raise ValueError(f"`x` must have shape (n,) or (n, d) with n >= 1, got shape {x.shape}")
    kernel = jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, x.dtype), kernel)
    if rtol is None:
        rtol = 1e-6 if x.dtype == jnp.float64 else 1e-2

    gram, hand, auto = (np.asarray(a, np.float64) for a in _kernel_matrices(kernel, x))
    _assert_finite("evaluate", gram, x)
    scale = max(float(np.max(np.abs(gram))), np.finfo(np.float64).tiny)
    _assert_close("evaluate is not symmetric: k(a, b) != k(b, a)", gram, gram.T, rtol * scale, x)
    smallest = float(np.linalg.eigvalsh(gram)[0])
    if smallest < -rtol * scale * gram.shape[0]:
        raise AssertionError(
            f"the Gram matrix of {type(kernel).__name__} on `x` is not positive semi-definite: "
            f"smallest eigenvalue {smallest:.3e} (largest entry {scale:.3e})"
        )

    _assert_finite("grad_first", hand, x)
    if auto.shape != hand.shape:
        raise AssertionError(f"grad_first returned shape {hand.shape[2:]} per pair; ∂k/∂a has shape {auto.shape[2:]}")
    # The kernel's own scale for a derivative — its largest value over the extent of `x` — floors
    # the tolerance: where every pair sits at a stationary point (a periodic kernel at whole
    # periods) the derivatives are rounding noise, and a tolerance relative to them would be too.
    points = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    extent = float(np.max(np.ptp(points, axis=0), initial=0.0)) or 1.0
    derivative_scale = max(float(np.max(np.abs(auto))), float(np.max(np.abs(hand))), scale / extent)
    _assert_close("grad_first disagrees with the derivative of evaluate", hand, auto, rtol * derivative_scale, x)

    _check_whole_rule(kernel, x, rtol)


@jax.jit  # one compilation per kernel structure instead of hundreds of eager operations
def _kernel_matrices(kernel, x):
    """The Gram matrix, ``grad_first`` on every pair, and the derivative of ``evaluate``."""
    return kernel.matrix(x, x), kernel.grad_first_matrix(x, x), _derivative_of_evaluate(kernel, x)


def _derivative_of_evaluate(kernel, x):
    """``∂k(x_i, x_j)/∂x_i`` by autodiff; by symmetric differences where autodiff is not finite
    and where ``x_i == x_j`` (the mean of the one-sided derivatives at a kink)."""
    grad = jax.grad(kernel.evaluate, argnums=0)
    pairwise = lambda f: jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None))  # noqa: E731
    auto = pairwise(grad)(x, x)
    numeric = pairwise(lambda a, b: _central_differences(lambda a_: kernel.evaluate(a_, b), a))(x, x)
    tied = pairwise(lambda a, b: jnp.all(a == b))(x, x)
    tied = tied.reshape(tied.shape + (1,) * (auto.ndim - 2))
    return jnp.where(jnp.isfinite(auto) & ~tied, auto, numeric)


def _pair(index, shape):
    i, j = np.unravel_index(index, shape)[:2]
    return int(i), int(j)


def _assert_finite(what, values, x):
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = _pair(int(np.argmax(bad.reshape(-1))), values.shape)
        raise AssertionError(
            f"{what} is not finite at pair (i={i}, j={j}), a = {np.asarray(x[i]).tolist()}, "
            f"b = {np.asarray(x[j]).tolist()}: {values[i, j].tolist()}"
        )


def _assert_close(what, actual, expected, tolerance, x):
    error = np.abs(actual - expected)
    worst = int(np.argmax(error.reshape(-1)))
    if error.reshape(-1)[worst] <= tolerance:
        return
    i, j = _pair(worst, error.shape)
    raise AssertionError(
        f"{what}: worst at pair (i={i}, j={j}), a = {np.asarray(x[i]).tolist()}, "
        f"b = {np.asarray(x[j]).tolist()}: {actual[i, j].tolist()} vs {expected[i, j].tolist()} "
        f"(error {error.reshape(-1)[worst]:.3e} > tolerance {tolerance:.3e})"
    )


def _check_whole_rule(kernel, x, rtol):
    n = x.shape[0]
    y = jnp.asarray(np.random.default_rng(0).normal(size=(n, 2)), x.dtype)
    noise = noise_classes.Isotropic(jnp.asarray(0.5, x.dtype) * jnp.sqrt(jnp.max(jax.vmap(kernel.evaluate)(x, x))))
    args = (kernel, x, y, noise)
    closed, plain = _likelihood_gradients(*args)
    leaves, treedef = jax.tree_util.tree_flatten((kernel, x))
    for index, ((path, g), w) in enumerate(zip(jax.tree_util.tree_leaves_with_path(closed), jax.tree_util.tree_leaves(plain))):
        what = "x" if path[0].idx == 1 else f"the kernel's parameter {jax.tree_util.keystr(path[1:])}"
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        how = "plain autodiff through the dense reference"
        # Symmetric differences where autodiff through the reference is not finite, and in x
        # at repeated points (autodiff reports one side of a kink there).
        if not np.all(np.isfinite(w)) or (path[0].idx == 1 and _has_ties(x)):
            how = "symmetric differences of the dense reference"
            at_leaf = lambda leaf, i=index: _reference_at(leaves, treedef, i, leaf, y, noise)  # noqa: E731
            w = np.asarray(jax.jit(lambda leaf, f=at_leaf: _central_differences(f, leaf))(leaves[index]), np.float64)
        tolerance = rtol * max(float(np.max(np.abs(w), initial=0.0)), 1.0)
        error = float(np.max(np.abs(g - w), initial=0.0))
        if not error <= tolerance:
            raise AssertionError(
                f"the likelihood's gradient in {what} disagrees with {how}: "
                f"{g.tolist()} vs {w.tolist()} (error {error:.3e})"
            )


@jax.jit
def _likelihood_gradients(kernel, x, y, noise):
    """``∂L/∂(kernel, x)`` by the closed-form rule and by autodiff through the dense reference."""
    closed = jax.grad(precision_form_log_likelihood, argnums=(0, 1))(kernel, x, y, noise, solver="dense")
    return closed, jax.grad(reference_log_likelihood, argnums=(0, 1))(kernel, x, y, noise)


def _reference_at(leaves, treedef, index, leaf, y, noise):
    moved = list(leaves)
    moved[index] = leaf
    kernel, x = jax.tree_util.tree_unflatten(treedef, moved)
    return reference_log_likelihood(kernel, x, y, noise)


def _has_ties(x) -> bool:
    x = np.asarray(x).reshape(x.shape[0], -1)
    return len(np.unique(x, axis=0)) < x.shape[0]


def _central_differences(f, at):
    """The gradient of the scalar ``f`` at ``at`` by ``(−f(2h) + 4f(h) − 4f(−h) + f(−2h)) / 4h``
    per coordinate, step ``h = eps^⅓·max(1, |at|)``: the mean of the two one-sided second-order
    differences, so its error is ``O(h²)`` both where ``f`` is smooth and at a kink, where it
    tends to the mean of the one-sided derivatives (a central difference's error is ``O(h)``
    there)."""
    at = jnp.asarray(at)
    h = jnp.finfo(at.dtype).eps ** (1.0 / 3.0) * jnp.maximum(1.0, jnp.max(jnp.abs(at)))
    basis = jnp.eye(at.size, dtype=at.dtype).reshape((at.size, *at.shape))

    def along(e):
        return (-f(at + 2 * h * e) + 4 * f(at + h * e) - 4 * f(at - h * e) + f(at - 2 * h * e)) / (4.0 * h)

    return jax.vmap(along)(basis).reshape(at.shape)
