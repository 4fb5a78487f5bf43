r"""The square-root Kalman filter and smoother: covariances carried as factors, combined by QR.

Same model as ``covariance`` (the covariance form): over the sorted indices
``s_k = A_k s_{k−1} + L_k ξ_k`` with ``L_k L_kᵀ = Q_k`` (``A_0 = 0``, ``L_0`` the first state's
prior factor) and whitened observations ``o_k = B_k r_k = C_k s_k + e_k``, ``C_k = B_k H``,
``e_k ~ N(0, I)``. Every covariance is a factor ``P = S Sᵀ`` and every update one orthogonal
triangularisation (``tria``, ``gpgrad_jax._smallmatrix.triangularize``) of a pre-array:

* **filter** — ``S⁻ = tria([A S, L])``, then
  ``[[I, C S⁻], [0, S⁻], [I, 0]] Θ = [[R, 0], [K̄, S⁺], [R⁻ᵀ, −C S⁺]]``: ``R Rᵀ = U``, the gain
  ``K = K̄ R⁻¹``, the filtered factor ``S⁺`` and — from the carried rows ``[I, 0]`` — ``C S⁺`` and
  the filtered whitened residual ``o − C m⁺ = R⁻ᵀ R⁻¹ v`` as orthogonal transforms of exact
  numbers, never as ``C`` times a factor (``C S⁺`` is small where the data pin the state and
  ``S⁺`` large along what they do not see: the product would lose the small part);
* **backward information filter** — the data after point ``k`` as a pseudo-observation
  ``ỹ_k = W_k s_k + ε``, ``ε ~ N(0, I)`` (square-root information form): from
  ``(W', ỹ')`` of ``s_{k+1}`` the process noise ``ξ`` is eliminated by QR of
  ``[[I, 0 | 0], [W'L, W'A | ỹ']]`` and point ``k``'s own rows ``[C_k | o_k]`` are merged in by
  another; nothing is inverted;
* **smoothed marginals** — the filtered moments updated with that pseudo-observation, again
  one ``tria`` with carried rows ``[0, C S⁺]``: the smoothed factor ``G`` with ``C G``, and the
  smoothed whitened residual ``o − C E[s|y]`` as the filtered one minus a correction
  (a disturbance smoother: the residual is never a difference of two large means).

``"markov-parallel"`` runs the filter and the backward information filter as associative
scans of the same elements (the square-root form of Särkkä & García-Fernández 2021's
filtering elements, with the likelihood part as a pseudo-observation); what follows them is
shared with the sequential form.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import solve_lower, solve_lower_transposed, triangularize
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._solver.markov import native, segments
from gpgrad_jax._solver.markov.model import Smoothed, read_values, rows, shift_back, shift_forward, split

Array = Any


class Filtered(NamedTuple):
    """Filtered moments at every point (sorted order)."""

    mean: Array  # m_k|k, (n, N, q)
    factor: Array  # S_k|k, (n, N, N)
    c_factor: Array  # C_k S_k|k, (n, p, N)
    whitened_residual: Array  # o_k − C_k m_k|k, (n, p, q)
    log_terms: Array  # −½ vᵀU⁻¹v − (q/2) log|U|, (n,)
    spread: Array  # ‖o_k‖ + ‖C_k S⁻_k‖, (n,): what the rounding of o and of the mean scales with


def _unit_pre_array(top, carried):
    """``[[I, top], carried]`` for ``triangularize`` with unit pivots; ``carried`` rows are
    ``(left, right)`` blocks of widths ``r`` and ``top``'s."""
    r = top.shape[-2]
    eye = jnp.broadcast_to(jnp.eye(r, dtype=top.dtype), (*top.shape[:-2], r, r))
    rows = [jnp.concatenate([eye, top], axis=-1)]
    rows += [jnp.concatenate(pair, axis=-1) for pair in carried]
    return jnp.concatenate(rows, axis=-2)


