r"""Noise models, as square roots $S$ of the noise precision $\Lambda = S^\top S$."""

from gpgrad_jax._noise import BlockDiagonal, Dense, Isotropic, Noise, PerPoint

__all__ = ["BlockDiagonal", "Dense", "Isotropic", "Noise", "PerPoint"]
