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
from gpgrad_jax._solver.base import Inapplicable, Solver, mesh_axis

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


def noise_blocks(root, q) -> Blocks:
    return Blocks(root, jnp.einsum("iab,iac->ibc", root, root), q)


def _over_points(value, axis):
    """``Σ_i`` over every point: the sum over this device's points, then over ``axis`` (the
    mesh axis the points are split along, inside ``shard_map``; ``None``: all points are here)."""
    return value if axis is None else jax.lax.psum(value, axis)


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


def _precision_sum(a, precision):
    """``Σ_i a_i a_iᵀ ⊗ Λ_i`` as ``(mp, mp)``: ``B`` without its ``I``."""
    m = a.shape[0]
    p = precision.shape[-1]
    if p == 1:  # the isotropic case: one m × m product
        return (a * precision[:, 0, 0]) @ a.T
    return jnp.einsum("ji,iab,li->jalb", a, precision, a).reshape(m * p, m * p)


def bound(kernel, root, q, x, z, r, jitter, axis=None, n_total=None) -> Bound:
    """The forward pass: ``F_L`` in O(n m² p²) time and O(n m) memory, from the noise roots
    ``B_i`` (``root``, ``(n, p, p)``, shared by ``q`` columns).

    ``axis``: run inside ``shard_map`` on this device's points (``n_total`` of them in all), the
    four sums over points reduced across the mesh axis; ``A`` and ``k(x_i, x_i)`` stay with their
    points, everything ``m × m`` is the same on every device.
    """
    n, dim = r.shape
    n_total = n if n_total is None else n_total
    m = z.shape[0]
    blocks = noise_blocks(root, q)
    p = blocks.precision.shape[-1]
    residual = r.reshape(n, p, q)
    rho = blocks.precision @ residual  # Λ_i r_i
    chol_z = cholesky(_jittered_gram(kernel, z, jitter))
    a = chol_z.inverse @ kernel.matrix(z, x)
    kernel_diagonal = jax.vmap(kernel.evaluate)(x, x)
    trace = q * jnp.trace(blocks.precision, axis1=-2, axis2=-1)
    core, c, data_term, leftover_term = _over_points(
        (
            _precision_sum(a, blocks.precision),
            jnp.einsum("ji,iaq->jaq", a, rho).reshape(m * p, q),
            jnp.sum(residual * rho),
            jnp.sum(trace * (kernel_diagonal - jnp.sum(a * a, axis=0))),
        ),
        axis,
    )
    chol_b = cholesky(core + jnp.eye(m * p, dtype=core.dtype))
    beta = chol_b.solve(c)
    value = (
        -0.5 * data_term
        + 0.5 * jnp.sum(c * beta)
        - 0.5 * q * chol_b.log_det()
        - 0.5 * n_total * dim * math.log(2.0 * math.pi)
        - 0.5 * leftover_term
    )
    return Bound(value, chol_z, a, chol_b, beta.reshape(m, p, q), kernel_diagonal)


def bound_of(kernel, noise, x, z, r, jitter) -> Bound:
    """``bound`` of a noise model on one device."""
    root, q = noise.observation_blocks(*r.shape)
    return bound(kernel, root, q, x, z, r, jitter)


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


def blocked_point_terms(kernel, root, q, x, z, r, fwd: Bound, want_kernel, want_noise, points_per_block=None, axis=None):
    """``point_terms`` over this device's points, a block at a time (a ``lax.scan`` over full
    blocks, then the remainder): the per-pair arrays never exceed one block, whatever n. The sums
    over points are reduced across ``axis`` (see ``bound``); the per-point rows stay local."""
    n = r.shape[0]
    m = z.shape[0]
    blocks = noise_blocks(root, q)
    shared = shared_terms(fwd)
    if axis is not None:
        # As this device's: the kernel VJP's cotangents are then this device's sums, reduced
        # once below (autodiff would reduce a replicated kernel's in every block).
        kernel = jax.lax.pcast(kernel, axis, to="varying")
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
    sums = _over_points(functools.reduce(_sum_trees, [s for s, _ in parts]), axis)
    rows = jax.tree_util.tree_map(lambda *r: jnp.concatenate(r), *[r for _, r in parts])
    grad_z, kernel_bar, a_bar_a = sums
    grad_x, residual_bar, root_bar = rows
    return PointTerms(grad_x, residual_bar, root_bar, grad_z, kernel_bar, a_bar_a), shared