def _update(pred_mean, pred_factor, noise_roots, obs, layout):
    """The observation update of one point (batched): the fields of ``Filtered``."""
    p, q = obs.shape[-2:]
    big = pred_factor.shape[-1]
    dtype = obs.dtype
    c_pred = _mm(noise_roots, read_values(pred_factor, layout, p))  # C S⁻, (p, N)
    batch = pred_factor.shape[:-2]
    eye = jnp.broadcast_to(jnp.eye(p, dtype=dtype), (*batch, p, p))
    carried = [(jnp.zeros((*batch, big, p), dtype), pred_factor), (eye, jnp.zeros((*batch, p, big), dtype))]
    post = triangularize(_unit_pre_array(c_pred, carried), p, unit_pivots=True)
    root = post[..., :p, :p]  # R, R Rᵀ = U (negative diagonal)
    gain = post[..., p : p + big, :p]  # K̄ = S⁻ (C S⁻)ᵀ R⁻ᵀ
    factor = post[..., p : p + big, p:]
    c_factor = -post[..., p + big :, p:]
    innovation = obs - _mm(noise_roots, read_values(pred_mean, layout, p))
    # By substitution, not with the R⁻ᵀ the carried rows also hold: across a wide gap R is
    # large and v too, and R⁻ᵀ's absolute rounding times v cost the float32 value 1e-4.
    whitened = solve_lower(root, innovation)  # R⁻¹ v
    mean = pred_mean + _mm(gain, whitened)
    whitened_residual = solve_lower_transposed(root, whitened)  # U⁻¹ v = o − C m⁺
    log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(root, axis1=-2, axis2=-1))), axis=-1)
    term = -0.5 * jnp.sum(whitened * whitened, axis=(-2, -1)) - q * log_det
    spread = jnp.sqrt(jnp.sum(obs * obs, axis=(-2, -1))) + jnp.sqrt(jnp.sum(c_pred * c_pred, axis=(-2, -1)))
    return mean, factor, c_factor, whitened_residual, term, spread


def _predict(transition, noise_factor, mean, factor):
    """``(A m, tria([A S, L]))``, batched."""
    big = factor.shape[-1]
    joint = jnp.concatenate([_mm(transition, factor), noise_factor], axis=-1)
    return _mm(transition, mean), triangularize(joint)[..., :big]


def _filtered_shapes(model):
    _, p, q = model.obs.shape
    big = model.transition.shape[-1]
    return [(big, q), (big, big), (p, big), (p, q), (), ()]


def _filter_scan(inputs, init, layout, shapes):
    def step(carry, inputs):
        transition, noise_factor, noise_roots, obs = inputs
        pred_mean, pred_factor = _predict(transition, noise_factor, *carry)
        out = _update(pred_mean, pred_factor, noise_roots, obs, layout)
        return out[:2], rows(*out)

    _, stacked = jax.lax.scan(step, init, inputs)
    return split(stacked, shapes)


def filter_sequential(model, layout, parts=None, native: bool = False) -> Filtered:
    """The filter as one sequential pass: the native custom call (``native``) or a ``lax.scan``
    (over contiguous segments: ``parts``, see ``segments``)."""
    big = model.transition.shape[-1]
    q = model.obs.shape[-1]
    dtype = model.obs.dtype
    zero = (jnp.zeros((big, q), dtype), jnp.zeros((big, big), dtype))
    inputs = (model.transition, model.process_noise_factor, model.noise_roots, model.obs)
    shapes = _filtered_shapes(model)
    if native:
        return Filtered(*_filter_native(layout, shapes)(*inputs, model.obs_matrix))
    if parts is None:
        return Filtered(*_filter_scan(inputs, zero, layout, shapes))
    # A range's composed element gives the filtered mean and factor (offset, factor) after it.
    run = lambda xs, init: _filter_scan(xs, init, layout, shapes)  # noqa: E731
    entry = lambda total: (total[1], total[2])  # noqa: E731
    return Filtered(*segments.scan(run, inputs, _elements(model, layout), _combine, entry, zero, parts))


def _filter_native(layout, shapes):
    """The native filter pass, with the ``lax.scan`` as its reference (other platforms, derivatives)."""

    def reference(transition, noise_factor, noise_roots, obs, obs_matrix):
        del obs_matrix
        big, q = shapes[0]
        zero = (jnp.zeros((big, q), obs.dtype), jnp.zeros((big, big), obs.dtype))
        return tuple(_filter_scan((transition, noise_factor, noise_roots, obs), zero, layout, shapes))

    def call(transition, noise_factor, noise_roots, obs, obs_matrix):
        del noise_roots
        return native.square_root_filter_call(transition, noise_factor, obs_matrix, obs)

    return native.with_reference(call, reference)


