"""The public exceptions and warnings: what a caller may catch."""

from __future__ import annotations


class NumericalError(FloatingPointError):
    """A valid problem whose result the working precision cannot represent (e.g. overflow)."""


class FactorizationError(NumericalError):
    r"""$U = I + S (K \otimes I_D) S^\top$ could not be Cholesky-factored in the working precision."""


class ConditioningWarning(UserWarning):
    """``U`` is ill-conditioned for the working precision: the result may have lost accuracy."""
