r"""Titsias' collapsed inducing-point bound in precision form, with its closed-form ``custom_vjp``.

With ``m`` inducing inputs ``Z``, ``K_zz + εI = L_z L_zᵀ``, ``A = L_z⁻¹ K_zx`` (``m × n``, column
``a_i``) and ``Q = AᵀA = K_xz (K_zz + εI)⁻¹ K_zx``, the bound replaces ``K`` by ``Q`` in the
precision-form likelihood and pays for the difference with a trace:

    F_L = log N(w | 0, I + S (Q ⊗ I_D) Sᵀ) − ½ Σ_i tr(Λ_i) (k(x_i, x_i) − Q_ii),   w = S r.

It is Titsias' bound for the whitened observation ``w = S f + e``, ``e ~ N(0, I)``: a lower bound on
the exact ``L`` for every ``Z``, equal to it at ``Z = x`` (``ε → 0``). Block-diagonal noise
``Λ_i = B_iᵀB_i`` (``p × p`` blocks shared by ``q`` columns, ``pq = D``) keeps it O(n m² p²): with
``ρ_i = Λ_i r_i``,

    B = I + Σ_i a_i a_iᵀ ⊗ Λ_i  (mp × mp),   c = Σ_i a_i ⊗ ρ_i  (mp × q),   β = B⁻¹c,
    F_L = −½ Σ_i ⟨r_i, ρ_i⟩ + ½ ⟨c, β⟩ − (q/2) log|B| − (nD/2) log 2π − ½ Σ_i t_i (k_ii − ‖a_i‖²)

(Woodbury and the determinant lemma; ``t_i = q tr Λ_i``). Nothing of size ``n × n`` exists.

The rule (``docs/math.md`` section 5). With ``P = q B⁻¹ + ββᵀ`` and ``μ_i = Σ_j a_ij β_j`` (the
variational posterior mean at ``x_i``),

    Ā[:, i] = β ρ_iᵀ − Σ_{l,a,b} P[:, a, l, b] a_il Λ_i[a, b] + t_i a_i,
    G_zx = L_z⁻ᵀ Ā  (= ∂F/∂K_zx),   Ḡ_zz = −½ L_z⁻ᵀ Ā Aᵀ L_z⁻¹  (= ∂F/∂K_zz),   ∂F/∂k_ii = −½ t_i,

because ``F`` depends on ``A`` only through ``AᵀA`` (it is invariant under ``A → OA``, ``O``
orthogonal). The index gradients are row sums against the kernel's ``grad_first``:

    ∂F/∂x_i = Σ_j G_zx[j, i] ∂k(x_i, z_j)/∂x_i + 2 (∂F/∂k_ii) ∂k(x_i, x_i)/∂a,
    ∂F/∂z_j = Σ_i G_zx[j, i] ∂k(z_j, x_i)/∂z_j + 2 Σ_l Ḡ_zz[j, l] ∂k(z_j, z_l)/∂z_j,

and ``r̄_i = −Λ_i (r_i − μ_i)``, ``Λ̄_i = −½ r_i r_iᵀ + sym(μ_i r_iᵀ) − ½ (a_i ⊗ I)ᵀ P (a_i ⊗ I)
− ½ q (k_ii − ‖a_i‖²) I``, then ``B̄_i = 2 B_i Λ̄_i`` for the noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpgrad_jax._arguments import all_hold, as_float_array, check_finite, check_rule, index_domain_rules, poison
from gpgrad_jax._linalg import Cholesky, cho_inverse, cholesky
from gpgrad_jax._noise import BlockDiagonal
from gpgrad_jax._rules import unwrap_primals
from gpgrad_jax._solver.base import Inapplicable, Solver

Array = Any


def default_jitter(dtype) -> float:
    """The relative jitter ``ε / mean k(z_j, z_j)`` added to ``K_zz``: 1e-8 in float64, 1e-4 in float32.

    The jitter trades bias for conditioning: it removes the fraction ``ε / (λ + ε)`` of ``Q``
    along an eigenvector of ``K_zz`` with eigenvalue ``λ``, and close inducing inputs make ``λ``
    small (on the benchmark's problem, n = 500, m = 16: the bound is 0.05 nats from its ε → 0
    limit at 1e-8, 5 at 1e-6, 213 at 1e-4). float32 cannot factor ``K_zz`` reliably with less.
    """
    return 1e-8 if jnp.finfo(dtype).bits == 64 else 1e-4


class Blocks(NamedTuple):
    """The noise precision per point, ``Λ_i = B_iᵀB_i`` (``(n, p, p)``), shared by ``q`` columns."""

    root: Array  # B_i, (n, p, p)
    precision: Array  # Λ_i, (n, p, p)
    columns: int  # q


def noise_blocks(noise, n, dim) -> Blocks:
    root, q = noise.observation_blocks(n, dim)
    return Blocks(root, jnp.einsum("iab,iac->ibc", root, root), q)


class Bound(NamedTuple):
    """``F_L`` and what the rule reuses."""

    value: Array
    chol_z: Cholesky  # L_z and L_z⁻¹, (m, m)
    a: Array  # A = L_z⁻¹ K_zx, (m, n)
    chol_b: Cholesky  # chol(B) and its inverse, (mp, mp)
    beta: Array  # B⁻¹ c, (m, p, q)
    kernel_diagonal: Array  # k(x_i, x_i), (n,)


def _jittered_gram(kernel, z, jitter):
    kzz = kernel.matrix(z, z)
    eps = jitter * jnp.mean(jnp.diagonal(kzz))
    return kzz + eps * jnp.eye(z.shape[0], dtype=kzz.dtype)


def _posterior_precision(a, precision):
    """``B = I + Σ_i a_i a_iᵀ ⊗ Λ_i`` as ``(mp, mp)``."""
    m = a.shape[0]
    p = precision.shape[-1]
    if p == 1:  # the isotropic case: one m × m product
        core = (a * precision[:, 0, 0]) @ a.T
    else:
        core = jnp.einsum("ji,iab,li->jalb", a, precision, a).reshape(m * p, m * p)
    return core + jnp.eye(m * p, dtype=a.dtype)


def bound(kernel, noise, x, z, r, jitter) -> Bound:
    """The forward pass: ``F_L`` in O(n m² p²) time and O(n m) memory."""
    n, dim = r.shape
    m = z.shape[0]
    blocks = noise_blocks(noise, n, dim)
    p, q = blocks.precision.shape[-1], blocks.columns
    residual = r.reshape(n, p, q)
    rho = blocks.precision @ residual  # Λ_i r_i
    chol_z = cholesky(_jittered_gram(kernel, z, jitter))
    a = chol_z.inverse @ kernel.matrix(z, x)
    chol_b = cholesky(_posterior_precision(a, blocks.precision))
    c = jnp.einsum("ji,iaq->jaq", a, rho).reshape(m * p, q)
    beta = chol_b.solve(c)
    kernel_diagonal = jax.vmap(kernel.evaluate)(x, x)
    trace = q * jnp.trace(blocks.precision, axis1=-2, axis2=-1)
    value = (
        -0.5 * jnp.sum(residual * rho)
        + 0.5 * jnp.sum(c * beta)
        - 0.5 * q * chol_b.log_det()
        - 0.5 * n * dim * math.log(2.0 * math.pi)
        - 0.5 * jnp.sum(trace * (kernel_diagonal - jnp.sum(a * a, axis=0)))
    )
    return Bound(value, chol_z, a, chol_b, beta.reshape(m, p, q), kernel_diagonal)


#: Points per block of the backward pass: its per-pair arrays (the derivative matrices, the
#: kernel's VJP) then hold about this many entries of (points × m × d), 1 MiB in float64 — in
#: cache — whatever n (measured best at m = 64: 1024 points per block, 245 ms at n = 10⁵ against
#: 471 ms unblocked).
_BLOCK_ENTRIES = 1 << 17


def block_size(n: int, m: int, index_dim: int) -> int:
    """Points per block of the backward pass for ``n`` points, ``m`` inducing inputs, ``d``."""
    return int(min(n, max(8, _BLOCK_ENTRIES // (m * index_dim))))


class Shared(NamedTuple):
    """What every block of points needs: the m × m (mp × mp) quantities of the rule."""

    weights: Array  # P = q B⁻¹ + ββᵀ, (mp, mp)
    beta: Array  # (m, p, q)
    chol_z: Cholesky
    left_rest: Array | None  # p = 1: L_z⁻ᵀ (qI − P)
    left_beta: Array | None  # p = 1: L_z⁻ᵀ β, (m, q)


def shared_terms(fwd: Bound) -> Shared:
    m, p, q = fwd.beta.shape
    beta_flat = fwd.beta.reshape(m * p, q)
    weights = q * cho_inverse(fwd.chol_b.inverse) + beta_flat @ beta_flat.T
    if p > 1:
        return Shared(weights, fwd.beta, fwd.chol_z, None, None)
    # One block per point, t_i = q λ_i: Ā = β ρᵀ + ((qI − P) A) ⊙ λ, so that L_z⁻ᵀĀ takes one
    # m × m × n product.
    inverse_t = fwd.chol_z.inverse.T
    rest = q * jnp.eye(m, dtype=weights.dtype) - weights
    return Shared(weights, fwd.beta, fwd.chol_z, inverse_t @ rest, inverse_t @ beta_flat)


class PointTerms(NamedTuple):
    """One block's per-point cotangents and its contributions to the sums over points."""

    grad_x: Array  # (b,) or (b, d)
    residual: Array  # r̄, (b, D)
    root: Array | None  # B̄_i, (b, p, p), when the noise is wanted
    grad_z: Array  # Σ_i G_ji ∂k(z_j, x_i)/∂z_j over the block, (m,) or (m, d)
    kernel: Any  # θ̄ over the block (K_zx and k_ii terms), when the kernel is wanted
    a_bar_a: Array | None  # Ā Aᵀ over the block (p > 1)


