r"""The Kalman filter and smoother in covariance form (the model: ``model``).

**Filter** (value). ``m⁻ = A m, P⁻ = A P Aᵀ + Q``; ``U = I + C P⁻ Cᵀ`` (eigenvalues ``≥ 1``:
rank-deficient or zero blocks are fine, ``P`` and ``Q`` are never inverted),
``v = o − C m⁻``, ``L = Σ_k [−½ vᵀU⁻¹v − (q/2) log|U|] − (m/2) log 2π``, equal to the dense
``L``. A step ``h = 0`` (tied indices) is ``A = I, Q = 0``: exact, nothing to invert.

**Smoother** (modified Bryson–Frazier). The adjoints ``ν_k = ∂L/∂m⁻_k`` and ``N_k`` with
``∂L/∂P⁻_k = ½(ν_kν_kᵀ − q N_k)`` obey the backward recursion
``ν_k = Cᵀ U⁻¹ v + E_k ν_{k+1}``, ``N_k = Cᵀ U⁻¹ C + E_k N_{k+1} E_kᵀ`` with
``E_k = (I − K_k C_k)ᵀ A_{k+1}ᵀ`` and give the smoothed marginals — again with no inverse of
``P`` or ``Q``. Both recursions run as one native pass each on the CPU (``native``), as
``lax.scan`` (``"markov"`` elsewhere, and the reference) or as associative scans of O(log n)
depth (``"markov-parallel"``).

Exact in float64; in float32 the differences of covariances it forms (``P⁺ = P⁻ − K U Kᵀ``,
smoothed ``P − P Λ̂ P``) lose what the large precisions of small noise amplify — the
square-root form (``square_root``) is the float32 solver.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._smallmatrix import solve, spd_inverse_and_logdet
from gpgrad_jax._smallmatrix import transpose as _t
from gpgrad_jax._solver.markov import native, segments
from gpgrad_jax._solver.markov.model import Model, Smoothed, rows, shift_back, shift_forward, split

Array = Any


class Filtered(NamedTuple):
    """Predicted moments and innovations at every point (sorted order)."""

    predicted_mean: Array  # m⁻_k, (n, N, q)
    predicted_cov: Array  # P⁻_k, (n, N, N)
    log_terms: Array  # −½ vᵀU⁻¹v − (q/2) log|U|, (n,)


def _update(mean, cov, obs_matrix, obs):
    """Observation update in precision form: ``(m⁺, P⁺, likelihood term)``."""
    q = obs.shape[-1]
    pc = _mm(cov, _t(obs_matrix))
    u = jnp.eye(obs_matrix.shape[-2], dtype=cov.dtype) + _mm(obs_matrix, pc)
    u_inv, logdet = spd_inverse_and_logdet(u)
    innovation = obs - _mm(obs_matrix, mean)
    gain = _mm(pc, u_inv)
    new_mean = mean + _mm(gain, innovation)
    new_cov = cov - _mm(gain, _t(pc))
    new_cov = 0.5 * (new_cov + _t(new_cov))
    term = -0.5 * jnp.sum(innovation * _mm(u_inv, innovation), axis=(-2, -1)) - 0.5 * q * logdet
    return new_mean, new_cov, term


def filter_sequential(model: Model, native: bool = False) -> Filtered:
    """The filter as one sequential pass: the native custom call (``native``) or a ``lax.scan``."""
    args = (model.transition, model.process_noise, model.obs_matrix, model.obs)
    return Filtered(*(_filter_native(*args) if native else _filter_scan(*args)))


def _filter_scan(transition, process_noise, obs_matrix, obs, init=None):
    """The filter as a ``lax.scan`` from the filtered moments ``init`` before the first point
    (``None``: zero, the first point's ``A = 0`` and ``Q`` its prior)."""
    _, big, _ = transition.shape
    q = obs.shape[-1]
    dtype = transition.dtype

    def step(carry, inputs):
        mean, cov = carry
        a, noise, obs_matrix, obs = inputs
        pred_mean = _mm(a, mean)
        pred_cov = _mm(_mm(a, cov), a.T) + noise
        mean, cov, term = _update(pred_mean, pred_cov, obs_matrix, obs)
        return (mean, cov), rows(pred_mean, pred_cov, term)

    if init is None:
        init = (jnp.zeros((big, q), dtype), jnp.zeros((big, big), dtype))
    xs = (transition, process_noise, obs_matrix, obs)
    _, stacked = jax.lax.scan(step, init, xs)
    mean, cov, terms = split(stacked, [(big, q), (big, big), ()])
    return mean, cov, terms


_filter_native = native.with_reference(native.filter_call, _filter_scan)


def _filter_elements(model: Model):
    """Element ``k`` of the associative filter (Särkkä & García-Fernández, 2021), in precision
    form: the filter from a known ``s_{k−1}`` through observation ``k``, ``(A, b, C, η, J)``."""
    a, noise, c, o = model.transition, model.process_noise, model.obs_matrix, model.obs
    big = a.shape[-1]
    eye = jnp.eye(big, dtype=a.dtype)
    s_inv, _ = spd_inverse_and_logdet(jnp.eye(c.shape[-2], dtype=a.dtype) + _mm(_mm(c, noise), _t(c)))
    gain = _mm(_mm(noise, _t(c)), s_inv)
    residual_map = eye - _mm(gain, c)
    return (
        _mm(residual_map, a),  # A
        _mm(gain, o),  # b
        noise - _mm(gain, _t(_mm(noise, _t(c)))),  # C
        _mm(_mm(_mm(_t(a), _t(c)), s_inv), o),  # η
        _mm(_mm(_mm(_mm(_t(a), _t(c)), s_inv), c), a),  # J
    )


def _filter_combine(first, second):
    """The element of two consecutive ranges, ``first`` then ``second`` (batched)."""
    a1, b1, c1, eta1, j1 = first
    a2, b2, c2, eta2, j2 = second
    m = jnp.eye(a1.shape[-1], dtype=a1.dtype) + _mm(c1, j2)
    a2_m = _t(solve(_t(m), _t(a2)))  # A₂ (I + C₁J₂)⁻¹
    a1t_mt = _t(solve(m, a1))  # A₁ᵀ (I + J₂C₁)⁻¹
    cov = _mm(_mm(a2_m, c1), _t(a2)) + c2
    return (
        _mm(a2_m, a1),
        _mm(a2_m, b1 + _mm(c1, eta2)) + b2,
        0.5 * (cov + _t(cov)),
        _mm(a1t_mt, eta2 - _mm(j2, b1)) + eta1,
        _mm(_mm(a1t_mt, j2), a1) + j1,
    )


def filter_parallel(model: Model) -> Filtered:
    """The same filter as an associative scan of ``_filter_elements``."""
    a, noise, c, o = model.transition, model.process_noise, model.obs_matrix, model.obs
    # Materialise the elements: otherwise XLA fuses their producers into every strided slice
    # of every level of the scan and recomputes them there (at n = 4000 the run never ended).
    elements = jax.lax.optimization_barrier(_filter_elements(model))
    _, filt_mean, filt_cov, _, _ = jax.lax.associative_scan(_filter_combine, elements)
    pred_mean = _mm(a, shift_forward(filt_mean))
    pred_cov = _mm(_mm(a, shift_forward(filt_cov)), _t(a)) + noise
    _, _, terms = _update(pred_mean, pred_cov, c, o)
    return Filtered(pred_mean, pred_cov, terms)


def filter_segmented(model: Model, parts: segments.Segments) -> Filtered:
    """The sequential filter over contiguous segments (``segments.scan``): a range's element
    composition gives the filtered moments ``(b, C)`` after it (the state before the first point
    is zero)."""
    big, q = model.obs_matrix.shape[-1], model.obs.shape[-1]
    dtype = model.obs.dtype
    zero = (jnp.zeros((big, q), dtype), jnp.zeros((big, big), dtype))
    inputs = (model.transition, model.process_noise, model.obs_matrix, model.obs)
    stacked = segments.scan(
        lambda xs, init: _filter_scan(*xs, init=init), inputs, _filter_elements(model), _filter_combine,
        lambda total: (total[1], total[2]), zero, parts,
    )
    return Filtered(*stacked)


# ------------------------------------------------------------------ smoother


class _Update(NamedTuple):
    """The observation update at every point, recomputed vectorised from the predicted moments."""

    u_inv: Array  # U_k⁻¹, (n, p, p)
    innovation: Array  # v_k, (n, p, q)
    gain: Array  # K_k, (n, N, p)
    residual_map: Array  # I − K_k C_k, (n, N, N)


def _updates(c, obs, pred_mean, pred_cov) -> _Update:
    pc = _mm(pred_cov, _t(c))
    u_inv, _ = spd_inverse_and_logdet(jnp.eye(c.shape[-2], dtype=pred_cov.dtype) + _mm(c, pc))
    gain = _mm(pc, u_inv)
    residual_map = jnp.eye(pred_cov.shape[-1], dtype=pred_cov.dtype) - _mm(gain, c)
    return _Update(u_inv, obs - _mm(c, pred_mean), gain, residual_map)


def _backward_elements(update: _Update, transition, c):
    """``E_k``, ``c_k = CᵀU⁻¹v`` and ``D_k = CᵀU⁻¹C`` of the adjoint recursion."""
    e = _mm(_t(update.residual_map), _t(shift_back(transition)))
    ct_uinv = _mm(_t(c), update.u_inv)
    return e, _mm(ct_uinv, update.innovation), _mm(ct_uinv, c)


def _adjoints_sequential(e, c, d, init=None):
    """The adjoint recursion as a ``lax.scan`` over one packed ``[N | ν]`` (a tuple carry ran
    2× slower for the 3-D curve), emitting flat rows; ``init``: ``(ν, N)`` after the last point
    (``None``: zero)."""
    big, q = c.shape[-2:]

    def step(packed, inputs):
        e_k, d_k, c_k = inputs
        propagated = _mm(e_k, packed)  # E [N | ν]
        info = _mm(propagated[:, :big], e_k.T) + d_k
        nu = propagated[:, big:] + c_k
        return jnp.concatenate([info, nu], -1), rows(nu, info)

    init = jnp.zeros((big, big + q), e.dtype) if init is None else jnp.concatenate([init[1], init[0]], -1)
    _, stacked = jax.lax.scan(step, init, (e, d, c), reverse=True)
    nu, info = split(stacked, [(big, q), (big, big)])
    return nu, info


def _adjoint_combine(earlier, later):
    """The affine maps ``ν ↦ Eν + c``, ``N ↦ E N Eᵀ + D`` of two consecutive ranges, composed:
    the earlier range's map after the later's."""
    e2, c2, d2 = later
    e1, c1, d1 = earlier
    return _mm(e1, e2), _mm(e1, c2) + c1, _mm(_mm(e1, d2), _t(e1)) + d1


def _adjoints_parallel(e, c, d):
    # Suffix compositions of the maps.
    elements = jax.lax.optimization_barrier((e, c, d))  # see filter_parallel
    _, nu, info = jax.lax.associative_scan(lambda later, earlier: _adjoint_combine(earlier, later), elements, reverse=True)
    return nu, info


def _adjoints_segmented(e, c, d, parts: segments.Segments):
    # A range's composed map applied to zero is the (ν, N) entering it.
    big, q = c.shape[-2:]
    zero = (jnp.zeros((big, q), e.dtype), jnp.zeros((big, big), e.dtype))
    return segments.scan(
        lambda xs, init: _adjoints_sequential(*xs, init=init), (e, c, d), (e, c, d), _adjoint_combine,
        lambda total: (total[1], total[2]), zero, parts, reverse=True,
    )


def _smooth_scan(transition, c, obs, pred_mean, pred_cov, parallel=False, parts=None):
    """``(ν, N, m_k|k, P_k|k, E[s_k|y], Cov(s_k|y))`` by JAX: the update recomputed vectorised,
    the adjoint recursion as a scan (over segments: ``parts``), the moments vectorised (see
    ``smooth``)."""
    update = _updates(c, obs, pred_mean, pred_cov)
    e, c_vec, d = _backward_elements(update, transition, c)
    if parts is not None:
        nu, info = _adjoints_segmented(e, c_vec, d, parts)
    else:
        nu, info = (_adjoints_parallel if parallel else _adjoints_sequential)(e, c_vec, d)
    gain, residual_map = update.gain, update.residual_map
    filt_mean = pred_mean + _mm(gain, update.innovation)
    filt_cov = _mm(_mm(residual_map, pred_cov), _t(residual_map)) + _mm(gain, _t(gain))
    next_transition = shift_back(transition)
    later_mean = _mm(_t(next_transition), shift_back(nu))
    later_info = _mm(_mm(_t(next_transition), shift_back(info)), next_transition)
    mean = filt_mean + _mm(filt_cov, later_mean)
    cov = filt_cov - _mm(_mm(filt_cov, later_info), filt_cov)
    return nu, info, filt_mean, filt_cov, mean, 0.5 * (cov + _t(cov))


# The whole backward pass — update, adjoints, moments — as one native loop over the points.
_smooth_native = native.with_reference(native.smooth_call, _smooth_scan)


def smooth(filtered: Filtered, model: Model, parallel: bool, native: bool = False, parts=None) -> Smoothed:
    """Smoothed marginals from the filtered ones: ``m_k|k + P_k|k λ̂_k`` and
    ``P_k|k − P_k|k Λ̂_k P_k|k`` with ``λ̂_k = A_{k+1}ᵀ ν_{k+1}``, ``Λ̂_k = A_{k+1}ᵀ N_{k+1} A_{k+1}``.

    The same moments as ``m⁻ + P⁻ν`` and ``P⁻ − P⁻NP⁻``, but a difference of *filtered*
    covariances (Joseph form, small where the data pin the curve) instead of predicted ones
    (large across a wide gap). By JAX only the adjoint recursion is a scan, the rest vectorised
    over the points; the native pass (``native``) runs all of it in one loop.
    """
    args = (model.transition, model.obs_matrix, model.obs, filtered.predicted_mean, filtered.predicted_cov)
    if native and not parallel and parts is None:
        nu, info, filt_mean, filt_cov, mean, cov = _smooth_native(*args)
    else:
        nu, info, filt_mean, filt_cov, mean, cov = _smooth_scan(*args, parallel=parallel, parts=parts)
    whitened_residual = model.obs - _mm(model.obs_matrix, mean)
    return Smoothed(mean, whitened_residual, cov, None, None, nu, info, filt_mean, filt_cov)
