r"""The state-space solvers: the closed-form gradient in O(n) from smoothed marginals.

The model and the two forms of the Kalman filter and smoother that evaluate it are in
``gpgrad_jax._markov_model``, ``gpgrad_jax._kalman`` (covariances) and
``gpgrad_jax._kalman_sqrt`` (square roots). Which form runs is a static choice per dtype
(``default_square_root``): float32 uses square roots — the covariance form loses the
gradient there (``benchmarks/float32.py``: 2.6e-2 against 2.2e-5 on the camera-ray curve,
NaN against 6e-5 on a helix over wide gaps) — and float64 the covariance form, which is exact
in float64 and 2–20× faster on CPUs (``benchmarks/state_space.py``, ``docs/performance.md``).

**Gradient** (the rule). Reading the same random function at a moved index,
``∂L/∂x_i = z_i · E[f'(x_i)|y] − tr(Λ_i Cov(f'(x_i), f(x_i)|y))`` with
``z_i = Λ_i (r_i − E[f(x_i)|y]) = B_iᵀ (o_i − C_i E[s_i|y])`` — the dense
``z ⊙ (Δz) − rowsum(M ⊙ Δ)`` written with the smoothed marginal of the state at ``x_i``. Also
from the marginals: ``∂L/∂r_i = −z_i``, ``∂L/∂B_i = −B_i (ρ_iρ_iᵀ + Cov(f(x_i)|y))`` with
``ρ_i = r_i − E[f(x_i)|y]``; for a Matérn block ``c`` with variance ``v`` and lengthscale ``ℓ``
``∂L/∂v = (1/2v) Σ_i [z_i·E f_c(x_i) − tr(Λ_i Cov(f_c(x_i), f(x_i)|y))]`` and
``∂L/∂ℓ = −(1/ℓ) Σ_i (x_i − x̄) [z_i·E f'_c(x_i) − tr(Λ_i Cov(f'_c(x_i), f(x_i)|y))]``;
for the polynomial block the prior of the first state and the process noise enter ``L``
additively in ``P⁻``, so ``∂L/∂σ² = Σ_k ⟨½(ν_kν_kᵀ − qN_k), Q̃(h_k)⟩`` and the constant and
linear variances read ``½(ν_1ν_1ᵀ − qN_1)`` at the first point. With the factored marginals
``Cov(s|y) = left rightᵀ``, ``tr(Λ Cov(R s, f)) = Σ (B R left) ⊙ (C right)``.

**Any other block** (Matérn 1/2, SHO parameters, Cosine, Kronecker products, users' blocks:
``gpgrad_jax.state_space``) takes the generic rule: the smoother's adjoints give every step's
``Ā_k = ν_k m_{k−1|k−1}ᵀ + 2Γ_k A_k P_{k−1|k−1}`` and ``Q̄_k = Γ_k`` (``step_cotangents``),
autodiff of the block's small per-step functions maps them to its parameters (``jax.vjp``) and
to the steps ``h_k`` (``jax.jvp``; hence to ``x``), and where indices tie a kinked kernel gets the mean of the
one-sided derivatives (``tie_correction``). ``docs/math.md`` section 4b has the derivation.

**Higher derivatives.** The rule's backward pass is itself differentiable (``jax.hessian``,
``jax.jacrev(jax.grad(f))``). A factor of the process noise is not differentiable at a tie
(``L(h) ∝ √h``), so the square-root form's derivatives — of the value, of the rule's
cotangents and of ``predict`` — are those of the covariance form (``jax.custom_jvp``): the
same mathematical function, differentiable everywhere; first derivatives always come from
the square-root rule itself.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gpgrad_jax import _kalman, _kalman_sqrt
from gpgrad_jax._markov_model import (
    Layout,
    Model,
    Smoothed,
    build_model,
    layout,
    log_likelihood,
    shift_back,
    shift_forward,
)
from gpgrad_jax._rules import unwrap_primals
from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._statespace import Kronecker, Matern, Polynomial, may_kink, model_components, unit_cubic_noise
from gpgrad_jax._validation import check_finite_value, check_precision

Array = Any


def default_square_root(dtype) -> bool:
    """The form a dtype gets: square roots below float64."""
    return jnp.finfo(dtype).bits < 64


# ------------------------------------------------------------- the two forms


def _setup(kernel, noise, x, r, square_root):
    n, dim = r.shape
    components = model_components(kernel)
    lay = layout(components, r.dtype)
    blocks, q = noise.observation_blocks(n, dim)
    p = blocks.shape[-1]
    model = build_model(components, lay, x, blocks, r.reshape(n, p, q), square_root)
    return components, lay, model


def _filter(model, lay, parallel, square_root):
    if square_root:
        return (_kalman_sqrt.filter_parallel if parallel else _kalman_sqrt.filter_sequential)(model, lay)
    return (_kalman.filter_parallel if parallel else _kalman.filter_sequential)(model)


def _smooth(filtered, model, lay, parallel, square_root, want_adjoints) -> Smoothed:
    if square_root:
        return _kalman_sqrt.smooth(filtered, model, lay, parallel, want_adjoints)
    return _kalman.smooth(filtered, model, parallel)


# --------------------------------------------------------- closed-form terms


class Marginals(NamedTuple):
    """Per-point quantities of the rule, sorted order."""

    z: Array  # Λ (r − E f), (n, p, q)
    spread: Array  # B (ρρᵀ + q Cov(f | y)), (n, p, p): minus the blocks' cotangent


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


def _identity_index(component, generic: bool) -> bool:
    """Whether a block's share of the index gradient comes from the slope identity (its state
    holds ``f'``) rather than from the generic rule."""
    return not generic and component.slope_entry is not None