def point_terms(kernel, z, shared: Shared, a, x, residual, precision, root, kernel_diagonal, want_kernel, want_noise):
    """The rule for a block of points (module docstring): ``G = L_z⁻ᵀĀ`` for its columns, then
    the row sums against ``grad_first`` for ``x`` and ``Z``, the kernel's VJP, ``r̄`` and ``B̄``."""
    m, p, q = shared.beta.shape
    b = x.shape[0]
    residual = residual.reshape(b, p, q)
    rho = precision @ residual
    trace = q * jnp.trace(precision, axis1=-2, axis2=-1)
    posterior_mean = jnp.einsum("ji,jaq->iaq", a, shared.beta)  # μ_i
    a_bar_a = None
    if p == 1:
        cross = (shared.left_rest @ a) * precision[:, 0, 0] + shared.left_beta @ rho[:, 0, :].T
        quadratic = jnp.sum(a * (shared.weights @ a), axis=0)[:, None, None] if want_noise else None
    else:
        weighted = jnp.einsum("jalb,li->ijab", shared.weights.reshape(m, p, m, p), a)  # Σ_l P[j,a,l,b] a_il
        a_bar = jnp.einsum("jaq,iaq->ji", shared.beta, rho) + a * trace - jnp.einsum("ijab,iab->ji", weighted, precision)
        quadratic = jnp.einsum("ji,ijab->iab", a, weighted) if want_noise else None  # (a_i ⊗ I)ᵀ P (a_i ⊗ I)
        cross = shared.chol_z.inverse.T @ a_bar
        a_bar_a = a_bar @ a.T
    diagonal = -0.5 * trace  # ∂F/∂k(x_i, x_i)

    # Row sums: products reduced at once, so XLA fuses each derivative matrix into its sum.
    expand = lambda g, d: g.reshape(g.shape + (1,) * (d.ndim - 2))  # noqa: E731
    d_xz = kernel.grad_first_matrix(x, z)  # ∂k(x_i, z_j)/∂x_i, (b, m[, d])
    grad_x = jnp.sum(expand(cross.T, d_xz) * d_xz, axis=1)
    slope = 2.0 * jax.vmap(kernel.grad_first)(x, x)  # d k(x_i, x_i)/d x_i
    grad_x = grad_x + diagonal.reshape((-1,) + (1,) * (slope.ndim - 1)) * slope
    if kernel.is_stationary():  # ∂k(z_j, x_i)/∂z_j = −∂k(x_i, z_j)/∂x_i: one derivative matrix
        grad_z = -jnp.sum(expand(cross.T, d_xz) * d_xz, axis=0)
    else:
        d_zx = kernel.grad_first_matrix(z, x)
        grad_z = jnp.sum(expand(cross, d_zx) * d_zx, axis=1)
    kernel_bar = None
    if want_kernel:
        _, kernel_vjp = jax.vjp(lambda k: (k.matrix(z, x), jax.vmap(k.evaluate)(x, x)), kernel)
        (kernel_bar,) = kernel_vjp((cross, diagonal))
    residual_bar = -(rho - precision @ posterior_mean)
    root_bar = None
    if want_noise:
        outer = lambda u, v: jnp.einsum("iaq,ibq->iab", u, v)  # noqa: E731
        mean_outer = outer(posterior_mean, residual)
        leftover = kernel_diagonal - jnp.sum(a * a, axis=0)
        precision_bar = (
            -0.5 * outer(residual, residual)
            + 0.5 * (mean_outer + jnp.swapaxes(mean_outer, -1, -2))
            - 0.5 * quadratic
            - 0.5 * q * leftover[:, None, None] * jnp.eye(p, dtype=rho.dtype)
        )
        root_bar = 2.0 * root @ precision_bar  # Λ = BᵀB: B̄ = 2 B Λ̄
    return PointTerms(grad_x, residual_bar.reshape(b, p * q), root_bar, grad_z, kernel_bar, a_bar_a)