# -------------------------------------------------- backward information filter


def _time_update(transition, noise_factor, info_root, info_obs):
    """The pseudo-observation ``(W, ỹ)`` of ``s_k`` from that of ``s_{k+1} = A s_k + L ξ``:
    ``ξ ~ N(0, I)`` eliminated by QR (batched)."""
    big = transition.shape[-1]
    q = info_obs.shape[-1]
    batch = transition.shape[:-2]
    dtype = transition.dtype
    # Columns are observations: the prior of ξ (I) and the N pseudo-observation rows.
    top = _t(_mm(info_root, noise_factor))  # (W' L)ᵀ
    carried = [
        (jnp.zeros((*batch, big, big), dtype), _t(_mm(info_root, transition))),  # (W' A)ᵀ
        (jnp.zeros((*batch, q, big), dtype), _t(info_obs)),  # ỹ'ᵀ
    ]
    post = triangularize(_unit_pre_array(top, carried), big, unit_pivots=True)
    return _t(post[..., big : 2 * big, big:]), _t(post[..., 2 * big :, big:])


def _merge(info_root, info_obs, obs_matrix, obs):
    """Rows ``[W; C | ỹ; o]`` compressed to ``N`` rows by QR (batched)."""
    big = info_root.shape[-1]
    columns = jnp.concatenate(
        [jnp.concatenate([_t(info_root), _t(obs_matrix)], axis=-1), jnp.concatenate([_t(info_obs), _t(obs)], axis=-1)],
        axis=-2,
    )
    post = triangularize(columns, big)
    return _t(post[..., :big, :big]), _t(post[..., big:, :big])


def _information_scan(inputs, init, want_including: bool):
    """The backward information filter as a reverse ``lax.scan`` from ``init``, the pseudo-
    observation after the last point: ``(W, ỹ)`` after each point (and from it on)."""
    transition, _, _, obs = inputs
    big, q = transition.shape[-1], obs.shape[-1]

    def step(carry, inputs):
        transition, noise_factor, obs_matrix, obs = inputs
        after = _time_update(transition, noise_factor, *carry)
        including = _merge(*after, obs_matrix, obs)
        out = after + including if want_including else after
        return including, rows(*out)

    _, stacked = jax.lax.scan(step, init, inputs, reverse=True)
    return split(stacked, [(big, big), (big, q)] * (2 if want_including else 1))


def information_sequential(model, layout, want_including: bool, parts=None):
    """For every ``k`` the pseudo-observation of ``s_k`` by the data after ``k`` (and, with
    ``want_including``, by the data from ``k`` on), as a reverse ``lax.scan`` (over contiguous
    segments: ``parts``, see ``segments``)."""
    q = model.obs.shape[-1]
    big = model.transition.shape[-1]
    dtype = model.obs.dtype
    zero = (jnp.zeros((big, big), dtype), jnp.zeros((big, q), dtype))
    transition, noise_factor = shift_back(model.transition), shift_back(model.process_noise_factor)
    run = lambda inputs, init: _information_scan(inputs, init, want_including)  # noqa: E731
    if parts is None:
        return run((transition, noise_factor, model.obs_matrix, model.obs), zero)
    # A composition of the elements after a segment is the pseudo-observation of the segment's
    # last state (by the later data), not of the next one, which the carry is: at each segment's
    # last point the step's time update runs with A = I, L = 0 (it then only re-triangularises).
    ends = segments.segment_ends(model.obs.shape[0], parts)[:, None, None]
    transition = jnp.where(ends, jnp.eye(big, dtype=dtype), transition)
    noise_factor = jnp.where(ends, 0.0, noise_factor)
    entry = lambda total: (total[3], total[4])  # noqa: E731
    inputs = (transition, noise_factor, model.obs_matrix, model.obs)
    return segments.scan(run, inputs, _elements(model, layout), _combine, entry, zero, parts, reverse=True)


# ------------------------------------------------------------ associative scans


