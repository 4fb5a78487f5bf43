"""Reference implementation by plain autodiff — no custom rule, no structure.

Builds the dense ``S``, ``K ⊗ I_D`` and ``U = I + S (K ⊗ I_D) Sᵀ`` explicitly
and lets ``jax.grad`` differentiate through ``kernel.evaluate`` and the factorisation (the
library's ``_linalg``, which never runs a batched LAPACK call: the reference may be vmapped too;
its derivative rules are the textbook ones). It is the baseline the closed form is tested and
benchmarked against; use ``gpgrad_jax.log_marginal_likelihood`` in real code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gpgrad_jax import _linalg, solvers
from gpgrad_jax._arguments import prepare
from gpgrad_jax._likelihood import noise_log_density_correction
from gpgrad_jax._noise import _rank_mask
from gpgrad_jax._solver.inducing import default_jitter

__all__ = ["inducing_bound", "log_marginal_likelihood", "plain_log_marginal_likelihood", "precision_form_log_likelihood"]


def precision_form_log_likelihood(kernel, x, y, noise, mean=None):
    r"""$L = -\tfrac{1}{2} w^\top U^{-1} w - \tfrac{1}{2} \log \lvert U \rvert - \tfrac{m}{2} \log 2\pi$ by dense linear algebra.

    Same arguments and value as [``gpgrad_jax.precision_form_log_likelihood``][gpgrad_jax.precision_form_log_likelihood];
    gradients come from ordinary reverse-mode autodiff.
    """
    return _precision_form(*prepare(kernel, x, y, noise, mean)[0])


def _precision_form(kernel, noise, x, r):
    n, dim = r.shape
    prior = jnp.kron(kernel.matrix(x, x), jnp.eye(dim, dtype=r.dtype))
    s = noise.dense_matrix(n, dim)
    w = s @ r.reshape(-1)
    m = s.shape[0]
    chol = _linalg.cholesky(jnp.eye(m, dtype=r.dtype) + s @ prior @ s.T)
    return -0.5 * w @ chol.solve(w) - 0.5 * chol.log_det() - 0.5 * m * math.log(2.0 * math.pi)


def log_marginal_likelihood(kernel, x, y, noise, mean=None):
    r"""The Gaussian log density of what is observed, $L + \log \operatorname{pdet} S + \frac{m - r}{2} \log 2\pi$,
    by dense linear algebra: same arguments and value as [``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood].

    $\log \operatorname{pdet} S = \tfrac{1}{2} \log \det(S^\top S + P_0)$ with $P_0$ the projector onto $S$'s null space (held
    constant, as the rank is): an independent route to the pseudo-determinant and its
    gradient, by autodiff through ``slogdet``. The rank is counted on the whole $S$ (not per
    block), which agrees on well-scaled problems.
    """
    kernel, noise, x, r = prepare(kernel, x, y, noise, mean)[0]
    return _precision_form(kernel, noise, x, r) + _noise_term(noise.dense_matrix(*r.shape))


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
    kernel, noise, x, r = prepare(kernel, x, y, noise, mean)[0]
    n, dim = r.shape
    z = jnp.asarray(inducing, x.dtype)
    jitter = default_jitter(x.dtype) if jitter is None else jitter
    gram = kernel.matrix(z, z)
    gram = gram + jitter * jnp.mean(jnp.diagonal(gram)) * jnp.eye(z.shape[0], dtype=x.dtype)
    cross = kernel.matrix(x, z)
    low_rank = cross @ _linalg.cholesky(gram).solve(cross.T)
    eye = jnp.eye(dim, dtype=x.dtype)
    s = noise.dense_matrix(n, dim)
    w = s @ r.reshape(-1)
    rows = s.shape[0]
    chol = _linalg.cholesky(jnp.eye(rows, dtype=x.dtype) + s @ jnp.kron(low_rank, eye) @ s.T)
    value = (
        -0.5 * w @ chol.solve(w)
        - 0.5 * chol.log_det()
        - 0.5 * rows * math.log(2.0 * math.pi)
        - 0.5 * jnp.trace(s.T @ s @ jnp.kron(kernel.matrix(x, x) - low_rank, eye))
    )
    return value + _noise_term(s)


def plain_log_marginal_likelihood(kernel, x, y, noise, mean=None, *, solver="auto"):
    r"""[``gpgrad_jax.log_marginal_likelihood``][gpgrad_jax.log_marginal_likelihood] by the same forward
    computation as ``solver``'s, **without its closed-form rule**: ``jax.grad`` differentiates
    through the solver's factorisation or filter. The baseline the closed form is measured against
    (``benchmarks/``): same value, same gradient, autodiff's cost. Except for the Markov solvers'
    square-root form (float32's default): autodiff through its QR factorisations is undefined
    where a factor is rank deficient — a zero or rank-deficient noise block, tied indices, a
    ``Cosine`` block (no process noise) — and gives NaN there; the solver's rule is exact. For
    [``gg.solvers.Inducing``][gpgrad_jax.solvers.Inducing] the bound of
    [``gpgrad_jax.inducing_bound``][gpgrad_jax.inducing_bound].

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import gpgrad_jax as gg
        >>> from gpgrad_jax import kernels, noise
        >>> x = jnp.linspace(0.0, 3.0, 40)
        >>> args = (kernels.Matern32(1.0, 1.0), x, jnp.sin(x), noise.Isotropic(0.1))
        >>> rule = jax.grad(gg.log_marginal_likelihood, argnums=1)(*args, solver="markov")
        >>> plain = jax.grad(gg.reference.plain_log_marginal_likelihood, argnums=1)(*args, solver="markov")
        >>> bool(jnp.allclose(rule, plain))
        True
    """
    problem = prepare(kernel, x, y, noise, mean)[0]
    chosen, prepared = solvers._resolve(solver, problem)
    return chosen.plain_log_likelihood(prepared) + noise_log_density_correction(problem.noise, *problem.r.shape)