def _identity_parameters(component, generic: bool) -> bool:
    """Whether a block's parameter cotangents come from its own identity (Matérn, polynomial)."""
    return not generic and isinstance(component, (Matern, Polynomial))


def marginal_terms(smoothed: Smoothed, model: Model, lay: Layout, components, generic: bool = False):
    """The slope identity's share of the index gradient (sorted), the Matérn blocks' (value,
    slope) terms (``None`` for other blocks) and the marginals."""
    n, p, q = model.residual.shape
    blocks = model.blocks
    z = _mm(_t(blocks), smoothed.residual)

    if smoothed.right is None:
        # Covariance form: read p × p covariances H_g P H_fᵀ and contract them with Λ — 1.7× fewer
        # flops than the factored route below (Matérn 3/2 at n = 10⁵: value_and_grad 27 → 12 ms).
        precision = _mm(_t(blocks), blocks)

        def trace_of(group):  # tr(Λ H_g P H_fᵀ)
            return jnp.sum(precision * _t(value_covariance(smoothed, lay, p, group)), axis=(-2, -1))
    else:

        def trace_of(group):  # Σ (B H_g G) ⊙ (C G): the factors' orthogonal transforms
            weighted = _mm(blocks, _group_sum(smoothed.left, lay, p, group))
            return jnp.sum(weighted * smoothed.c_right, axis=(-2, -1))

    def term(group):  # z·E[R s] − q tr(Λ Cov(R s, f)) per point
        return jnp.sum(z * _group_sum(smoothed.mean, lay, p, group), axis=(-2, -1)) - q * trace_of(group)

    slopes = [start + c.slope_entry for c, start in zip(components, lay.starts) if _identity_index(c, generic)]
    grad_x = term(slopes) if slopes else jnp.zeros(n, model.x.dtype)
    terms = [
        jnp.stack([term([start]), term([start + 1])]) if _identity_parameters(c, generic) and isinstance(c, Matern) else None
        for c, start in zip(components, lay.starts)
    ]
    rho = model.residual - _group_sum(smoothed.mean, lay, p, lay.starts)
    if smoothed.right is None:
        b_cov = _mm(blocks, value_covariance(smoothed, lay, p))  # B Cov(f)
    else:
        b_cov = _mm(smoothed.c_right, _t(_group_sum(smoothed.left, lay, p, lay.starts)))
    spread = _mm(smoothed.residual, _t(rho)) + q * b_cov
    return grad_x, terms, Marginals(z, spread)


