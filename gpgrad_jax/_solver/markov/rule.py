r"""The Markov solvers' closed-form rule: the gradient in O(n) from the smoothed marginals.

The value is the filter's (``forms.filter_pass``); the rule's ``custom_vjp`` takes the state-space
*blocks* of the kernel (``blocks``) as its differentiable input, so that autodiff of the kernel →
blocks conversion carries the blocks' cotangents to the kernel's leaves.

**Gradient.** Reading the same random function at a moved index,
``∂L/∂x_i = z_i · E[f'(x_i)|y] − tr(Λ_i Cov(f'(x_i), f(x_i)|y))`` with
``z_i = Λ_i (r_i − E[f(x_i)|y]) = B_iᵀ (o_i − C_i E[s_i|y])`` — the dense
``z ⊙ (Δz) − rowsum(M ⊙ Δ)`` written with the smoothed marginal of the state at ``x_i``, for the
blocks whose state holds ``f'`` (``slope_entry``). Also from the marginals: ``∂L/∂r_i = −z_i``,
``∂L/∂B_i = −B_i (ρ_iρ_iᵀ + q Cov(f(x_i)|y))`` with ``ρ_i = r_i − E[f(x_i)|y]``, and the parameter
cotangents of blocks with a ``marginal_identity`` (Matérn 3/2 and 5/2:
``MaternBlock.cotangent_from_marginals``). With the factored marginals ``Cov(s|y) = left rightᵀ``,
``tr(Λ Cov(R s, f)) = Σ (B R left) ⊙ (C right)``.

**Every other block, and every other parameter** (Matérn 1/2, the SHO's parameters, Cosine,
products, users' blocks) takes the generic rule: the smoother's adjoints give every step's
``Ā_k = ν_k m_{k−1|k−1}ᵀ + 2Γ_k A_k P_{k−1|k−1}`` and ``Q̄_k = Γ_k`` (``step_cotangents``); the
block maps them to its parameters (``Block.cotangent_from_steps``: autodiff of its small per-step
functions, or a closed form — the curve block's, the product rule) and autodiff of those
functions in ``h`` maps them to the steps (``index_cotangents``; hence to ``x``). Where indices tie,
a kinked kernel gets the mean of the one-sided derivatives (``tie_correction``). ``docs/math.md``
section 4b has the derivation.

**Higher derivatives.** The rule's backward pass is itself differentiable (``jax.hessian``,
``jax.jacrev(jax.grad(f))``); the square-root form's derivatives are the covariance form's
(``forms.covariance_derivatives``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpgrad_jax._rules import unwrap_primals
from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._solver.markov import segments
from gpgrad_jax._solver.markov.diagnostics import check_finite, check_precision
from gpgrad_jax._solver.markov.forms import Scheme, covariance_derivatives, filter_pass, filtered_moments, smooth
from gpgrad_jax._solver.markov.model import (
    Layout,
    Model,
    Smoothed,
    build_model,
    layout,
    log_likelihood,
    pad_points,
    shift_back,
    shift_forward,
)

Array = Any


def setup(scheme: Scheme, blocks, noise, x, r):
    """``(layout, model)``: the blocks stacked, the points sorted and the model assembled."""
    n, dim = r.shape
    lay = layout(blocks, r.dtype)
    noise_roots, q = noise.observation_blocks(n, dim)
    p = noise_roots.shape[-1]
    presorted = scheme.segments is not None
    return lay, build_model(blocks, lay, x, noise_roots, r.reshape(n, p, q), scheme.square_root, presorted)


# ------------------------------------------------------------------------------ the value


@functools.partial(jax.jit, static_argnums=0)
def _forward(scheme: Scheme, blocks, noise, x, r):
    lay, model = setup(scheme, blocks, noise, x, r)
    filtered = filter_pass(model, lay, scheme)
    return log_likelihood(filtered.log_terms, model), (model, filtered)


_forward_pass = covariance_derivatives(_forward, with_state=True)


def forward(scheme: Scheme, blocks, noise, x, r):
    """``(L, (model, filtered))`` by the scheme's form; the square-root form checks its rounding
    estimate (``diagnostics.check_precision``)."""
    value, state = _forward_pass(scheme, blocks, noise, x, r)
    if scheme.square_root:
        check_precision(state[1].spread, r.dtype)
    return value, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def log_marginal_likelihood(scheme: Scheme, blocks, noise, x, r):
    """``L`` by the Kalman filter; its ``custom_vjp`` is the closed form from the smoother."""
    value, _ = forward(scheme, blocks, noise, x, r)
    check_finite(value)
    return value


def _lml_fwd(scheme, blocks, noise, x, r):
    # symbolic_zeros: each argument says whether anybody asked for its cotangent; the blocks' and
    # the noise's are computed only then (eager calls get no dead-code elimination).
    (blocks, blocks_wanted), (noise, noise_wanted), (x, _), (r, _) = map(unwrap_primals, (blocks, noise, x, r))
    value, state = forward(scheme, blocks, noise, x, r)
    check_finite(value)
    return value, ((blocks_wanted, noise_wanted), blocks, noise, x, r, state)


def _lml_bwd(scheme, residuals, g):
    wants, blocks, noise, x, r, state = residuals
    result = cotangents(scheme, wants, blocks, noise, x, r, state, g)
    check_finite(result)
    return result


log_marginal_likelihood.defvjp(_lml_fwd, _lml_bwd, symbolic_zeros=True)


def index_gradient(scheme: Scheme, blocks, noise, x, r):
    """``(L, ∇ₓL)`` from the filter and smoother, evaluated explicitly."""
    value, state = forward(scheme, blocks, noise, x, r)
    grad_x = cotangents(scheme, (False, False), blocks, noise, x, r, state, jnp.ones((), r.dtype))[2]
    check_finite((value, grad_x))
    return value, grad_x


# ------------------------------------------------------------------------------- the rule


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backward(scheme: Scheme, wants, blocks, noise, x, r, state, g):
    """``(blocks, noise, x, r)`` cotangents of ``g · L`` (``None`` for the blocks' or the noise's
    unless ``wants`` says so) from the forward pass's ``state``."""
    want_blocks, want_noise = wants
    model, filtered = state
    n, dim = r.shape
    lay = layout(blocks, r.dtype)
    want_adjoints = any(_needs_steps(block, want_blocks) for block in blocks)
    smoothed = smooth(filtered, model, lay, scheme, want_adjoints)
    grad_x, identity_terms, marginals = marginal_terms(smoothed, model, lay, blocks, want_blocks)
    moments = filtered_moments(filtered, smoothed, scheme) if want_adjoints else None
    blocks_bar, steps_grad_x = block_and_index_cotangents(
        blocks, lay, identity_terms, smoothed, moments, model, want_blocks, scheme.segments
    )
    grad_x = grad_x + steps_grad_x

    noise_bar = None
    if want_noise:
        noise_roots_bar = _unsort(-marginals.noise_pull, model)
        _, noise_vjp = jax.vjp(lambda nz: nz.observation_blocks(n, dim)[0], noise)
        (noise_bar,) = noise_vjp(g * noise_roots_bar)
    if want_blocks:
        blocks_bar = jax.tree_util.tree_map(lambda c: g * c, blocks_bar)
    x_bar = g * _unsort(grad_x, model)
    r_bar = -g * _unsort(marginals.z, model).reshape(n, dim)
    return blocks_bar if want_blocks else None, noise_bar, x_bar, r_bar