def _elements(model, layout):
    """Element ``k``: ``s_k | s_{k−1}, o_k ~ N(Ā s_{k−1} + b, U Uᵀ)`` and the likelihood of ``o_k``
    as a pseudo-observation ``(W, ỹ)`` of ``s_{k−1}`` (``N`` rows, the last ``N − p`` zero)."""
    n, p, q = model.obs.shape
    big = model.transition.shape[-1]
    dtype = model.obs.dtype
    a, noise_factor, noise_roots, obs = model.transition, model.process_noise_factor, model.noise_roots, model.obs
    c_noise = _mm(noise_roots, read_values(noise_factor, layout, p))  # C L
    carried = [(jnp.zeros((n, big, p), dtype), noise_factor)]
    post = triangularize(_unit_pre_array(c_noise, carried), p, unit_pivots=True)
    root, gain, factor = post[:, :p, :p], post[:, p:, :p], post[:, p:, p:]  # R Rᵀ = I + C Q Cᵀ
    whitened_ca = solve_lower(root, _mm(model.obs_matrix, a))  # R⁻¹ C A
    whitened_obs = solve_lower(root, obs)  # R⁻¹ o
    transition = a - _mm(gain, whitened_ca)  # (I − KC) A
    offset = _mm(gain, whitened_obs)  # K o
    pad = jnp.zeros((n, big - p, big), dtype)
    info_root = jnp.concatenate([whitened_ca, pad], axis=1)
    info_obs = jnp.concatenate([whitened_obs, jnp.zeros((n, big - p, q), dtype)], axis=1)
    return transition, offset, factor, info_root, info_obs


def _combine(first, second):
    """The element of two consecutive ranges: ``first`` then ``second`` (batched)."""
    a1, b1, u1, w1, y1 = first
    a2, b2, u2, w2, y2 = second
    big = a1.shape[-1]
    batch = a1.shape[:-2]
    dtype = a1.dtype
    # Condition first's output s ~ N(a1 x + b1, u1 u1ᵀ) on second's pseudo-observation.
    carried = [(jnp.zeros((*batch, big, big), dtype), u1)]
    post = triangularize(_unit_pre_array(_mm(w2, u1), carried), big, unit_pivots=True)
    xi11, xi21, xi22 = post[..., :big, :big], post[..., big:, :big], post[..., big:, big:]
    whitened_w2 = solve_lower(xi11, w2)  # Ξ₁₁⁻¹ W₂
    whitened_y2 = solve_lower(xi11, y2)
    through_a = _mm(whitened_w2, a1)
    through_b = whitened_y2 - _mm(whitened_w2, b1)
    transition = _mm(a2, a1 - _mm(xi21, through_a))
    offset = _mm(a2, b1 + _mm(xi21, through_b)) + b2
    factor = triangularize(jnp.concatenate([_mm(a2, xi22), u2], axis=-1))[..., :big]
    info_root, info_obs = _merge(w1, y1, through_a, through_b)
    return transition, offset, factor, info_root, info_obs


def filter_parallel(model, layout) -> Filtered:
    """The filtered moments by a prefix associative scan, then each point's update recomputed
    (vectorised) from its predecessor for the quantities of ``Filtered``."""
    elements = jax.lax.optimization_barrier(_elements(model, layout))  # see the covariance form (covariance.py)
    _, filt_mean, filt_factor, _, _ = jax.lax.associative_scan(_combine, elements)
    pred_mean, pred_factor = _predict(model.transition, model.process_noise_factor, shift_forward(filt_mean), shift_forward(filt_factor))
    return Filtered(*_update(pred_mean, pred_factor, model.noise_roots, model.obs, layout))


def information_parallel(model, layout, want_including: bool):
    """``information_sequential`` by a suffix associative scan of the same elements: the
    composite of elements ``k+1 … n`` carries the likelihood of their data given ``s_k``."""
    elements = jax.lax.optimization_barrier(_elements(model, layout))
    suffix = jax.lax.associative_scan(lambda later, earlier: _combine(earlier, later), elements, reverse=True)
    after_root, after_obs = shift_back(suffix[3]), shift_back(suffix[4])
    if not want_including:
        return after_root, after_obs
    return (after_root, after_obs, *_merge(after_root, after_obs, model.obs_matrix, model.obs))


# ------------------------------------------------------------------ smoother


