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
from gpgrad_jax._markov_model import Layout, Model, Smoothed, build_model, layout, log_likelihood
from gpgrad_jax._rules import unwrap_primals
from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._statespace import Matern, Polynomial, state_space, unit_cubic_noise
from gpgrad_jax._validation import check_finite_value, check_state_space_precision

Array = Any


def default_square_root(dtype) -> bool:
    """The form a dtype gets: square roots below float64."""
    return jnp.finfo(dtype).bits < 64


# ------------------------------------------------------------- the two forms


def _setup(kernel, noise, x, r, square_root):
    n, dim = r.shape
    components = state_space(kernel)
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


def marginal_terms(smoothed: Smoothed, model: Model, lay: Layout, components):
    """The index gradient (sorted), per-component (value, slope) terms and the marginals."""
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

    # Read-outs: the total slope, then each component's value and slope.
    groups = [[start + 1 for start in lay.starts]] + [[j] for start in lay.starts for j in (start, start + 1)]
    terms = jnp.stack([term(group) for group in groups])
    rho = model.residual - _group_sum(smoothed.mean, lay, p, lay.starts)
    if smoothed.right is None:
        b_cov = _mm(blocks, value_covariance(smoothed, lay, p))  # B Cov(f)
    else:
        b_cov = _mm(smoothed.c_right, _t(_group_sum(smoothed.left, lay, p, lay.starts)))
    spread = _mm(smoothed.residual, _t(rho)) + q * b_cov
    return terms[0], terms[1:].reshape(len(components), 2, n), Marginals(z, spread)


def _prior_gradients(smoothed: Smoothed, p: int, k: int):
    """``½(ν_kν_kᵀ − q N_k)``, the gradient in ``P⁻_k``, summed over the ``p`` coordinates: (n, k, k)."""
    n, _, q = smoothed.nu.shape
    nu = smoothed.nu.reshape(n, p, k, q)
    info = smoothed.info.reshape(n, p, k, p, k)
    outer = jnp.einsum("najq,nalq->njl", nu, nu)
    return 0.5 * (outer - q * jnp.einsum("najal->njl", info))


def component_cotangents(components, lay, terms, smoothed, model):
    """Cotangents of the components' parameters, in the components' own structure."""
    _, p, _ = model.residual.shape
    x = model.x
    prior_grad = None
    out = []
    for index, (component, (start, stop)) in enumerate(zip(components, lay.slices)):
        value_term, slope_term = terms[index]
        if isinstance(component, Matern):
            variance_bar = jnp.sum(value_term) / (2.0 * component.variance)
            lengthscale_bar = -jnp.sum((x - jnp.mean(x)) * slope_term) / component.lengthscale
            out.append(Matern(variance_bar, lengthscale_bar, component.order))
        elif isinstance(component, Polynomial):
            if prior_grad is None:
                prior_grad = _prior_gradients(smoothed, p, lay.size)
            block = prior_grad[:, start:stop, start:stop]
            steps = model.h.at[0].set(x[0])  # the first point's prior holds Q̃(x_1)
            cubic_bar = jnp.sum(block * unit_cubic_noise(steps))
            first = block[0]
            t = x[0]
            linear_bar = t * t * first[0, 0] + 2.0 * t * first[0, 1] + first[1, 1]
            out.append(Polynomial(cubic_bar, linear_bar, first[0, 0]))
        else:  # pragma: no cover - state_space only yields the two kinds above
            raise TypeError(type(component).__name__)
    return tuple(out)


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
    estimate (``gpgrad_jax._validation.check_state_space_precision``)."""
    if square_root:
        value, state = _forward_sqrt(parallel, kernel, noise, x, r)
        check_state_space_precision(state[1].spread, r.dtype)
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


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _backward(parallel, square_root, want_kernel, want_noise, kernel, noise, x, r, state, g):
    model, filtered = state
    n, dim = r.shape
    components = state_space(kernel)
    lay = layout(components, r.dtype)
    want_adjoints = want_kernel and any(isinstance(c, Polynomial) for c in components)
    smoothed = _smooth(filtered, model, lay, parallel, square_root, want_adjoints)
    grad_x, terms, marginals = marginal_terms(smoothed, model, lay, components)

    kernel_bar = noise_bar = None
    if want_kernel:
        component_bar = component_cotangents(components, lay, terms, smoothed, model)
        _, kernel_vjp = jax.vjp(state_space, kernel)
        (kernel_bar,) = kernel_vjp(jax.tree_util.tree_map(lambda c: g * c, component_bar))
    if want_noise:
        blocks_bar = _unsort(-marginals.spread, model)
        _, noise_vjp = jax.vjp(lambda nz: nz.observation_blocks(n, dim)[0], noise)
        (noise_bar,) = noise_vjp(g * blocks_bar)

    x_bar = g * _unsort(grad_x, model)
    r_bar = -g * _unsort(marginals.z, model).reshape(n, dim)
    return kernel_bar, noise_bar, x_bar, r_bar


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
    components = state_space(kernel)
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