def _backward_in_covariances(scheme: Scheme, wants, blocks, noise, x, r, state, g):
    # The covariance form's cotangents from the covariance form's own state.
    covariances = scheme.in_covariances()
    _, covariance_state = _forward(covariances, blocks, noise, x, r)
    return _backward(covariances, wants, blocks, noise, x, r, covariance_state, g)


cotangents = covariance_derivatives(_backward, static=2, in_covariances=_backward_in_covariances)


def _needs_steps(block, want_blocks: bool) -> bool:
    """Whether the block's cotangents need every step's ``(Ā_k, Q̄_k)`` (the smoother's adjoints):
    its index gradient without a slope identity, or its parameters without a marginal identity."""
    return block.slope_entry is None or (want_blocks and not block.marginal_identity)


def _unsort(values, model: Model):
    """Per-point values back in the caller's order."""
    if model.is_sorted is True:  # presorted: nothing to undo (and no scatter compiled)
        return values
    return jax.lax.cond(
        model.is_sorted, lambda: values, lambda: jnp.zeros_like(values).at[model.order].set(values)
    )


class Marginals(NamedTuple):
    """Per-point quantities of the rule, sorted order."""

    z: Array  # Λ (r − E f), (n, p, q)
    noise_pull: Array  # B (ρρᵀ + q Cov(f | y)), (n, p, p): minus the noise roots' cotangent


