r"""The linear-Gaussian state-space model of a problem, shared by both forms of the Kalman
filter and smoother (``covariance``: covariances; ``square_root``: factors).

In precision form the likelihood is the Gaussian density of the whitened data ``w = S r``
under ``w = S f + e``, ``e ~ N(0, I)``. For a Markov kernel (its ``blocks``) and
block-diagonal ``S`` ([``Isotropic``][gpgrad_jax.noise.Isotropic], [``PerPoint``][gpgrad_jax.noise.PerPoint])
this is a state-space model over the *sorted* indices: state ``s_k`` (``N = p·k`` entries:
``k`` per coordinate, ``p`` coupled coordinates), ``s_k = A_k s_{k−1} + ε_k`` with
``ε_k ~ N(0, Q_k)``, and observation ``o_k = B_k r_k = C_k s_k + e_k``, ``C_k = B_k H`` (``H``
reads ``f``). Isotropic noise decouples the ``D`` coordinates: they share one covariance, so
``p = 1`` and the ``q = D`` coordinates ride along as columns of the mean (the dense solver's
``U = U_c ⊗ I_q``). The first point's ``A_0 = 0`` and ``Q_0`` is the prior of its state.

Both forms deliver the same ``Smoothed`` marginals, from which ``rule`` reads the closed-form
gradient.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = Any


class Model(NamedTuple):
    """The state-space model of one problem, in sorted order (all arrays lead with ``n``)."""

    order: Array  # permutation sorting the indices (None when presorted)
    is_sorted: Array  # bool: the indices came sorted (``order`` is the identity); True when presorted
    x: Array  # sorted indices, (n,)
    h: Array  # steps, (n,); h[0] = 0
    transition: Array  # A_k, (n, N, N); A_0 = 0 (the first state has no predecessor)
    process_noise: Array  # Q_k, (n, N, N); Q_0 = prior covariance of the first state (covariance form)
    process_noise_factor: Array  # L_k with L_k L_kᵀ = Q_k (square-root form), or None
    obs_matrix: Array  # C_k = B_k H, (n, p, N)
    obs: Array  # o_k = B_k r_k, (n, p, q): the whitened data
    noise_roots: Array  # B_k, (n, p, p): square roots of the noise precisions
    data: Array  # r_k = y_k − μ_k, (n, p, q)


class Layout(NamedTuple):
    """Static description of the per-coordinate state: the blocks stacked, each holding its value
    at ``start``; ``f`` is the sum of the values."""

    size: int  # k, states per coordinate
    slices: tuple  # one (start, stop) per block
    starts: tuple  # the blocks' value entries
    read_out: Array  # H, (k,): reads f


class Smoothed(NamedTuple):
    """Smoothed marginals, as both forms deliver them (sorted order).

    ``Cov(s_k | y) = left_k right_kᵀ``: the covariance form gives ``left = P``, ``right = None``
    (the identity); the square-root form ``left = right = G``, a factor. ``c_right = C right``
    and ``whitened_residual`` are what the gradient multiplies by the large precisions, so the
    square-root form computes them as orthogonal transforms, not as products.
    """

    mean: Array  # E[s_k|y], (n, N, q)
    whitened_residual: Array  # o_k − C_k E[s_k|y], (n, p, q)
    left: Array  # (n, N, w)
    right: Array  # (n, N, w), or None for the identity
    c_right: Array  # C_k right_k, (n, p, w); None in the covariance form (read p × p instead)
    mean_adjoint: Array  # ν_k = ∂L/∂m⁻_k, (n, N, q); None unless asked for
    covariance_adjoint: Array  # N_k with ∂L/∂P⁻_k = ½(ν_kν_kᵀ − q N_k), (n, N, N); None unless asked for
    filtered_mean: Array = None  # m_k|k, (n, N, q) (the covariance form; the square-root form's is in its Filtered)
    filtered_cov: Array = None  # P_k|k, (n, N, N) (likewise)


def layout(blocks, dtype) -> Layout:
    slices, start = [], 0
    for block in blocks:
        slices.append((start, start + block.size))
        start += block.size
    starts = tuple(s for s, _ in slices)
    read_out = jnp.zeros(start, dtype).at[jnp.array(starts)].set(1.0)
    return Layout(start, tuple(slices), starts, read_out)


def _block_diagonal(matrices, size):
    batch = matrices[0].shape[:-2]
    out = jnp.zeros((*batch, size, size), matrices[0].dtype)
    start = 0
    for matrix in matrices:
        stop = start + matrix.shape[-1]
        out = out.at[..., start:stop, start:stop].set(matrix)
        start = stop
    return out


def _lift(matrix, p):
    """``I_p ⊗ M`` for a batch of ``(k, k)`` matrices: ``p`` coordinates with the same dynamics."""
    if p == 1:
        return matrix
    n, k, _ = matrix.shape
    eye = jnp.eye(p, dtype=matrix.dtype)
    return jnp.einsum("ab,nij->naibj", eye, matrix).reshape(n, p * k, p * k)


def build_model(blocks, layout: Layout, x, noise_roots, data, square_root: bool, presorted: bool = False) -> Model:
    """Sort the points and assemble ``A_k``, ``Q_k`` (or its factor ``L_k``), ``C_k``, ``o_k``.
    ``presorted``: the points are known to come sorted (``is_sorted`` is then ``True``, a Python
    bool: nothing is permuted, no sort compiled — a series split over devices)."""
    n, p, _ = data.shape
    if presorted:
        is_sorted, order, xs = True, None, x
    else:
        # Sorting, and gathering or scattering by a permutation, cost as much as the filter
        # itself on XLA:CPU: skip them for sorted input.
        is_sorted = jnp.all(x[1:] >= x[:-1])
        order = jax.lax.cond(is_sorted, lambda: jnp.arange(n), lambda: jnp.argsort(x, stable=True))
        xs, noise_roots, data = jax.lax.cond(
            is_sorted, lambda: (x, noise_roots, data), lambda: (x[order], noise_roots[order], data[order])
        )
    h = pad_points(jnp.diff(xs), 1, 0)
    transition = _block_diagonal([b.transition(h) for b in blocks], layout.size).at[0].set(0.0)
    process_noise = factor = None
    if square_root:
        factor = _block_diagonal([b.process_noise_factor(h) for b in blocks], layout.size)
        first = _block_diagonal([b.initial_factor(xs[0]) for b in blocks], layout.size)
        factor = _lift(factor.at[0].set(first), p)
    else:
        process_noise = _block_diagonal([b.process_noise(h) for b in blocks], layout.size)
        first = _block_diagonal([b.initial(xs[0]) for b in blocks], layout.size)
        process_noise = _lift(process_noise.at[0].set(first), p)
    obs_matrix = jnp.einsum("nab,j->nabj", noise_roots, layout.read_out).reshape(n, p, p * layout.size)
    obs = jnp.einsum("nab,nbq->naq", noise_roots, data)
    return Model(order, is_sorted, xs, h, _lift(transition, p), process_noise, factor, obs_matrix, obs, noise_roots, data)


def log_likelihood(log_terms, model: Model):
    """``L`` from the filter's per-point terms ``−½ vᵀU⁻¹v − (q/2) log|U|``."""
    n, p, q = model.data.shape
    return jnp.sum(log_terms) - 0.5 * n * p * q * math.log(2.0 * math.pi)


