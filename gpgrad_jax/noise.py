"""Noise models, as square roots ``S`` of the noise precision ``Λ = SᵀS``."""

from gpgrad_jax._noise import Dense, Isotropic, Noise, PerPoint

__all__ = ["Dense", "Isotropic", "Noise", "PerPoint"]