def _group_sum(a, lay: Layout, p: int, group):
    """``Σ_{j∈group}`` of each coordinate's state rows of ``a`` (``n, N, w``): ``(n, p, w)``.

    Static slices and sums: the same contraction with one-hot read-out vectors lowers to dots
    that XLA:CPU ran 20× slower inside the whole gradient program than alone.
    """
    n, _, width = a.shape
    a = a.reshape(n, p, lay.size, width)
    return sum(a[:, :, j, :] for j in group)


def value_covariance(smoothed: Smoothed, lay: Layout, p: int, group=None):
    """``Cov(H_g s_k, f(x_k) | y)``, ``(n, p, p)``: ``(H_g left)(H right)ᵀ``; by default
    (``group`` the value rows) ``Cov(f(x_k) | y)``."""
    h_left = _group_sum(smoothed.left, lay, p, lay.starts if group is None else group)
    if smoothed.right is None:
        return _t(_group_sum(_t(h_left), lay, p, lay.starts))
    return _mm(h_left, _t(_group_sum(smoothed.right, lay, p, lay.starts)))


def marginal_terms(smoothed: Smoothed, model: Model, lay: Layout, blocks, want_blocks: bool):
    """The slope identity's share of the index gradient (sorted), the (value, slope) terms of the
    blocks with a marginal identity (``None`` for the others, or when their cotangents are not
    wanted) and the marginals."""
    n, p, q = model.data.shape
    noise_roots = model.noise_roots
    z = _mm(_t(noise_roots), smoothed.whitened_residual)

    if smoothed.right is None:
        # Covariance form: read p × p covariances H_g P H_fᵀ and contract them with Λ — 1.7× fewer
        # flops than the factored route below (Matérn 3/2 at n = 10⁵: value_and_grad 27 → 12 ms).
        precision = _mm(_t(noise_roots), noise_roots)

        def trace_of(group):  # tr(Λ H_g P H_fᵀ)
            return jnp.sum(precision * _t(value_covariance(smoothed, lay, p, group)), axis=(-2, -1))
    else:

        def trace_of(group):  # Σ (B H_g G) ⊙ (C G): the factors' orthogonal transforms
            weighted = _mm(noise_roots, _group_sum(smoothed.left, lay, p, group))
            return jnp.sum(weighted * smoothed.c_right, axis=(-2, -1))

    def term(group):  # z·E[R s] − q tr(Λ Cov(R s, f)) per point
        return jnp.sum(z * _group_sum(smoothed.mean, lay, p, group), axis=(-2, -1)) - q * trace_of(group)

    slopes = [start + b.slope_entry for b, start in zip(blocks, lay.starts) if b.slope_entry is not None]
    grad_x = term(slopes) if slopes else jnp.zeros(n, model.x.dtype)
    identity_terms = [
        (term([start]), term([start + 1])) if want_blocks and b.marginal_identity else None for b, start in zip(blocks, lay.starts)
    ]
    rho = model.data - _group_sum(smoothed.mean, lay, p, lay.starts)
    if smoothed.right is None:
        b_cov = _mm(noise_roots, value_covariance(smoothed, lay, p))  # B Cov(f)
    else:
        b_cov = _mm(smoothed.c_right, _t(_group_sum(smoothed.left, lay, p, lay.starts)))
    noise_pull = _mm(smoothed.whitened_residual, _t(rho)) + q * b_cov
    return grad_x, identity_terms, Marginals(z, noise_pull)