def _identity_cotangent(component, term, prior_block, model):
    """A Matérn block's or the polynomial block's parameter cotangents by their identities."""
    x = model.x
    if isinstance(component, Matern):
        value_term, slope_term = term
        variance_bar = jnp.sum(value_term) / (2.0 * component.variance)
        lengthscale_bar = -jnp.sum((x - jnp.mean(x)) * slope_term) / component.lengthscale
        return Matern(variance_bar, lengthscale_bar, component.order)
    steps = model.h.at[0].set(x[0])  # the first point's prior holds Q̃(x_1)
    cubic_bar = jnp.sum(prior_block * unit_cubic_noise(steps))
    first = prior_block[0]
    t = x[0]
    linear_bar = t * t * first[0, 0] + 2.0 * t * first[0, 1] + first[1, 1]
    return Polynomial(cubic_bar, linear_bar, first[0, 0])


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
    _, p, q = model.residual.shape
    nu, info = smoothed.nu, smoothed.info
    twice_gamma = _mm(nu, _t(nu)) - q * info
    previous_mean, previous_cov = shift_forward(filtered_mean), shift_forward(filtered_cov)
    a_bar = _mm(nu, _t(previous_mean)) + _mm(_mm(twice_gamma, model.transition), previous_cov)
    return _coordinate_sum(a_bar, p, lay.size), _coordinate_sum(0.5 * twice_gamma, p, lay.size)


def _per_step(component, steps, first_index):
    return component.transition(steps), component.process_noise(steps), component.initial(first_index)


def generic_cotangents(component, a_bar, q_bar, model: Model, want_parameters: bool):
    """``(θ̄, h̄, x̄₀)`` of one block from its steps' ``(Ā, Q̄)`` (``θ̄`` is ``None`` unless
    ``want_parameters``; ``h̄`` for ``h_1 … h_{n−1}``), by autodiff of its small per-step
    functions, vectorised over the steps: forward mode for ``h̄`` and ``x̄₀`` (step ``k`` depends
    on ``h_k`` alone, so one ``jax.jvp`` gives every ``A'(h_k)``, ``Q'(h_k)``), one ``jax.vjp``
    for the parameters."""
    steps, first = model.h[1:], model.x[0]
    _, (a_dot, q_dot, prior_dot) = jax.jvp(
        lambda h, t: _per_step(component, h, t), (steps, first), (jnp.ones_like(steps), jnp.ones_like(first))
    )
    h_bar = jnp.sum(a_bar[1:] * a_dot + q_bar[1:] * q_dot, axis=(-2, -1))
    first_bar = jnp.sum(q_bar[0] * prior_dot)
    parameters_bar = None
    if want_parameters:
        if isinstance(component, Kronecker):
            parameters_bar = _kronecker_cotangents(component, a_bar, q_bar, model)
        else:
            _, vjp = jax.vjp(lambda c: _per_step(c, steps, first), component)
            (parameters_bar,) = vjp((a_bar[1:], q_bar[1:], q_bar[0]))
    return parameters_bar, h_bar, first_bar


def _contract(bar, other, k1, k2, keep_first):
    """For ``M = X ⊗ Y`` with cotangent ``bar`` (``…, k1·k2, k1·k2``): ``X̄ = Σ bar ⊙ Y`` over
    ``Y``'s indices (``keep_first``) or ``Ȳ = Σ bar ⊙ X`` over ``X``'s — broadcast products and
    sums, not dots (see ``small_matmul``)."""
    split = bar.reshape(*bar.shape[:-2], k1, k2, k1, k2)
    if keep_first:
        return jnp.sum(split * other[..., None, :, None, :], axis=(-3, -1))
    return jnp.sum(split * other[..., :, None, :, None], axis=(-4, -2))


def _factor_steps(factor, steps):
    return factor.transition(steps), factor.process_noise(steps), factor.stationary()


