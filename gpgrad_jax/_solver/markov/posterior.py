"""The Markov solvers' posterior: marginals at new indices and draws, in O(n + n_new)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gpgrad_jax._smallmatrix import small_matmul as _mm
from gpgrad_jax._solver.markov.forms import Scheme, covariance_derivatives, filter_pass, smooth
from gpgrad_jax._solver.markov.model import Model, build_model, layout
from gpgrad_jax._solver.markov.rule import _group_sum, _unsort, value_covariance


def _joint_model(scheme: Scheme, blocks, noise, x, r, x_new):
    """The model of the data and ``x_new`` together: the new indices join as points with zero
    precision. Returns ``(layout, model, p, q)``."""
    n, dim = r.shape
    n_new = x_new.shape[0]
    lay = layout(blocks, r.dtype)
    noise_roots, q = noise.observation_blocks(n, dim)
    p = noise_roots.shape[-1]
    all_x = jnp.concatenate([x, x_new])
    all_roots = jnp.concatenate([noise_roots, jnp.zeros((n_new, p, p), noise_roots.dtype)])
    all_data = jnp.concatenate([r.reshape(n, p, q), jnp.zeros((n_new, p, q), r.dtype)])
    return lay, build_model(blocks, lay, all_x, all_roots, all_data, scheme.square_root), p, q


@covariance_derivatives
@functools.partial(jax.jit, static_argnums=0)
def posterior_marginals(scheme: Scheme, blocks, noise, x, r, x_new):
    """Posterior mean ``(n_new, p, q)`` and ``Cov(f | y)`` ``(n_new, p, p)`` at ``x_new``."""
    n = x.shape[0]
    lay, model, p, _ = _joint_model(scheme, blocks, noise, x, r, x_new)
    filtered = filter_pass(model, lay, scheme)
    smoothed = smooth(filtered, model, lay, scheme, False)
    f_mean = _unsort(_group_sum(smoothed.mean, lay, p, lay.starts), model)
    f_cov = _unsort(value_covariance(smoothed, lay, p), model)
    return f_mean[n:], f_cov[n:]


def _prior_states(model: Model, standard, parallel: bool):
    """``s_k = A_k s_{k−1} + L_k ξ_k`` for standard normal ``ξ`` (``n, N, w``): prior draws of the
    state at every point, by a ``lax.scan`` or an associative scan of the affine maps."""
    shocks = _mm(model.process_noise_factor, standard)
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
def posterior_draws(parallel: bool, key, blocks, noise, x, r, num_samples, x_new):
    """Draws of ``f(x_new) − μ`` from the posterior, ``(num_samples, n_new, D)``, in O(n + n_new).

    Pathwise conditioning (Matheron's rule): a prior draw ``s`` of the state at the data and the
    new indices together, simulated observations ``õ = C s + e``, and the posterior mean of the
    state given the data minus them, ``s + E[s | o − õ]`` — a draw from ``p(s | o)``. The posterior
    mean is linear in the observations, so all draws share one filter and smoother, their
    observations riding along as columns. Always the square-root form (the prior needs the
    process-noise factors anyway).
    """
    scheme = Scheme(square_root=True, parallel=parallel)
    n, dim = r.shape
    n_new = x_new.shape[0]
    lay, model, p, q = _joint_model(scheme, blocks, noise, x, r, x_new)
    total, big = model.transition.shape[:2]
    width = num_samples * q
    prior_key, obs_key = jax.random.split(key)
    dtype = r.dtype
    states = _prior_states(model, jax.random.normal(prior_key, (total, big, width), dtype), parallel)
    simulated = _mm(model.obs_matrix, states) + jax.random.normal(obs_key, (total, p, width), dtype)
    observed = jnp.tile(model.obs, (1, 1, num_samples))  # column s·q + j: draw s, coordinate j
    model = model._replace(obs=observed - simulated)
    filtered = filter_pass(model, lay, scheme)
    smoothed = smooth(filtered, model, lay, scheme, False)
    draws = _unsort(_group_sum(states + smoothed.mean, lay, p, lay.starts), model)[n:]  # (n_new, p, S·q)
    draws = draws.reshape(n_new, p, num_samples, q)
    return jnp.moveaxis(draws, 2, 0).reshape(num_samples, n_new, dim)