def _coordinate_sum(a, p: int, k: int):
    """``Σ_a`` of the ``p`` diagonal ``(k, k)`` blocks of ``(n, p·k, p·k)`` matrices: the
    cotangent of a ``(k, k)`` matrix that every coordinate's dynamics share (``I_p ⊗ M``)."""
    n = a.shape[0]
    return jnp.einsum("najal->njl", a.reshape(n, p, k, p, k))


def step_cotangents(smoothed: Smoothed, filtered_mean, filtered_cov, model: Model, lay: Layout):
    r"""``(Ā_k, Q̄_k)``, the cotangents of every step's transition and process noise (``(n, k, k)``
    each, summed over the coordinates); ``Q̄_0`` is the first state's prior's.

    ``m⁻_k = A_k m_{k−1|k−1}`` and ``P⁻_k = A_k P_{k−1|k−1} A_kᵀ + Q_k`` are how ``A_k`` and ``Q_k``
    enter ``L``, with ``∂L/∂m⁻_k = ν_k`` and ``∂L/∂P⁻_k = Γ_k = ½(ν_kν_kᵀ − qN_k)`` from the
    smoother: ``Q̄_k = Γ_k``, ``Ā_k = ν_k m_{k−1|k−1}ᵀ + 2Γ_k A_k P_{k−1|k−1}``.
    """
    _, p, q = model.data.shape
    nu = smoothed.mean_adjoint
    twice_gamma = _mm(nu, _t(nu)) - q * smoothed.covariance_adjoint
    previous_mean, previous_cov = shift_forward(filtered_mean), shift_forward(filtered_cov)
    a_bar = _mm(nu, _t(previous_mean)) + _mm(_mm(twice_gamma, model.transition), previous_cov)
    return _coordinate_sum(a_bar, p, lay.size), _coordinate_sum(0.5 * twice_gamma, p, lay.size)


def index_cotangents(block, a_bar, q_bar, model: Model):
    """``(h̄, x̄₀)`` of one block from its steps' ``(Ā, Q̄)`` (``h̄`` for ``h_1 … h_{n−1}``), by forward
    mode through its per-step functions: step ``k`` depends on ``h_k`` alone, so one ``jax.jvp``
    gives every ``A'(h_k)``, ``Q'(h_k)``."""
    steps, first = model.h[1:], model.x[0]
    _, (a_dot, q_dot, prior_dot) = jax.jvp(block.per_step, (steps, first), (jnp.ones_like(steps), jnp.ones_like(first)))
    h_bar = jnp.sum(a_bar[1:] * a_dot + q_bar[1:] * q_dot, axis=(-2, -1))
    return h_bar, jnp.sum(q_bar[0] * prior_dot)


def _group_cumsum(values, starts, reverse=False, parts=None):
    """Inclusive prefix sums that restart where ``starts`` is true (``reverse``: suffix sums
    restarting where it marks a group's end), by an associative scan: exact per tie group
    (over the devices' segments with ``parts``)."""

    def combine(a, b):  # b follows a in the scan's direction; a group restarts at b's flag
        (va, fa), (vb, fb) = a, b
        flag = fb.reshape(fb.shape + (1,) * (vb.ndim - fb.ndim))
        return jnp.where(flag, vb, va + vb), fa | fb

    if parts is not None:
        return segments.associative_scan(combine, (values, starts), parts, reverse=reverse)[0]
    return jax.lax.associative_scan(combine, (values, starts), reverse=reverse)[0]