def _kronecker_cotangents(component, a_bar, q_bar, model: Model):
    """The Kronecker block's parameter cotangents by the product rule on its factors, in closed
    form: ``A = A₁ ⊗ A₂``, ``Q = Q₁ ⊗ K₂ + P₁ ⊗ Q₂`` (``K₂ = A₂P₂A₂ᵀ``), prior ``P₁ ⊗ P₂``; then
    one ``jax.vjp`` per factor (its own small functions, not the products')."""
    first, second = component.first, component.second
    k1, k2 = first.size, second.size
    steps = model.h[1:]
    (a1, q1, p1), vjp1 = jax.vjp(_factor_steps, first, steps)
    (a2, q2, p2), vjp2 = jax.vjp(_factor_steps, second, steps)
    step_a, step_q, prior = a_bar[1:], q_bar[1:], q_bar[0]
    kept = _mm(_mm(a2, p2), _t(a2))
    a1_bar = _contract(step_a, a2, k1, k2, True)
    a2_bar = _contract(step_a, a1, k1, k2, False)
    q1_bar = _contract(step_q, kept, k1, k2, True)
    kept_bar = _contract(step_q, q1, k1, k2, False)
    q2_bar = _contract(step_q, jnp.broadcast_to(p1, q1.shape), k1, k2, False)
    p1_bar = jnp.sum(_contract(step_q, q2, k1, k2, True), axis=0) + _contract(prior, p2, k1, k2, True)
    # K₂ = A₂ P₂ A₂ᵀ with P₂ symmetric.
    a2_bar = a2_bar + _mm(_mm(kept_bar + _t(kept_bar), a2), p2)
    p2_bar = jnp.sum(_mm(_mm(_t(a2), kept_bar), a2), axis=0) + _contract(prior, p1, k1, k2, False)
    first_bar, _ = vjp1((a1_bar, q1_bar, p1_bar))
    second_bar, _ = vjp2((a2_bar, q2_bar, p2_bar))
    return Kronecker(first_bar, second_bar)


def _segmented_cumsum(values, starts, reverse=False):
    """Inclusive prefix sums that restart where ``starts`` is true (``reverse``: suffix sums
    restarting where it marks a segment's end), by an associative scan: exact per segment."""

    def combine(a, b):  # b follows a in the scan's direction; a segment restarts at b's flag
        (va, fa), (vb, fb) = a, b
        flag = fb.reshape(fb.shape + (1,) * (vb.ndim - fb.ndim))
        return jnp.where(flag, vb, va + vb), fa | fb

    return jax.lax.associative_scan(combine, (values, starts), reverse=reverse)[0]


def tie_correction(slope, smoothed: Smoothed, model: Model, lay: Layout, z):
    r"""What turns the sorted order's one-sided index gradient into the mean of the one-sided
    derivatives where indices tie, for kernels with a kink ``k'(0⁺) = κ ≠ 0`` (Matérn 1/2):
    ``κ (Σ_{j after i} G_ij − Σ_{j before i} G_ij)`` over the points ``j`` tied with ``i``, with
    ``G_ij = 2 ∂L/∂K_ij = z_i·z_j + q tr(Λ_i Cov(f(x_i)|y) Λ_j)`` (tied points share ``f``)."""
    n, p, q = model.residual.shape
    blocks = model.blocks
    precision = _mm(_t(blocks), blocks)
    starts = (model.h > 0) | (jnp.arange(n) == 0)
    ends = shift_back(starts) | (jnp.arange(n) == n - 1)

    def after_minus_before(v):  # Σ_{j after} v_j − Σ_{j before} v_j within the tie group
        return _segmented_cumsum(v, ends, reverse=True) - _segmented_cumsum(v, starts)

    z_diff = after_minus_before(z)
    precision_diff = after_minus_before(precision)
    weighted = _mm(precision, value_covariance(smoothed, lay, p))
    pair = jnp.sum(z * z_diff, axis=(-2, -1)) + q * jnp.sum(_t(weighted) * precision_diff, axis=(-2, -1))
    return slope * pair


def kink_slope(component):
    """``κ = k'(0⁺) = [A'(0) P∞]₀₀`` of a stationary block (0 where the paths are differentiable)."""
    stationary = component.stationary()
    zero = jnp.zeros((), stationary.dtype)
    _, derivative = jax.jvp(component.transition, (zero,), (jnp.ones_like(zero),))
    return (derivative @ stationary)[0, 0]