class Points(NamedTuple):
    """How the points are laid out: split along ``axis`` (a name or a tuple of names) of
    ``mesh`` over its ``devices``, ``n`` of them in all (the arrays may carry padding beyond)."""

    mesh: Any
    axis: Any
    devices: int
    n: int


def _bound_specs(axis):
    whole = jax.sharding.PartitionSpec()
    return Bound(whole, whole, jax.sharding.PartitionSpec(None, axis), whole, whole, jax.sharding.PartitionSpec(axis))


def _run_forward(kernel, root, x, z, r, q, jitter, points: Points | None) -> Bound:
    """``bound`` on one device, or on every device of ``points.mesh`` over its own points."""
    if points is None:
        return bound(kernel, root, q, x, z, r, jitter)
    spec, whole = jax.sharding.PartitionSpec(points.axis), jax.sharding.PartitionSpec()
    local = lambda k, b, xs, zs, rs: bound(k, b, q, xs, zs, rs, jitter, points.axis, points.n)  # noqa: E731
    return jax.shard_map(
        local, mesh=points.mesh, in_specs=(whole, spec, spec, whole, spec), out_specs=_bound_specs(points.axis)
    )(kernel, root, x, z, r)


_forward = jax.jit(_run_forward, static_argnums=(5, 6, 7))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def precision_form_bound(kernel, root, x, z, r, q, jitter, points_per_block=None, points=None):
    """``F_L`` from the noise roots ``B_i`` (``(n, p, p)``, shared by ``q`` columns), with its
    closed-form ``custom_vjp``; ``points``: the points split over a mesh (``Points``)."""
    return _forward(kernel, root, x, z, r, q, jitter, points).value


def _bound_fwd(kernel, root, x, z, r, q, jitter, points_per_block, points):
    # symbolic_zeros: the kernel's cotangent (a VJP of small functions) and the noise roots'
    # are computed only when asked for.
    (kernel, kernel_wanted), (root, root_wanted), (x, _), (z, _), (r, _) = map(unwrap_primals, (kernel, root, x, z, r))
    fwd = _forward(kernel, root, x, z, r, q, jitter, points)
    return fwd.value, (kernel_wanted, root_wanted, kernel, root, x, z, r, fwd)


def _bound_bwd(q, jitter, points_per_block, points, residuals, g):
    kernel_wanted, root_wanted, kernel, root, x, z, r, fwd = residuals
    return _backward(kernel_wanted, root_wanted, q, jitter, points_per_block, points, kernel, root, x, z, r, fwd, g)