def tie_correction(slope, smoothed: Smoothed, model: Model, lay: Layout, z, parts=None):
    r"""What turns the sorted order's one-sided index gradient into the mean of the one-sided
    derivatives where indices tie, for kernels with a kink ``k'(0⁺) = κ ≠ 0`` (Matérn 1/2):
    ``κ (Σ_{j after i} G_ij − Σ_{j before i} G_ij)`` over the points ``j`` tied with ``i``, with
    ``G_ij = 2 ∂L/∂K_ij = z_i·z_j + q tr(Λ_i Cov(f(x_i)|y) Λ_j)`` (tied points share ``f``)."""
    n, p, q = model.data.shape
    noise_roots = model.noise_roots
    precision = _mm(_t(noise_roots), noise_roots)
    starts = (model.h > 0) | (jnp.arange(n) == 0)
    ends = shift_back(starts) | (jnp.arange(n) == n - 1)

    def after_minus_before(v):  # Σ_{j after} v_j − Σ_{j before} v_j within the tie group
        return _group_cumsum(v, ends, reverse=True, parts=parts) - _group_cumsum(v, starts, parts=parts)

    z_diff = after_minus_before(z)
    precision_diff = after_minus_before(precision)
    weighted = _mm(precision, value_covariance(smoothed, lay, p))
    pair = jnp.sum(z * z_diff, axis=(-2, -1)) + q * jnp.sum(_t(weighted) * precision_diff, axis=(-2, -1))
    return slope * pair


def block_and_index_cotangents(blocks, lay, identity_terms, smoothed, moments, model, want_blocks, parts=None):
    """The blocks' parameter cotangents (``None`` each unless ``want_blocks``) and the generic
    rule's share of the (sorted) index gradient: blocks without a slope identity, and the tie
    correction of kernels with a kink."""
    n = model.data.shape[0]
    grad_x = jnp.zeros(n, model.x.dtype)
    a_bar = q_bar = None
    if any(_needs_steps(block, want_blocks) for block in blocks):
        a_bar, q_bar = step_cotangents(smoothed, *moments, model, lay)
    out = []
    slope = jnp.zeros((), model.x.dtype)
    for block, (start, stop), terms in zip(blocks, lay.slices, identity_terms):
        bar = None
        if _needs_steps(block, want_blocks):
            part = (slice(None), slice(start, stop), slice(start, stop))
            block_a_bar, block_q_bar = a_bar[part], q_bar[part]
            if block.slope_entry is None:
                h_bar, first_bar = index_cotangents(block, block_a_bar, block_q_bar, model)
                h_bar = pad_points(h_bar, 1, 0)  # h_0 = 0 is no step
                grad_x = grad_x + h_bar - shift_back(h_bar)  # h_k = x_k − x_{k−1}
                grad_x = grad_x.at[0].add(first_bar)
                if block.may_kink():
                    slope = slope + block.kink_slope()
            if want_blocks and not block.marginal_identity:
                bar = block.cotangent_from_steps(block_a_bar, block_q_bar, model.h[1:], model.x[0])
        if want_blocks and block.marginal_identity:
            bar = block.cotangent_from_marginals(*terms, model.x)
        out.append(bar)
    if any(block.may_kink() and block.slope_entry is None for block in blocks):
        # Ties are rare in practice: the segmented scans run only when there is one.
        z = _mm(_t(model.noise_roots), smoothed.whitened_residual)
        grad_x = grad_x + jax.lax.cond(
            jnp.any(model.h[1:] == 0),
            lambda: tie_correction(slope, smoothed, model, lay, z, parts),
            lambda: jnp.zeros_like(grad_x),
        )
    return tuple(out), grad_x