def kernel_and_index_cotangents(components, lay, terms, smoothed, filtered_moments, model, want_kernel, generic):
    """The blocks' parameter cotangents (``None`` unless ``want_kernel``) and the generic rule's
    share of the (sorted) index gradient: blocks without a slope identity, and the tie
    correction of kernels with a kink."""
    n = model.residual.shape[0]
    grad_x = jnp.zeros(n, model.x.dtype)
    need_steps = [
        (want_kernel and not _identity_parameters(c, generic)) or not _identity_index(c, generic) for c in components
    ]
    polynomial_prior = want_kernel and any(isinstance(c, Polynomial) and _identity_parameters(c, generic) for c in components)
    a_bar = q_bar = None
    if any(need_steps) or polynomial_prior:
        a_bar, q_bar = step_cotangents(smoothed, *filtered_moments, model, lay)
    out = []
    slope = jnp.zeros((), model.x.dtype)
    for component, (start, stop), term, needed in zip(components, lay.slices, terms, need_steps):
        bar = None
        if needed:
            block = (slice(None), slice(start, stop), slice(start, stop))
            want_parameters = want_kernel and not _identity_parameters(component, generic)
            bar, h_bar, x0_bar = generic_cotangents(component, a_bar[block], q_bar[block], model, want_parameters)
            if not _identity_index(component, generic):
                h_bar = jnp.concatenate([jnp.zeros(1, h_bar.dtype), h_bar])  # h_0 = 0 is no step
                grad_x = grad_x + h_bar - shift_back(h_bar)  # h_k = x_k − x_{k−1}
                grad_x = grad_x.at[0].add(x0_bar)
                if may_kink(component):
                    slope = slope + kink_slope(component)
        if want_kernel and _identity_parameters(component, generic):
            prior_block = q_bar[:, start:stop, start:stop] if isinstance(component, Polynomial) else None
            bar = _identity_cotangent(component, term, prior_block, model)
        out.append(bar if want_kernel else None)
    if any(may_kink(c) and not _identity_index(c, generic) for c in components):
        # Ties are rare in practice: the segmented scans run only when there is one.
        z = _mm(_t(model.blocks), smoothed.residual)
        grad_x = grad_x + jax.lax.cond(
            jnp.any(model.h[1:] == 0),
            lambda: tie_correction(slope, smoothed, model, lay, z),
            lambda: jnp.zeros_like(grad_x),
        )
    return tuple(out), grad_x


# ------------------------------------------------------------- custom_vjp rule


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(parallel, square_root, kernel, noise, x, r):
    _, lay, model = _setup(kernel, noise, x, r, square_root)
    filtered = _filter(model, lay, parallel, square_root)
    return log_likelihood(filtered.terms, model), (model, filtered)


def _zero_tangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _forward_sqrt(parallel, kernel, noise, x, r):
    return _forward(parallel, True, kernel, noise, x, r)


@_forward_sqrt.defjvp
def _forward_sqrt_jvp(parallel, primals, tangents):
    # The value's derivative by the covariance form. The state's is declared zero: each of
    # its consumers (the cotangents below) defines its own derivative the same way.
    value, state = _forward(parallel, True, *primals)
    _, value_dot = jax.jvp(lambda *args: _forward(parallel, False, *args)[0], primals, tangents)
    return (value, state), (value_dot, jax.tree_util.tree_map(_zero_tangent, state))


def forward(parallel, square_root, kernel, noise, x, r):
    """``(L, (model, filtered))`` by the chosen form; the square-root form checks its rounding
    estimate (``gpgrad_jax._validation.check_precision``)."""
    if square_root:
        value, state = _forward_sqrt(parallel, kernel, noise, x, r)
        check_precision("state-space", state[1].spread, r.dtype)
        return value, state
    return _forward(parallel, False, kernel, noise, x, r)


def _unsort(values, model: Model):
    """Per-point values back in the caller's order."""
    return jax.lax.cond(
        model.is_sorted, lambda: values, lambda: jnp.zeros_like(values).at[model.order].set(values)
    )