def _local_backward(kernel_wanted, root_wanted, q, jitter, points_per_block, axis, kernel, root, x, z, r, fwd, g):
    terms, shared = blocked_point_terms(kernel, root, q, x, z, r, fwd, kernel_wanted, root_wanted, points_per_block, axis)
    gram = gram_cotangent(shared, fwd, terms.a_bar_a, jitter)
    d_zz = kernel.grad_first_matrix(z, z)
    grad_z = terms.grad_z + 2.0 * jnp.sum(gram.reshape(gram.shape + (1,) * (d_zz.ndim - 2)) * d_zz, axis=1)
    kernel_bar = root_bar = None
    if kernel_wanted:
        # θ̄ = ⟨G, ∂K_zx/∂θ⟩ + ⟨∂F/∂k_ii, ∂k_ii/∂θ⟩ (the blocks) + ⟨Ḡ_zz, ∂K_zz/∂θ⟩, indices fixed.
        _, gram_vjp = jax.vjp(lambda k: k.matrix(z, z), kernel)
        kernel_bar = jax.tree_util.tree_map(lambda a, b: g * (a + b), terms.kernel, gram_vjp(gram)[0])
    if root_wanted:
        root_bar = g * terms.root
    return kernel_bar, root_bar, g * terms.grad_x, g * grad_z, g * terms.residual


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _backward(kernel_wanted, root_wanted, q, jitter, points_per_block, points, kernel, root, x, z, r, fwd, g):
    if points is None:
        return _local_backward(kernel_wanted, root_wanted, q, jitter, points_per_block, None, kernel, root, x, z, r, fwd, g)
    spec, whole = jax.sharding.PartitionSpec(points.axis), jax.sharding.PartitionSpec()
    local = functools.partial(_local_backward, kernel_wanted, root_wanted, q, jitter, points_per_block, points.axis)
    return jax.shard_map(
        local,
        mesh=points.mesh,
        in_specs=(whole, spec, spec, whole, spec, _bound_specs(points.axis), whole),
        out_specs=(whole, spec, spec, whole, spec),
    )(kernel, root, x, z, r, fwd, g)


precision_form_bound.defvjp(_bound_fwd, _bound_bwd, symbolic_zeros=True)


def plain_precision_form_bound(kernel, noise, x, z, r, jitter):
    """The same forward computation with no custom rule: the autodiff baseline."""
    return bound_of(kernel, noise, x, z, r, jitter).value


# ------------------------------------------------------------------ the variational posterior


@functools.partial(jax.jit, static_argnums=(5, 7, 8))
def predict(kernel, root, x, z, r, q, x_new, jitter, points=None):
    """Mean offset ``(n_new, D)`` and marginal variance ``(n_new, D)`` of ``q(f_*)``.

    ``q(v) = N(β, B⁻¹ ⊗ I_q)`` for the whitened inducing values ``v = L_z⁻¹ u``, and
    ``f_* = a_*ᵀ v + (f_* − E[f_* | u])``: mean ``a_*ᵀ β``, variance
    ``k_** − ‖a_*‖² + (a_* ⊗ I)ᵀ B⁻¹ (a_* ⊗ I)``. O(n m² p² + n_new m² p²).
    """
    fwd = _run_forward(kernel, root, x, z, r, q, jitter, points)
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


