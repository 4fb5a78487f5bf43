"""Reference implementation by plain autodiff — no custom rule, no structure.

Builds the dense ``S``, ``K ⊗ I_D`` and ``U = I + S (K ⊗ I_D) Sᵀ`` explicitly
and lets ``jax.grad`` differentiate through ``kernel.evaluate``.  It is the
baseline the closed form is tested and benchmarked against; use
``gpgrad_jax.log_marginal_likelihood`` in real code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gpgrad_jax import _linalg
from gpgrad_jax._noise import _rank_mask
from gpgrad_jax._validation import check_problem, poison

__all__ = ["inducing_bound", "log_marginal_likelihood", "precision_form_log_likelihood"]


def precision_form_log_likelihood(kernel, x, y, noise, mean=None):
    r"""$L = -\tfrac{1}{2} w^\top U^{-1} w - \tfrac{1}{2} \log \lvert U \rvert - \tfrac{m}{2} \log 2\pi$ by dense linear algebra.

    Same arguments and value as [``gpgrad_jax.precision_form_log_likelihood``][gpgrad_jax.precision_form_log_likelihood];
    gradients come from ordinary reverse-mode autodiff.
    """
    x, y, mean, valid = check_problem(kernel, x, y, noise, mean)
    x, y = poison(valid, x, y)
    n, dim = y.shape
    prior = jnp.kron(kernel.matrix(x, x), jnp.eye(dim, dtype=y.dtype))
    s = noise.dense_matrix(n, dim)
    w = s @ (y - mean).reshape(-1)
    m = s.shape[0]
    chol = _linalg.cholesky(jnp.eye(m, dtype=y.dtype) + s @ prior @ s.T)
    return -0.5 * w @ chol.solve(w) - 0.5 * chol.log_det() - 0.5 * m * math.log(2.0 * math.pi)


def log_marginal_likelihood(kernel, x, y, noise, mean=None):
    r"""The Gaussian log density of what is observed, $L + \log \operatorname{pdet} S + \frac{m - r}{2} \log 2\pi$,
    by dense linear algebra: same arguments and value as [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].

    $\log \operatorname{pdet} S = \tfrac{1}{2} \log \det(S^\top S + P_0)$ with $P_0$ the projector onto $S$'s null space (held
    constant, as the rank is): an independent route to the pseudo-determinant and its
    gradient, by autodiff through ``slogdet``. The rank is counted on the whole $S$ (not per
    block), which agrees on well-scaled problems.
    """
    x, y, mean, valid = check_problem(kernel, x, y, noise, mean)
    x, y = poison(valid, x, y)
    value = precision_form_log_likelihood(kernel, x, y, noise, mean)
    return value + _noise_term(noise.dense_matrix(*y.shape))


def _noise_term(s):
    """``log pdet S + ((m − r)/2) log 2π`` by ``slogdet`` on the row space (the rank held constant)."""
    w, v = _linalg.orthogonalize_columns(jax.lax.stop_gradient(s))  # s V = U Σ
    singular_values = jnp.sqrt(jnp.sum(w * w, axis=0))
    keep = _rank_mask(singular_values, s.shape)  # the library's tolerance; the route differs
    rank = jnp.sum(keep)
    row_space = v * keep[None, :]  # the right singular vectors with σ > 0, others zero
    null_projector = jnp.eye(s.shape[1], dtype=s.dtype) - row_space @ row_space.T
    log_pdet = 0.5 * _linalg.cholesky(s.T @ s + null_projector).log_det()
    return log_pdet + 0.5 * (s.shape[0] - rank) * math.log(2.0 * math.pi)


def inducing_bound(kernel, x, y, noise, inducing, mean=None, jitter=None):
    r"""Titsias' bound by dense linear algebra: $Q = K_{xz} (K_{zz} + \varepsilon I)^{-1} K_{zx}$ formed
    explicitly (``n × n``), then $\log \mathcal{N}(w \mid 0, I + S (Q \otimes I_D) S^\top)
    - \tfrac12 \operatorname{tr}(S^\top S\,((K - Q) \otimes I_D))$ plus the noise term of
    [``log_marginal_likelihood``][gpgrad_jax.reference.log_marginal_likelihood].

    Same arguments and value as [``gpgrad_jax.inducing_bound``][gpgrad_jax.inducing_bound] (any noise); gradients by autodiff.
    """
    from gpgrad_jax._inducing import default_jitter

    x, y, mean, valid = check_problem(kernel, x, y, noise, mean)
    x, y = poison(valid, x, y)
    n, dim = y.shape
    z = jnp.asarray(inducing, x.dtype)
    jitter = default_jitter(x.dtype) if jitter is None else jitter
    gram = kernel.matrix(z, z)
    gram = gram + jitter * jnp.mean(jnp.diagonal(gram)) * jnp.eye(z.shape[0], dtype=x.dtype)
    cross = kernel.matrix(x, z)
    low_rank = cross @ _linalg.cholesky(gram).solve(cross.T)
    eye = jnp.eye(dim, dtype=x.dtype)
    s = noise.dense_matrix(n, dim)
    w = s @ (y - mean).reshape(-1)
    rows = s.shape[0]
    chol = _linalg.cholesky(jnp.eye(rows, dtype=x.dtype) + s @ jnp.kron(low_rank, eye) @ s.T)
    value = (
        -0.5 * w @ chol.solve(w)
        - 0.5 * chol.log_det()
        - 0.5 * rows * math.log(2.0 * math.pi)
        - 0.5 * jnp.trace(s.T @ s @ jnp.kron(kernel.matrix(x, x) - low_rank, eye))
    )
    return value + _noise_term(s)