def _check(*results):
    """Eager check of concrete results: a non-finite value is a [``NumericalError``][gpgrad_jax.NumericalError], never a
    silent NaN (under ``jit`` results are tracers and this is skipped, as for the dense solver)."""
    for result in jax.tree_util.tree_leaves(results):
        if result is not None and not isinstance(result, jax.core.Tracer):
            check_finite_value(result)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def log_marginal_likelihood(parallel, square_root, kernel, noise, x, r):
    """``L`` by the Kalman filter; its ``custom_vjp`` is the closed form from the smoother."""
    value, _ = forward(parallel, square_root, kernel, noise, x, r)
    _check(value)
    return value


def _lml_fwd(parallel, square_root, kernel, noise, x, r):
    # symbolic_zeros: each argument says whether anybody asked for its cotangent; the
    # kernel's and the noise's are computed only then (eager calls get no dead-code elimination).
    (kernel, kernel_wanted), (noise, noise_wanted), (x, _), (r, _) = map(unwrap_primals, (kernel, noise, x, r))
    value, state = forward(parallel, square_root, kernel, noise, x, r)
    _check(value)
    return value, (kernel if kernel_wanted else None, noise if noise_wanted else None, kernel, noise, x, r, state)


def _lml_bwd(parallel, square_root, residuals, g):
    kernel_wanted, noise_wanted, kernel, noise, x, r, state = residuals
    want_kernel, want_noise = kernel_wanted is not None, noise_wanted is not None
    result = cotangents(parallel, square_root, want_kernel, want_noise, kernel, noise, x, r, state, g)
    _check(result)
    return result


log_marginal_likelihood.defvjp(_lml_fwd, _lml_bwd, symbolic_zeros=True)


def _filtered_moments(filtered, smoothed, square_root):
    """``(m_k|k, P_k|k)`` at every point, from either form."""
    if square_root:
        return filtered.mean, _mm(filtered.factor, _t(filtered.factor))
    return smoothed.filtered_mean, smoothed.filtered_cov


def _needs_adjoints(components, want_kernel, generic):
    return any(
        (want_kernel and not (_identity_parameters(c, generic) and isinstance(c, Matern))) or not _identity_index(c, generic)
        for c in components
    )


def backward(parallel, square_root, want_kernel, want_noise, kernel, noise, x, r, state, g, generic=False):
    """The closed-form rule's cotangents (see ``cotangents``); ``generic`` routes every block
    through the generic rule (the tests' check of the identities)."""
    model, filtered = state
    n, dim = r.shape
    components = model_components(kernel)
    lay = layout(components, r.dtype)
    want_adjoints = _needs_adjoints(components, want_kernel, generic)
    smoothed = _smooth(filtered, model, lay, parallel, square_root, want_adjoints)
    grad_x, terms, marginals = marginal_terms(smoothed, model, lay, components, generic)
    moments = _filtered_moments(filtered, smoothed, square_root) if want_adjoints else None
    component_bar, generic_grad_x = kernel_and_index_cotangents(
        components, lay, terms, smoothed, moments, model, want_kernel, generic
    )
    grad_x = grad_x + generic_grad_x

    kernel_bar = noise_bar = None
    if want_kernel:
        _, kernel_vjp = jax.vjp(model_components, kernel)
        (kernel_bar,) = kernel_vjp(jax.tree_util.tree_map(lambda c: g * c, component_bar))
    if want_noise:
        blocks_bar = _unsort(-marginals.spread, model)
        _, noise_vjp = jax.vjp(lambda nz: nz.observation_blocks(n, dim)[0], noise)
        (noise_bar,) = noise_vjp(g * blocks_bar)

    x_bar = g * _unsort(grad_x, model)
    r_bar = -g * _unsort(marginals.z, model).reshape(n, dim)
    return kernel_bar, noise_bar, x_bar, r_bar


_backward = jax.jit(backward, static_argnums=(0, 1, 2, 3), static_argnames=("generic",))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _cotangents_sqrt(parallel, want_kernel, want_noise, kernel, noise, x, r, state, g):
    return _backward(parallel, True, want_kernel, want_noise, kernel, noise, x, r, state, g)