@functools.partial(jax.jit, static_argnums=(6, 7, 9, 10))
def sample(key, kernel, root, x, z, r, q, jitter, x_new, num_samples, points=None):
    """Draws of ``q(f_*)``, ``(num_samples, n_new, D)``: ``v ~ q(v)`` shared by the points, then
    ``a_*ᵀ v`` plus the residual ``f_* − E[f_* | u]`` drawn point by point (its variance
    ``k_** − Q_**``), so every draw's marginals are ``predict``'s. O(n m² p² + n_new m p).
    """
    fwd = _run_forward(kernel, root, x, z, r, q, jitter, points)
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

    **One problem over many devices and hosts.** With ``mesh`` (a ``jax.sharding.Mesh``) the
    points — ``x``, ``y``, the noise blocks — are split along its axis ``axis`` (a name, or a
    tuple of names for an axis that spans e.g. hosts × devices; ``None`` for a mesh of one axis):
    each device runs the bound's per-point work on its own points, and the sums over points —
    ``m p × m p`` and ``m p × q`` statistics — are reduced across the axis (one all-reduce in the
    value, one in the gradient). Cotangents of ``x``, ``y`` and the noise stay with their points;
    those of ``Z`` and the kernel are reduced. No array of length ``n`` is gathered on one device.
    Under ``jax.distributed`` the mesh may span hosts: pass global arrays (e.g.
    ``jax.make_array_from_process_local_data``) laid out along the axis. ``n`` need not divide by
    the axis's size (the points are padded with points of zero precision, which add nothing),
    but a multiple of it avoids moving points between devices.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import gpgrad_jax as gg
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()), ("points",))
        >>> x = jnp.linspace(0.0, 5.0, 64)
        >>> k, nz, z = gg.kernels.Matern32(1.0, 1.0), gg.noise.Isotropic(0.1), jnp.linspace(0.0, 5.0, 8)
        >>> F = gg.inducing_bound(k, x, jnp.sin(x), nz, z, mesh=mesh, axis="points")
        >>> bool(jnp.allclose(F, gg.inducing_bound(k, x, jnp.sin(x), nz, z)))
        True
        >>> solver = gg.solvers.Inducing(z, mesh=mesh, axis="points")  # predict, sample_posterior
        >>> gg.predict(k, x, jnp.sin(x), nz, jnp.array([1.0, 2.0]), solver=solver)[0].shape
        (2,)
    """

    inducing: Any
    jitter: float | None = None
    points_per_block: int | None = None
    mesh: Any = None
    axis: Any = None

    name = "inducing"
    exact = False

    def __repr__(self):
        where = "" if self.mesh is None else f", mesh={dict(self.mesh.shape)}, axis={self.axis!r}"
        return f"Inducing(m={len(self.inducing)}, jitter={self.jitter!r}, points_per_block={self.points_per_block!r}{where})"

    def _points(self, n: int) -> Points | None:
        """The layout of ``n`` points over the mesh (``None`` without one), checked."""
        checked = mesh_axis(self.mesh, self.axis, "the points are")
        return None if checked is None else Points(self.mesh, checked[0], checked[1], n)

    def _laid_out(self, prepared):
        """``(kernel, root, x, z, r, q, points)``: the noise as its roots, padded to a multiple of
        the axis's size with points of zero precision (they add nothing to the bound, and their
        cotangents are dropped by autodiff of the padding)."""
        kernel, noise, x, r, z = prepared
        n, dim = r.shape
        root, q = noise.observation_blocks(n, dim)
        points = self._points(n)
        if points is not None:
            pad = -n % points.devices
            if pad:
                x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad, *x.shape[1:]))])
                r = jnp.concatenate([r, jnp.zeros((pad, dim), r.dtype)])
                root = jnp.concatenate([root, jnp.zeros((pad, *root.shape[1:]), root.dtype)])
        return kernel, root, x, z, r, q, points

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
        self._points(n)  # the mesh and axis, checked eagerly
        return Prepared(kernel, noise, x, r, z)

    def _jitter(self, prepared) -> float:
        jitter = self.jitter
        if jitter is None:
            return default_jitter(prepared.x.dtype)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not math.isfinite(jitter) or jitter < 0:
            raise ValueError(f"`jitter` must be a Python number >= 0 (relative to the mean of k(z, z)), got {jitter!r}")
        return float(jitter)

    def log_likelihood(self, prepared):
        kernel, root, x, z, r, q, points = self._laid_out(prepared)
        return precision_form_bound(kernel, root, x, z, r, q, self._jitter(prepared), self._points_per_block(), points)

    def _points_per_block(self):
        size = self.points_per_block
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"`points_per_block` must be a positive integer or None, got {size!r}")
        return size

    def plain_log_likelihood(self, prepared):
        kernel, noise, x, r, z = prepared
        return bound_of(kernel, noise, x, z, r, self._jitter(prepared)).value

    def predict(self, prepared, x_new):
        kernel, root, x, z, r, q, points = self._laid_out(prepared)
        return predict(kernel, root, x, z, r, q, x_new, self._jitter(prepared), points)

    def predict_covariance(self, prepared, x_new):
        raise ValueError(
            "`full_covariance=True` is not available with `inducing` (the inducing-point posterior's "
            "would be n_new × n_new): use the marginal variances, or sample_posterior(..., inducing=...) for draws"
        )

    def sample(self, key, prepared, x_new, num_samples):
        kernel, root, x, z, r, q, points = self._laid_out(prepared)
        return sample(key, kernel, root, x, z, r, q, self._jitter(prepared), x_new, num_samples, points)