def gram_cotangent(shared: Shared, fwd: Bound, a_bar_a, jitter):
    """``∂F/∂K_zz = −½ L_z⁻ᵀ Ā Aᵀ L_z⁻¹`` (symmetrised), with the jitter's share."""
    inverse = fwd.chol_z.inverse
    m = inverse.shape[0]
    if a_bar_a is None:  # p = 1: Ā Aᵀ = β cᵀ + (qI − P)(B − I), c = Bβ, from m × m matrices only
        _, p, q = shared.beta.shape
        beta_flat = shared.beta.reshape(m * p, q)
        b_minus_eye = fwd.chol_b.low @ fwd.chol_b.low.T - jnp.eye(m, dtype=inverse.dtype)
        rest = q * jnp.eye(m, dtype=inverse.dtype) - shared.weights
        a_bar_a = beta_flat @ (b_minus_eye @ beta_flat + beta_flat).T + rest @ b_minus_eye
    half = inverse.T @ a_bar_a.T @ inverse  # L_z⁻ᵀ (Ā Aᵀ)ᵀ L_z⁻¹
    gram = -0.25 * (half + half.T)  # symmetric in exact arithmetic
    # The jitter ε = jitter · mean(diag K_zz) moves with K_zz's diagonal.
    return gram + (jitter / m) * jnp.trace(gram) * jnp.eye(m, dtype=gram.dtype)