@_cotangents_sqrt.defjvp
def _cotangents_sqrt_jvp(parallel, want_kernel, want_noise, primals, tangents):
    kernel, noise, x, r, _, g = primals
    result = _backward(parallel, True, want_kernel, want_noise, *primals)

    def by_covariances(kernel, noise, x, r, g):
        _, covariance_state = _forward(parallel, False, kernel, noise, x, r)
        return _backward(parallel, False, want_kernel, want_noise, kernel, noise, x, r, covariance_state, g)

    kernel_dot, noise_dot, x_dot, r_dot, _, g_dot = tangents
    _, result_dot = jax.jvp(by_covariances, (kernel, noise, x, r, g), (kernel_dot, noise_dot, x_dot, r_dot, g_dot))
    return result, result_dot


def cotangents(parallel, square_root, want_kernel, want_noise, kernel, noise, x, r, state, g):
    """``(kernel, noise, x, r)`` cotangents of ``g · L`` (``None`` for the kernel's or the noise's
    when not wanted) from the forward pass's ``state``."""
    if square_root:
        return _cotangents_sqrt(parallel, want_kernel, want_noise, kernel, noise, x, r, state, g)
    return _backward(parallel, False, want_kernel, want_noise, kernel, noise, x, r, state, g)


def index_gradient(parallel, square_root, kernel, noise, x, r):
    """``(L, ∇ₓL)`` from the filter and smoother, evaluated explicitly."""
    value, state = forward(parallel, square_root, kernel, noise, x, r)
    grad_x = cotangents(parallel, square_root, False, False, kernel, noise, x, r, state, jnp.ones((), r.dtype))[2]
    _check(value, grad_x)
    return value, grad_x


# ---------------------------------------------------------------- prediction


def _joint_model(kernel, noise, x, r, x_new, square_root):
    """The model of the data and ``x_new`` together: the new indices join as points with zero
    precision. Returns ``(components, layout, model, p, q)``."""
    n, dim = r.shape
    n_new = x_new.shape[0]
    components = model_components(kernel)
    lay = layout(components, r.dtype)
    blocks, q = noise.observation_blocks(n, dim)
    p = blocks.shape[-1]
    all_x = jnp.concatenate([x, x_new])
    all_blocks = jnp.concatenate([blocks, jnp.zeros((n_new, p, p), blocks.dtype)])
    all_r = jnp.concatenate([r.reshape(n, p, q), jnp.zeros((n_new, p, q), r.dtype)])
    return components, lay, build_model(components, lay, all_x, all_blocks, all_r, square_root), p, q


@functools.partial(jax.jit, static_argnums=(0, 1))
def _posterior_marginals(parallel, square_root, kernel, noise, x, r, x_new):
    n = x.shape[0]
    _, lay, model, p, _ = _joint_model(kernel, noise, x, r, x_new, square_root)
    filtered = _filter(model, lay, parallel, square_root)
    smoothed = _smooth(filtered, model, lay, parallel, square_root, False)
    f_mean = _unsort(_group_sum(smoothed.mean, lay, p, lay.starts), model)
    f_cov = _unsort(value_covariance(smoothed, lay, p), model)
    return f_mean[n:], f_cov[n:]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _posterior_marginals_sqrt(parallel, kernel, noise, x, r, x_new):
    return _posterior_marginals(parallel, True, kernel, noise, x, r, x_new)


@_posterior_marginals_sqrt.defjvp
def _posterior_marginals_sqrt_jvp(parallel, primals, tangents):
    result = _posterior_marginals(parallel, True, *primals)
    _, result_dot = jax.jvp(functools.partial(_posterior_marginals, parallel, False), primals, tangents)
    return result, result_dot


def posterior_marginals(parallel, square_root, kernel, noise, x, r, x_new):
    """Posterior mean ``(n_new, p, q)`` and ``Cov(f | y)`` ``(n_new, p, p)`` at ``x_new``."""
    if square_root:
        return _posterior_marginals_sqrt(parallel, kernel, noise, x, r, x_new)
    return _posterior_marginals(parallel, False, kernel, noise, x, r, x_new)


# ------------------------------------------------------------------ sampling