def smooth(filtered: Filtered, model, layout, parallel: bool, want_adjoints: bool, parts=None, native: bool = False) -> Smoothed:
    """Smoothed marginals from the filtered moments and the backward pseudo-observations; with
    ``native``, both in one native pass (``native.square_root_smooth_call``).

    With ``want_adjoints`` also ``ν_k = ∂L/∂m⁻_k`` and ``N_k`` (``∂L/∂P⁻_k = ½(ν_kν_kᵀ − qN_k)``)
    from the predicted moments and the pseudo-observation of the data from ``k`` on:
    ``L = const + log N(ỹ'; W'm⁻, I + W'P⁻W'ᵀ)``, so ``ν = W'ᵀV⁻¹(ỹ' − W'm⁻)``, ``N = W'ᵀV⁻¹W'``.
    """
    if native:
        inputs = (shift_back(model.transition), shift_back(model.process_noise_factor), model.obs_matrix, model.obs)
        moments = (filtered.mean, filtered.factor, filtered.c_factor, filtered.whitened_residual)
        mean, whitened_residual, factor, c_factor, *including = _smooth_native(*inputs, *moments)
    else:
        if parallel:
            info = information_parallel(model, layout, want_adjoints)
        else:
            info = information_sequential(model, layout, want_adjoints, parts)
        mean, whitened_residual, factor, c_factor = _smoothed(filtered, *info[:2])
        including = info[2:]
    nu = info_matrix = None
    if want_adjoints:
        nu, info_matrix = _adjoints(filtered, model, *including)
    return Smoothed(mean, whitened_residual, factor, factor, c_factor, nu, info_matrix)


def _smoothed(filtered: Filtered, after_root, after_obs):
    """``(E[s_k|y], o − C E[s_k|y], G, C G)``: the filtered moments conditioned on the
    pseudo-observation of the data after each point, ``Cov(s_k|y) = GGᵀ`` (batched)."""
    n, big, _ = filtered.mean.shape
    p = filtered.c_factor.shape[-2]
    dtype = filtered.mean.dtype
    carried = [
        (jnp.zeros((n, big, big), dtype), filtered.factor),
        (jnp.zeros((n, p, big), dtype), filtered.c_factor),
    ]
    post = triangularize(_unit_pre_array(_mm(after_root, filtered.factor), carried), big, unit_pivots=True)
    root = post[:, :big, :big]  # R Rᵀ = I + W P Wᵀ
    gain, factor = post[:, big : 2 * big, :big], post[:, big : 2 * big, big:]
    c_gain, c_factor = post[:, 2 * big :, :big], post[:, 2 * big :, big:]
    whitened = solve_lower(root, after_obs - _mm(after_root, filtered.mean))
    return filtered.mean + _mm(gain, whitened), filtered.whitened_residual - _mm(c_gain, whitened), factor, c_factor


def _smooth_reference(a_next, noise_next, obs_matrix, obs, mean, factor, c_factor, whitened_residual):
    big, q = a_next.shape[-1], obs.shape[-1]
    zero = (jnp.zeros((big, big), obs.dtype), jnp.zeros((big, q), obs.dtype))
    after_root, after_obs, *including = _information_scan((a_next, noise_next, obs_matrix, obs), zero, True)
    filtered = Filtered(mean, factor, c_factor, whitened_residual, None, None)
    return (*_smoothed(filtered, after_root, after_obs), *including)


_smooth_native = native.with_reference(native.square_root_smooth_call, _smooth_reference)


def _adjoints(filtered: Filtered, model, root_from, obs_from):
    pred_mean, pred_factor = _predict(
        model.transition, model.process_noise_factor, shift_forward(filtered.mean), shift_forward(filtered.factor)
    )
    big = pred_factor.shape[-1]
    post = triangularize(_unit_pre_array(_mm(root_from, pred_factor), []), big, unit_pivots=True)
    root = post[:, :, :big]  # V = R Rᵀ = I + W'P⁻W'ᵀ
    weighted = _t(solve_lower(root, root_from))  # W'ᵀ R⁻ᵀ
    nu = _mm(weighted, solve_lower(root, obs_from - _mm(root_from, pred_mean)))
    return nu, _mm(weighted, _t(weighted))