def read_values(a, layout: Layout, p: int):
    """``H a``: the rows of ``a`` (``..., N, w``, ``N = p·k``) that make up ``f`` — each
    coordinate's component values summed — as ``(..., p, w)``."""
    *batch, big, width = a.shape
    a = a.reshape(*batch, p, big // p, width)
    return sum(a[..., :, start, :] for start in layout.starts)


def rows(*values):
    """One flat row per scan step. A ``lax.scan`` with one output is cheap to consume: with a
    tuple of outputs, XLA:CPU ran the same filter 13× slower once its outputs fed further work
    in the same program (measured: 2-state Matérn, n = 10⁵, 3.7 ms alone, 50 ms fused)."""
    return jnp.concatenate([v.reshape(-1) for v in values])


def split(stacked, shapes):
    """Undo ``rows`` for all steps at once: arrays of shape ``(n, *shape)``."""
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(stacked[:, start : start + size].reshape(stacked.shape[0], *shape))
        start += size
    return out


def pad_points(values, before: int, after: int):
    """``values`` with ``before`` and ``after`` zero rows along the points axis. A pad, not a
    concatenation: with the points split over devices XLA then exchanges only the rows at the
    devices' boundaries (it gathered the whole axis for a concatenation)."""
    config = [(before, after, 0)] + [(0, 0, 0)] * (values.ndim - 1)
    return jax.lax.pad(values, jnp.zeros((), values.dtype), config)


def shift_back(values):
    """``values[k + 1]`` at ``k``, zero after the last point."""
    return pad_points(values[1:], 0, 1)


def shift_forward(values):
    """``values[k − 1]`` at ``k``, zero before the first point."""
    return pad_points(values[:-1], 1, 0)