def _prior_states(model: Model, noise, parallel):
    """``s_k = A_k s_{k−1} + L_k ξ_k`` for standard normal ``ξ`` (``n, N, w``): prior draws of the
    state at every point, by a ``lax.scan`` or an associative scan of the affine maps."""
    shocks = _mm(model.noise_factor, noise)
    if parallel:

        def combine(first, second):
            a1, b1 = first
            a2, b2 = second
            return _mm(a2, a1), _mm(a2, b1) + b2

        return jax.lax.associative_scan(combine, (model.transition, shocks))[1]

    def step(state, inputs):
        transition, shock = inputs
        state = _mm(transition, state) + shock
        return state, state

    return jax.lax.scan(step, jnp.zeros_like(shocks[0]), (model.transition, shocks))[1]


@functools.partial(jax.jit, static_argnums=(0, 6))
def posterior_draws(parallel, key, kernel, noise, x, r, num_samples, x_new):
    """Draws of ``f(x_new) − μ`` from the posterior, ``(num_samples, n_new, D)``, in O(n + n_new).

    Pathwise conditioning (Matheron's rule): a prior draw ``s`` of the state at the data and the
    new indices together, simulated observations ``õ = C s + e``, and the posterior mean of the
    state given the data minus them, ``s + E[s | o − õ]`` — a draw from ``p(s | o)``. The posterior
    mean is linear in the observations, so all draws share one filter and smoother, their
    observations riding along as columns. Always the square-root form (the prior needs the
    process-noise factors anyway).
    """
    n, dim = r.shape
    n_new = x_new.shape[0]
    _, lay, model, p, q = _joint_model(kernel, noise, x, r, x_new, True)
    total, big = model.transition.shape[:2]
    width = num_samples * q
    prior_key, obs_key = jax.random.split(key)
    dtype = r.dtype
    states = _prior_states(model, jax.random.normal(prior_key, (total, big, width), dtype), parallel)
    simulated = _mm(model.obs_matrix, states) + jax.random.normal(obs_key, (total, p, width), dtype)
    observed = jnp.tile(model.obs, (1, 1, num_samples))  # column s·q + j: draw s, coordinate j
    model = model._replace(obs=observed - simulated)
    filtered = _filter(model, lay, parallel, True)
    smoothed = _smooth(filtered, model, lay, parallel, True, False)
    draws = _unsort(_group_sum(states + smoothed.mean, lay, p, lay.starts), model)[n:]  # (n_new, p, S·q)
    draws = draws.reshape(n_new, p, num_samples, q)
    return jnp.moveaxis(draws, 2, 0).reshape(num_samples, n_new, dim)


class MarkovSolver:
    """Markov kernels, block-diagonal noise, scalar indices; O(n) time and memory.

    ``square_root=None`` picks the form by dtype (``default_square_root``).
    """

    def __init__(self, parallel: bool, square_root: bool | None = None):
        self.parallel = parallel
        self.square_root = square_root
        self.name = "markov-parallel" if parallel else "markov"

    def _form(self, r):
        return default_square_root(r.dtype) if self.square_root is None else self.square_root

    def log_marginal_likelihood(self, kernel, noise, x, r):
        return log_marginal_likelihood(self.parallel, self._form(r), kernel, noise, x, r)

    def plain_log_marginal_likelihood(self, kernel, noise, x, r):
        """The same filter with no custom rule: the autodiff baseline."""
        return _forward(self.parallel, self._form(r), kernel, noise, x, r)[0]

    def index_gradient(self, kernel, noise, x, r):
        return index_gradient(self.parallel, self._form(r), kernel, noise, x, r)

    def predict(self, kernel, noise, x, r, x_new):
        """Posterior mean offset and per-coordinate variance at ``x_new``, each ``(n_new, D)``."""
        mean, cov = posterior_marginals(self.parallel, self._form(r), kernel, noise, x, r, x_new)
        n_new, p, q = mean.shape
        variance = jnp.broadcast_to(jnp.diagonal(cov, axis1=-2, axis2=-1)[..., None], (n_new, p, q))
        return mean.reshape(n_new, p * q), variance.reshape(n_new, p * q)

    def sample(self, key, kernel, noise, x, r, x_new, num_samples):
        """Posterior draws of the latent offset at ``x_new``, ``(num_samples, n_new, D)``, O(n + n_new)."""
        return posterior_draws(self.parallel, key, kernel, noise, x, r, num_samples, x_new)