def _sum_trees(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def blocked_point_terms(kernel, noise, x, z, r, fwd: Bound, want_kernel, want_noise, points_per_block=None) -> PointTerms:
    """``point_terms`` over all points, a block at a time (a ``lax.scan`` over full blocks, then
    the remainder): the per-pair arrays never exceed one block, whatever n."""
    n, dim = r.shape
    m = z.shape[0]
    blocks = noise_blocks(noise, n, dim)
    shared = shared_terms(fwd)
    size = block_size(n, m, 1 if x.ndim == 1 else x.shape[1]) if points_per_block is None else min(n, points_per_block)
    full, tail = divmod(n, size)

    def run(start, length):
        take = lambda v, axis=0: jax.lax.dynamic_slice_in_dim(v, start, length, axis)  # noqa: E731
        return point_terms(
            kernel, z, shared, take(fwd.a, 1), take(x), take(r), take(blocks.precision), take(blocks.root),
            take(fwd.kernel_diagonal), want_kernel, want_noise,
        )

    parts = []
    if full:
        first = run(0, size)
        sums, rows = (first.grad_z, first.kernel, first.a_bar_a), (first.grad_x, first.residual, first.root)
        if full > 1:
            def step(total, index):
                terms = run(index * size, size)
                return _sum_trees(total, (terms.grad_z, terms.kernel, terms.a_bar_a)), (terms.grad_x, terms.residual, terms.root)

            sums, stacked = jax.lax.scan(step, sums, jnp.arange(1, full))
            rows = jax.tree_util.tree_map(  # the first block's rows, then the scanned ones
                lambda head, rest: jnp.concatenate([head, rest.reshape((-1, *rest.shape[2:]))]), rows, stacked
            )
        parts.append((sums, rows))
    if tail:
        terms = run(full * size, tail)
        parts.append(((terms.grad_z, terms.kernel, terms.a_bar_a), (terms.grad_x, terms.residual, terms.root)))
    sums = functools.reduce(_sum_trees, [s for s, _ in parts])
    rows = jax.tree_util.tree_map(lambda *r: jnp.concatenate(r), *[r for _, r in parts])
    grad_z, kernel_bar, a_bar_a = sums
    grad_x, residual_bar, root_bar = rows
    return PointTerms(grad_x, residual_bar, root_bar, grad_z, kernel_bar, a_bar_a), shared


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def precision_form_bound(kernel, noise, x, z, r, jitter, points_per_block=None):
    return _forward(kernel, noise, x, z, r, jitter).value


_forward = jax.jit(bound, static_argnums=5)


def _bound_fwd(kernel, noise, x, z, r, jitter, points_per_block):
    # symbolic_zeros: the kernel's and the noise's cotangents, each a VJP of small functions,
    # are computed only when asked for.
    (kernel, kernel_wanted), (noise, noise_wanted), (x, _), (z, _), (r, _) = map(
        unwrap_primals, (kernel, noise, x, z, r)
    )
    fwd = _forward(kernel, noise, x, z, r, jitter)
    return fwd.value, (kernel_wanted, noise_wanted, kernel, noise, x, z, r, fwd)


def _bound_bwd(jitter, points_per_block, residuals, g):
    kernel_wanted, noise_wanted, kernel, noise, x, z, r, fwd = residuals
    return _backward(kernel_wanted, noise_wanted, jitter, points_per_block, kernel, noise, x, z, r, fwd, g)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _backward(kernel_wanted, noise_wanted, jitter, points_per_block, kernel, noise, x, z, r, fwd, g):
    terms, shared = blocked_point_terms(kernel, noise, x, z, r, fwd, kernel_wanted, noise_wanted, points_per_block)
    gram = gram_cotangent(shared, fwd, terms.a_bar_a, jitter)
    d_zz = kernel.grad_first_matrix(z, z)
    grad_z = terms.grad_z + 2.0 * jnp.sum(gram.reshape(gram.shape + (1,) * (d_zz.ndim - 2)) * d_zz, axis=1)
    kernel_bar = noise_bar = None
    if kernel_wanted:
        # θ̄ = ⟨G, ∂K_zx/∂θ⟩ + ⟨∂F/∂k_ii, ∂k_ii/∂θ⟩ (the blocks) + ⟨Ḡ_zz, ∂K_zz/∂θ⟩, indices fixed.
        _, gram_vjp = jax.vjp(lambda k: k.matrix(z, z), kernel)
        kernel_bar = jax.tree_util.tree_map(lambda a, b: g * (a + b), terms.kernel, gram_vjp(gram)[0])
    if noise_wanted:
        n, dim = r.shape
        _, noise_vjp = jax.vjp(lambda s: s.observation_blocks(n, dim)[0], noise)
        (noise_bar,) = noise_vjp(g * terms.root)
    return kernel_bar, noise_bar, g * terms.grad_x, g * grad_z, g * terms.residual


precision_form_bound.defvjp(_bound_fwd, _bound_bwd, symbolic_zeros=True)


def plain_precision_form_bound(kernel, noise, x, z, r, jitter):
    """The same forward computation with no custom rule: the autodiff baseline."""
    return bound(kernel, noise, x, z, r, jitter).value


# ------------------------------------------------------------------ the variational posterior


@functools.partial(jax.jit, static_argnums=6)
def predict(kernel, noise, x, z, r, x_new, jitter):
    """Mean offset ``(n_new, D)`` and marginal variance ``(n_new, D)`` of ``q(f_*)``.

    ``q(v) = N(β, B⁻¹ ⊗ I_q)`` for the whitened inducing values ``v = L_z⁻¹ u``, and
    ``f_* = a_*ᵀ v + (f_* − E[f_* | u])``: mean ``a_*ᵀ β``, variance
    ``k_** − ‖a_*‖² + (a_* ⊗ I)ᵀ B⁻¹ (a_* ⊗ I)``. O(n m² p² + n_new m² p²).
    """
    fwd = bound(kernel, noise, x, z, r, jitter)
    return _posterior_at(kernel, z, x_new, fwd)


def _posterior_at(kernel, z, x_new, fwd: Bound):
    m, p, q = fwd.beta.shape
    a_new = fwd.chol_z.inverse @ kernel.matrix(z, x_new)  # (m, n_new)
    offset = jnp.einsum("ji,jaq->iaq", a_new, fwd.beta)
    # (a_* ⊗ e_a)ᵀ B⁻¹ (a_* ⊗ e_a) = ‖chol(B)⁻¹ (a_* ⊗ e_a)‖²
    columns = jnp.einsum("ji,ab->ijab", a_new, jnp.eye(p, dtype=a_new.dtype)).reshape(-1, m * p, p)
    solved = fwd.chol_b.inverse @ jnp.moveaxis(columns, 0, 1).reshape(m * p, -1)
    explained = jnp.sum(solved**2, axis=0).reshape(-1, p)
    prior = jax.vmap(kernel.evaluate)(x_new, x_new) - jnp.sum(a_new**2, axis=0)
    variance = jnp.broadcast_to((prior[:, None] + explained)[:, :, None], offset.shape)
    n_new = x_new.shape[0]
    return offset.reshape(n_new, p * q), variance.reshape(n_new, p * q)


@functools.partial(jax.jit, static_argnums=(6, 8))
def sample(key, kernel, noise, x, z, r, jitter, x_new, num_samples):
    """Draws of ``q(f_*)``, ``(num_samples, n_new, D)``: ``v ~ q(v)`` shared by the points, then
    ``a_*ᵀ v`` plus the residual ``f_* − E[f_* | u]`` drawn point by point (its variance
    ``k_** − Q_**``), so every draw's marginals are ``predict``'s. O(n m² p² + n_new m p).
    """
    fwd = bound(kernel, noise, x, z, r, jitter)
    m, p, q = fwd.beta.shape
    inducing_key, residual_key = jax.random.split(key)
    standard = jax.random.normal(inducing_key, (num_samples, m * p, q), r.dtype)
    # v = β + chol(B)⁻ᵀ ξ has covariance B⁻¹ (per column).
    v = fwd.beta.reshape(m * p, q) + fwd.chol_b.inverse.T @ standard
    a_new = fwd.chol_z.inverse @ kernel.matrix(z, x_new)
    through_u = jnp.einsum("ji,sjaq->siaq", a_new, v.reshape(num_samples, m, p, q))
    leftover = jnp.maximum(jax.vmap(kernel.evaluate)(x_new, x_new) - jnp.sum(a_new**2, axis=0), 0.0)
    residual = jnp.sqrt(leftover)[None, :, None, None] * jax.random.normal(residual_key, through_u.shape, r.dtype)
    n_new = x_new.shape[0]
    return (through_u + residual).reshape(num_samples, n_new, p * q)


# ------------------------------------------------------------------------------- the solver


class Prepared(NamedTuple):
    """The problem with the inducing inputs in its dtype."""

    kernel: Any
    noise: Any
    x: Array
    r: Array
    inducing: Array  # Z, (m,) or (m, d)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Inducing(Solver):
    r"""Titsias' collapsed bound with inducing inputs ``Z`` (``(m,)`` or ``(m, d)``, like ``x``) and its
    optimal variational posterior: O(n m² p²) time, O(n m) memory. ``points_per_block``: how many
    points the backward pass takes at a time (its per-pair arrays hold about that many × ``m``
    entries; ``None``: about 10⁵ entries, in cache).

    A lower bound, not the log density: [``gpgrad_jax.inducing_bound``][gpgrad_jax.inducing_bound]
    evaluates it, and ``log_marginal_likelihood`` refuses this solver; ``predict`` and
    ``sample_posterior`` take it (or ``inducing=Z``) for the variational posterior. ``jitter``:
    relative to the mean of ``k(z, z)``, ``None`` for the dtype's default (``default_jitter``).
    """

    inducing: Any
    jitter: float | None = None
    points_per_block: int | None = None

    name = "inducing"
    exact = False

    def __repr__(self):
        return f"Inducing(m={len(self.inducing)}, jitter={self.jitter!r}, points_per_block={self.points_per_block!r})"

    def prepare(self, problem) -> Prepared:
        kernel, noise, x, r = problem
        if not isinstance(noise, BlockDiagonal):
            raise Inapplicable(
                f"`noise`: the inducing-point bound needs noise that is block diagonal per point "
                f"(noise.Isotropic or noise.PerPoint), got noise.{type(noise).__name__}"
            )
        z = as_float_array("inducing", self.inducing)
        n = x.shape[0]
        want = "(m,)" if x.ndim == 1 else f"(m, {x.shape[1]})"
        if z.ndim != x.ndim or z.shape[1:] != x.shape[1:] or z.shape[0] < 1:
            raise ValueError(
                f"`inducing` must have shape {want} with m >= 1, like `x` of shape {x.shape} "
                f"(one inducing input per row, in the index space of `x`), got shape {z.shape}"
            )
        verdicts = [check_finite("inducing", z)] + [check_rule(*rule) for rule in index_domain_rules(kernel, "inducing", z)]
        (z,) = poison(all_hold(verdicts), z.astype(x.dtype))
        m = z.shape[0]
        if m > n:
            warnings.warn(
                f"`inducing` has m = {m} points for n = {n} data points: the bound costs O(n m² + m³) "
                f"time and O(n m + m²) memory, more than the exact likelihood's O(n³) and O(n²) here, "
                "and is no tighter than with m = n inducing points at the data (where it is exact)",
                UserWarning,
                stacklevel=5,  # the warning names the user's call
            )
        return Prepared(kernel, noise, x, r, z)

    def _jitter(self, prepared) -> float:
        jitter = self.jitter
        if jitter is None:
            return default_jitter(prepared.x.dtype)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not math.isfinite(jitter) or jitter < 0:
            raise ValueError(f"`jitter` must be a Python number >= 0 (relative to the mean of k(z, z)), got {jitter!r}")
        return float(jitter)

    def log_likelihood(self, prepared):
        kernel, noise, x, r, z = prepared
        return precision_form_bound(kernel, noise, x, z, r, self._jitter(prepared), self._points_per_block())

    def _points_per_block(self):
        size = self.points_per_block
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"`points_per_block` must be a positive integer or None, got {size!r}")
        return size

    def plain_log_likelihood(self, prepared):
        kernel, noise, x, r, z = prepared
        return bound(kernel, noise, x, z, r, self._jitter(prepared)).value

    def predict(self, prepared, x_new):
        kernel, noise, x, r, z = prepared
        return predict(kernel, noise, x, z, r, x_new, self._jitter(prepared))

    def predict_covariance(self, prepared, x_new):
        raise ValueError(
            "`full_covariance=True` is not available with `inducing` (the inducing-point posterior's "
            "would be n_new × n_new): use the marginal variances, or sample_posterior(..., inducing=...) for draws"
        )

    def sample(self, key, prepared, x_new, num_samples):
        kernel, noise, x, r, z = prepared
        return sample(key, kernel, noise, x, z, r, self._jitter(prepared), x_new, num_samples)
