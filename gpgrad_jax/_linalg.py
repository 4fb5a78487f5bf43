"""Dense linear algebra on the Cholesky factor of ``U``."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


def cho_inverse(chol):
    """``U⁻¹`` from the lower Cholesky factor ``chol`` of ``U = chol cholᵀ``.

    ``U⁻¹ = L⁻ᵀ L⁻¹``: one triangular solve against the identity and one
    product.  The result is symmetric by construction.
    """
    eye = jnp.eye(chol.shape[-1], dtype=chol.dtype)
    chol_inv = solve_triangular(chol, eye, lower=True)
    return chol_inv.T @ chol_inv
