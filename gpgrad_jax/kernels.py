"""Covariance kernels: pytrees with hand-derived first-argument derivatives.

See [``Kernel``][gpgrad_jax.kernels.Kernel].  Compose with ``+`` and ``*``; ``c * k`` scales by a
learnable constant.
"""

from gpgrad_jax._kernels import (
    SHO,
    Constant,
    Cosine,
    CubicSpline,
    ExpSquared,
    Kernel,
    Linear,
    Matern12,
    Matern32,
    Matern52,
    Product,
    Sum,
    register,
)

__all__ = [
    "SHO",
    "Constant",
    "Cosine",
    "CubicSpline",
    "ExpSquared",
    "Kernel",
    "Linear",
    "Matern12",
    "Matern32",
    "Matern52",
    "Product",
    "Sum",
    "register",
]
